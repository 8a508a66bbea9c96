"""The fake upstream's answerer for batch_map's packed prompt format."""

from __future__ import annotations

import json

import openai

from skinflint.packing import PackSpec, packed_body, parse_answer, parse_items
from tests.fake_packed import ALWAYS_MALFORMED, PackedAnswerer, classify, packed_items
from tests.fake_upstream import FakeUpstream

ITEMS = parse_items([f"review {i}: " + ("awful" if i % 2 else "lovely") for i in range(400)])


def _body(n: int = 400) -> dict[str, object]:
    return packed_body(PackSpec("gpt-4o-mini", "Classify."), ITEMS[:n])


def test_it_answers_only_packed_prompts() -> None:
    answerer = PackedAnswerer()
    assert answerer({"model": "m", "messages": [{"role": "user", "content": "[]"}]}) is None
    assert packed_items(_body(3)) == [{"id": str(i), "input": ITEMS[i].input} for i in range(3)]
    text = answerer(_body(3))
    assert text is not None
    assert json.loads(text) == {"results": [
        {"id": str(i), "output": classify(ITEMS[i].input)} for i in range(3)]}


def test_faults_hit_about_their_fraction_and_are_reproducible() -> None:
    runs = []
    for _ in range(2):
        answerer = PackedAnswerer(drop=0.1, duplicate=0.05, malformed=0.05, seed=3)
        text = answerer(_body())
        assert text is not None
        runs.append(text)
        parsed = parse_answer({"choices": [{"message": {"content": text}}]}, ITEMS)
        assert 40 - 15 <= answerer.faults["drop"] <= 40 + 15
        assert 0 < answerer.faults["duplicate"] < 45 and 0 < answerer.faults["malformed"] < 45
        assert len(parsed.problems) == sum(answerer.faults.values())
    assert runs[0] == runs[1]
    # asked again, an item gets a fresh draw: most faults are not repeated
    again = answerer(_body())
    assert again is not None and again != runs[1]


def test_it_answers_through_the_fake_upstream(fake: FakeUpstream) -> None:
    fake.add_answerer(PackedAnswerer())
    body = packed_body(PackSpec("gpt-4o-mini", "Classify."),
                       parse_items(["fine", f"{ALWAYS_MALFORMED} x"]))
    with openai.OpenAI(base_url=fake.base_url, api_key="k", max_retries=0) as client:
        reply = client.chat.completions.create(**body)  # type: ignore[call-overload]
    assert json.loads(reply.choices[0].message.content or "") == {
        "results": [{"id": "0", "output": "positive"}, {"id": "1"}]}
