"""The compression functions select exactly what they selected before their speed work (the
reference copy in tests/reference_compression.py), on random long prompts: paragraphs, worked
examples and their scores, the examples kept, the context kept and the history kept."""

from __future__ import annotations

import random
from typing import Any

import pytest

from skinflint import compression as cx
from skinflint.tokens import TokenCounter
from tests import reference_compression as ref

JSON = dict[str, Any]
MODEL = "gpt-4o"
TOKENS = TokenCounter()
_VOCABULARY = ("the planet gas plants sunlight energy water moves force river wind boat north east "
         "why how which what is of and metal liquid room temperature moon orbit cell sugar "
         "Oxygen Hydrogen 42 3.5 x-ray e.g. don't it's résumé naïve 中文")
WORDS = _VOCABULARY.split(" ")
TEMPLATE = 'Print only a single choice from "A" or "B" or "C" or "D" without explanation.'


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))) + rng.choice(".?!")


def _paragraph(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.05:
        return "```python\nx = 1\n\ny = [x]  \n```"
    if kind < 0.08:
        return '{"a": [1, 2], "b": "two"}'
    if kind < 0.10:
        return "[not json}"
    if kind < 0.25:
        return " ".join(_sentence(rng) for _ in range(rng.randint(8, 40)))  # long: sentences
    return "\n".join(_sentence(rng) for _ in range(rng.randint(1, 4)))


def _example(rng: random.Random, answer: bool = True) -> str:
    body = f"{_sentence(rng)}\nA) {rng.choice(WORDS)}\nB) {rng.choice(WORDS)}\n{TEMPLATE}\nAnswer:"
    return f"{body}\n{rng.choice('ABCD')}" if answer else body


def _document(rng: random.Random, size: int) -> str:
    parts = [_paragraph(rng) for _ in range(size)]
    seps = [rng.choice(["\n\n", "\n\n\n", "\n \n", "\n\n  "]) for _ in parts]
    return "".join(p + s for p, s in zip(parts, seps, strict=True)) + _sentence(rng)


def _few_shot(rng: random.Random, size: int) -> str:
    header = ["Answer the questions."] if rng.random() < 0.5 else []
    shots = [_example(rng) if rng.random() > 0.05 else _paragraph(rng) for _ in range(size)]
    return "\n\n".join([*header, *header, *shots, _example(rng, answer=False)])


def _conversation(rng: random.Random, turns: int) -> list[JSON]:
    messages: list[JSON] = [{"role": "system", "content": "Be brief.  \n\n\n\nBe brief."}]
    for _ in range(turns):
        messages.append({"role": "user", "content": _document(rng, rng.randint(1, 6))})
        if rng.random() < 0.2:
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}]})
            messages.append({"role": "tool", "tool_call_id": "t", "content": "42"})
        messages.append({"role": "assistant", "content": _sentence(rng)})
    messages.append({"role": "user", "content": _few_shot(rng, rng.randint(2, 12))})
    return messages


def _count(text: str) -> int:
    return TOKENS.count_text(MODEL, text)


def _within(text: str, limit: int) -> int:
    return TOKENS.count_text_within(MODEL, text, limit)


def _messages(messages: list[JSON]) -> int:
    return TOKENS.count_messages(MODEL, messages)


def _spans(spans: list[Any]) -> list[tuple[int, int, int, bool]]:
    return [(s.start, s.end, s.sep, s.protected) for s in spans]


@pytest.mark.parametrize("seed", range(6))
def test_paragraphs_and_examples_are_found_as_before(seed: int) -> None:
    rng = random.Random(seed)
    for size in (5, 40, 120):
        text = _few_shot(rng, size)
        assert _spans(cx.paragraphs(text)) == _spans(ref.paragraphs(text))
        messages = [{"role": "user", "content": text}]
        found, before = cx.find_examples(messages), ref.find_examples(messages)
        assert [(e.question, e.texts, e.pinned, e.pairs, e.message, e.blocks) for e in found] \
            == [(e.question, e.texts, e.pinned, e.pairs, e.message, e.blocks) for e in before]
        for examples in found:
            scores = cx.lexical_similarities(examples.question, examples.texts)
            assert scores == ref.lexical_similarities(examples.question, examples.texts)
            for keep in (1, 2, 5):
                assert (cx.keep_examples(messages, examples, scores, keep)
                        == ref.keep_examples(messages, examples, scores, keep))


