"""Quality gates, the task classifier and the correctness scorer, as pure functions."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from skinflint.routing.classifier import TaskClassifier
from skinflint.routing.gates import (
    answer_key,
    choices_in_prompt,
    extract_choice,
    extract_code,
    structural_check,
)
from skinflint.routing.scorer import CorrectnessScorer, Example


def _body(content: str | None, finish: str = "stop", **message: object) -> dict[str, object]:
    return {"choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": content, **message}}]}


@pytest.mark.parametrize(("text", "expected"), [
    ("A", "A"), ("C) palms", "C"), (" B\n", "B"), ("D. because", "D"), ("b", "B"),
    ("A questioning mind", "A"),
    # anything that does not lead with the option is no choice: the gate escalates it
    ("The answer is B.", None), ("Based on the text", None), ("(B) wet", None),
    ("none of these", None), ("E", None), ("", None),
])
def test_extract_choice(text: str, expected: str | None) -> None:
    assert extract_choice(text, "ABCD") == expected


def test_choices_come_from_the_last_instruction() -> None:
    prompt = ('Q1\nPrint only a single choice  from "A" or "B" or "C" or "D" without '
              'explanation.\nAnswer:\nB\n\nQ2\nPrint only a single choice  from "A" or "B" '
              "without explanation. Answer:")
    assert choices_in_prompt(prompt) == "AB"
    assert choices_in_prompt("no instruction here") == "ABCD"


def test_extract_code() -> None:
    fenced = "Here you go:\n```python\ndef f(x):\n    return x\n```\nDone."
    assert extract_code(fenced) == "def f(x):\n    return x"
    assert extract_code("Sure.\ndef g():\n    pass") == "def g():\n    pass"
    assert extract_code("[PYTHON]\ndef h():\n    pass\n[/PYTHON]") == "def h():\n    pass"
    assert extract_code("def k():\n    return 1\nThis explains: it returns one.") == (
        "def k():\n    return 1")
    assert extract_code("no code at all") is None


@pytest.mark.parametrize(("body", "kw", "reason"), [
    ({"choices": []}, {}, "empty"),
    (_body(""), {}, "empty"),
    (_body("partial answ", finish="length"), {}, "truncated"),
    (_body("x", finish="content_filter"), {}, "filtered"),
    (_body("I'm sorry, but I can't help with that."), {}, "refusal"),
    (_body("As an AI language model, I cannot"), {}, "refusal"),
    (_body("maybe the second"), {"fmt": "choice"}, "format"),
    (_body("def f(:\n  pass"), {"fmt": "code"}, "format"),
    (_body("{not json"), {"fmt": "json"}, "format"),
    (_body('{"a": "x"}'), {"fmt": "json_schema", "schema": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}},
     "format"),
])
def test_structural_check_rejects(body: dict[str, object], kw: dict[str, object],
                                  reason: str) -> None:
    verdict = structural_check(body, **kw)  # type: ignore[arg-type]
    assert not verdict.passed and verdict.reason == reason


@pytest.mark.parametrize(("body", "kw"), [
    (_body("B"), {"fmt": "choice"}),
    (_body("```python\ndef f(x):\n    return x\n```"), {"fmt": "code"}),
    (_body('{"a": 1}'), {"fmt": "json_schema", "schema": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}),
    (_body(None, finish="tool_calls", tool_calls=[{"id": "1"}]), {}),
    (_body("A plain helpful answer."), {}),
])
def test_structural_check_accepts(body: dict[str, object], kw: dict[str, object]) -> None:
    assert structural_check(body, **kw).passed  # type: ignore[arg-type]


def test_answer_key_agreement() -> None:
    assert answer_key("B) the second", fmt="choice") == answer_key("B", fmt="choice") == "B"
    assert answer_key("Hello  World", fmt=None) == answer_key("hello world", fmt=None)


TEXTS = {
    "math": ["what is 2 plus 3", "compute 7 times 8", "add 10 and 12", "multiply 3 by 9",
             "what is 12 minus 5", "divide 20 by 4"],
    "code": ["write a python function to sort", "fix this javascript bug", "python code for csv",
             "write a function that reverses a list", "implement quicksort in python",
             "refactor this function"],
}


def test_classifier_trains_saves_loads(tmp_path: Path) -> None:
    texts = [t for ts in TEXTS.values() for t in ts]
    tasks = [k for k, ts in TEXTS.items() for _ in ts]
    clf = TaskClassifier.train(texts, tasks, vocab_size=200)
    assert clf.classify("write a python function to add numbers")[0] == "code"
    clf.save(tmp_path / "c.npz")
    loaded = TaskClassifier.load(tmp_path / "c.npz")
    assert loaded.tasks == ["code", "math"]
    started = time.perf_counter()
    for _ in range(100):
        assert loaded.classify("multiply 6 by 7 please")[0] == "math"
    assert time.perf_counter() - started < 5  # generous: the benchmark measures real latency
    with pytest.raises(ValueError):
        TaskClassifier.train(["a", "b"], ["x", "x"])


def test_scorer_learns_and_round_trips() -> None:
    examples = [Example("q", "A", "small", None, 1), Example("q", "I do not know", "small", None, 0)]
    examples = examples * 20 + [Example("q", "A", "small", 1.0, 1),
                                Example("q", "C", "small", 0.0, 0)] * 20
    scorer = CorrectnessScorer.train(examples, vocab_size=50)
    good = scorer.score("q", "A", "small", agreement=1.0)
    bad = scorer.score("q", "I do not know", "small", agreement=0.0)
    assert good > 0.5 > bad
    again = CorrectnessScorer.from_bytes(scorer.to_bytes())
    assert again.score("q", "A", "small", agreement=1.0) == pytest.approx(good, abs=1e-2)


def test_mean_logprob() -> None:
    from skinflint.routing.gates import mean_logprob

    body = {"choices": [{"logprobs": {"content": [{"token": "A", "logprob": -0.1},
                                                  {"token": ".", "logprob": -0.3}]}}]}
    assert mean_logprob(body) == pytest.approx(-0.2)
    assert mean_logprob({"choices": [{"logprobs": None}]}) is None