@pytest.mark.parametrize("seed", range(6))
def test_the_context_kept_is_the_same_as_before(seed: int) -> None:
    rng = random.Random(100 + seed)
    for size in (3, 30, 150):
        messages = [{"role": "system", "content": "Use the context."},
                    {"role": "user", "content": _document(rng, size)}]
        for budget in (20, 200, 500, 2000, 100_000):
            cut = cx.trim_context(messages, budget, _count, _within)
            before = ref.trim_context(messages, budget, _count)
            assert cut == before and (cut is messages) == (before is messages)


@pytest.mark.parametrize("seed", range(6))
def test_the_history_kept_is_the_same_as_before(seed: int) -> None:
    rng = random.Random(200 + seed)
    for turns in (0, 1, 4, 20):
        messages = _conversation(rng, turns)
        total = _messages(messages)
        for budget in (10, total // 4, total // 2, total - 1, total, total + 50):
            cut = cx.trim_history(messages, budget, _messages)
            before = ref.trim_history(messages, budget, _messages)
            assert cut == before and (cut is messages) == (before is messages)


@pytest.mark.parametrize("seed", range(3))
def test_system_prompts_are_normalised_as_before(seed: int) -> None:
    rng = random.Random(300 + seed)
    for size in (2, 20, 80):
        text = _document(rng, size).replace(".\n", ".   \n")
        messages = [{"role": "system", "content": f"{text}\n\n\n{text}"},
                    {"role": "developer", "content": text}, {"role": "user", "content": "Hi"}]
        assert cx.normalize_system(messages) == ref.normalize_system(messages)


def test_remembered_texts_score_and_split_as_before() -> None:
    """Word bags and line sets are remembered by text: a prompt sent again, or another prompt
    re-sending the same examples, is scored and split exactly as the first time."""
    rng = random.Random(400)
    cx.clear_caches()
    shots = [_example(rng) for _ in range(30)]
    for _ in range(3):  # the same examples, a new question each time
        text = "\n\n".join([*rng.sample(shots, 20), _example(rng, answer=False)])
        messages = [{"role": "user", "content": text}]
        found, before = cx.find_examples(messages), ref.find_examples(messages)
        assert [(e.question, e.texts, e.blocks) for e in found] \
            == [(e.question, e.texts, e.blocks) for e in before]
        for examples in found:
            assert (cx.lexical_similarities(examples.question, examples.texts)
                    == ref.lexical_similarities(examples.question, examples.texts))
    assert cx._remembered_bag.info().hits > 0
    assert cx._remembered_lines.info().hits > 0


def test_what_is_remembered_is_bounded() -> None:
    cx.clear_caches()
    limit = cx._REMEMBERED
    texts = [f"text number {i} about the planet" for i in range(limit + 50)]
    for _ in range(3):  # seen once, then kept, then found
        assert (cx.lexical_similarities("planet", texts)
                == ref.lexical_similarities("planet", texts))
    # texts whose hashes share a slot of the seen-once table push each other out of it
    assert limit // 2 < cx._remembered_bag.info().currsize <= limit
    long = "planet orbit " * cx._REMEMBER_CHARS  # past the length remembered: split each time
    cx.clear_caches()
    for _ in range(3):
        assert (cx.lexical_similarities("planet", [long])
                == ref.lexical_similarities("planet", [long]))
    assert cx._remembered_bag.info().currsize == 0
    cx.clear_caches()
    assert cx._remembered_bag.info().currsize == 0


def _found(messages: list[JSON], module: Any) -> list[tuple[Any, ...]]:
    return [(e.question, e.texts, e.pinned, e.pairs, e.message, e.blocks)
            for e in module.find_examples(messages)]


def test_a_beginning_sent_again_is_split_as_before() -> None:
    """A prompt whose worked examples come back with something new after them (a question,
    a few paragraphs, code, JSON, lines that make another template win) is split from its
    remembered beginning: the same paragraphs, examples and scores as splitting it whole."""
    rng = random.Random(500)
    other = "Think step by step first."
    header = "Answer the questions below."
    tails = [
        lambda: _example(rng, answer=False),
        lambda: f"{_paragraph(rng)}\n\n{_example(rng, answer=False)}",
        lambda: '{"question": "which one?"}\n\n' + _example(rng, answer=False),
        lambda: f"{other}\n{_sentence(rng)}\n\n{other}\n\n{other}\n\n{other}",  # a new winner
        lambda: "```\ncode\n\nmore\n```\n\n" + _example(rng, answer=False),  # fenced: whole
        lambda: _sentence(rng),  # no template line in it
        lambda: f"  {_example(rng, answer=False)}",  # after blank space
        lambda: f"{header}\n\n{_example(rng, answer=False)}",  # the header, once more
        lambda: header,  # the same, after the question
    ]
    hits = bagged = 0
    for trial in range(16):
        cx.clear_caches()
        shots = [_example(rng) if rng.random() > 0.1 else _paragraph(rng)
                 for _ in range(rng.randint(2, 30))]
        if trial % 2:
            shots.insert(0, header)
        if trial % 4 == 0:
            shots += [f"{other}\n{_sentence(rng)}"] * 2  # one short of being the template
        seps = [rng.choice(["\n\n", "\n\n\n", "\n \n", "\n\n  ", "\n\t\n"]) for _ in shots]
        head = "".join(s + sep for s, sep in zip(shots, seps, strict=True))
        for _ in range(4):
            for tail in tails:
                messages = [{"role": "user", "content": head + tail()}]
                spans = _spans(cx._structure(messages[0]["content"])[0])
                assert spans == _spans(ref.paragraphs(messages[0]["content"]))
                found = _found(messages, cx)
                assert found == _found(messages, ref)
                for examples in cx.find_examples(messages):
                    before = ref.lexical_similarities(examples.question, examples.texts)
                    assert (cx.lexical_similarities(examples.question, examples.texts)
                            == before)
                    assert (cx.lexical_similarities(examples.question, examples.texts,
                                                    examples.bags) == before)
                    bagged += examples.bags is not None
        hits += cx._remembered_heads.hits
    assert hits > 16 * 4 * 3  # most prompts were split from their remembered beginning
    assert bagged > 16 * 4 * 3  # and their examples' word bags kept with it
    cx.clear_caches()


def test_documents_sent_again_are_trimmed_as_before() -> None:
    """The same documents before a new question each time: cut from their remembered
    beginning, the context kept is the same as cutting the whole."""
    rng = random.Random(600)
    hits = 0
    for _ in range(6):
        cx.clear_caches()
        document = _document(rng, rng.randint(3, 60))
        head = document[:document.rfind("\n\n") + 2]
        for _ in range(5):
            question = rng.choice([_sentence(rng), f"{_paragraph(rng)}\n\n{_sentence(rng)}"])
            messages = [{"role": "user", "content": head + question}]
            for budget in (20, 200, 2000):
                cut = cx.trim_context(messages, budget, _count, _within)
                before = ref.trim_context(messages, budget, _count)
                assert cut == before and (cut is messages) == (before is messages)
        hits += cx._remembered_heads.hits
    assert hits >= 6  # most documents were cut from their remembered beginning
    cx.clear_caches()


def test_a_beginning_with_the_same_ends_is_not_taken_for_another() -> None:
    """Beginnings are found by their length and ends, then compared whole."""
    rng = random.Random(700)
    cx.clear_caches()
    ends = [_example(rng) for _ in range(3)]
    shared = _example(rng)
    one, two = f"Which {shared}", f"Whose {shared}"  # the same length, other words
    heads = ["\n\n".join([*ends, middle, *ends]) + "\n\n" for middle in (one, two)]
    question = _example(rng, answer=False)
    for head in (heads[0], heads[0], heads[0], heads[1]):
        messages = [{"role": "user", "content": head + question}]
        assert _found(messages, cx) == _found(messages, ref)
        for examples in cx.find_examples(messages):
            assert (cx.lexical_similarities(examples.question, examples.texts, examples.bags)
                    == ref.lexical_similarities(examples.question, examples.texts))
    assert cx._remembered_heads.hits > 0
    cx.clear_caches()
