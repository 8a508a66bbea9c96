"""Stage 6, compress: each strategy, what it must never touch, the guard's say, and the cost of
leaving it unconfigured."""

from __future__ import annotations

import json
from typing import Any

import pytest

from skinflint.config import CompressionPolicy, Scoped, settings_from_dict
from skinflint.embed import load_embedder
from skinflint.errors import ConfigError
from skinflint.metrics import Metrics
from skinflint.pipeline.compress import Compress
from skinflint.pipeline.context import RequestContext
from skinflint.pipeline.embedding import GuardedEmbedder
from skinflint.tokens import TokenCounter
from tests.pipeline.parts import Recorder, context

JSON = dict[str, Any]
TEMPLATE = 'Print only a single choice from "A" or "B" or "C" or "D" without explanation.'
TOKENS = TokenCounter()


def _block(question: str, answer: str = "") -> str:
    return f"{question}\nA) one\nB) two\nC) three\nD) four\n{TEMPLATE}\nAnswer:" + (
        f"\n{answer}" if answer else "")


EXAMPLES = [
    _block("Which planet is closest to the Sun?", "A"),
    _block("What gas do plants absorb from the air for photosynthesis?", "B"),
    _block("Which metal is liquid at room temperature?", "C"),
    _block("Which planet has the largest moons in the solar system?", "D"),
    _block("How do plants turn sunlight into sugar in photosynthesis?", "A"),
]
QUESTION = _block("Which gas do plants release during photosynthesis in sunlight?")
FIVE_SHOT = "\n\n".join([*EXAMPLES, QUESTION])


def _stage(policy: JSON, *, allowed: Any = None, metrics: Metrics | None = None) -> Compress:
    scoped = Scoped[CompressionPolicy].model_validate({"features": {"quiz": policy}})
    return Compress(scoped, TOKENS, metrics or Metrics(), allowed=allowed)


async def _run(stage: Compress, messages: list[JSON]) -> tuple[RequestContext, list[JSON]]:
    ctx = context({"model": "gpt-4o", "messages": messages}, feature="quiz")
    nxt = Recorder()
    await stage(ctx, nxt)
    assert nxt.seen == [ctx]
    sent: list[JSON] = nxt.seen[0].body["messages"]
    return ctx, sent


async def test_few_shot_blocks_keep_the_two_closest_and_the_question_byte_identical() -> None:
    original = [{"role": "user", "content": FIVE_SHOT}]
    ctx, sent = await _run(_stage({"few_shot": {"keep": 2}}), original)
    text = sent[0]["content"]
    assert text.endswith(QUESTION)
    kept = [e for e in EXAMPLES if e in text]
    assert kept == [EXAMPLES[1], EXAMPLES[4]]  # the two about plants and photosynthesis
    assert text == f"{EXAMPLES[1]}\n\n{EXAMPLES[4]}\n\n{QUESTION}"
    assert ctx.compression is not None and ctx.compression.strategies == ("few_shot",)
    assert ctx.compression.original_body["messages"] == original
    assert ctx.compression.tokens_removed == (
        TOKENS.count_messages("gpt-4o", original) - TOKENS.count_messages("gpt-4o", sent))
    assert ctx.compression.tokens_removed > 50
    assert ctx.route_header == "gpt-4o;compressed=few_shot"


async def test_few_shot_message_pairs_keep_the_closest_pairs() -> None:
    pairs: list[JSON] = []
    for q, a in [("What is the capital of France?", "Paris"),
                 ("How many legs has a spider?", "Eight"),
                 ("What is the capital of Italy?", "Rome"),
                 ("What colour is the sky?", "Blue")]:
        pairs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    system = {"role": "system", "content": "Answer in one word."}
    last = {"role": "user", "content": "What is the capital of Spain?"}
    _, sent = await _run(_stage({"few_shot": {"keep": 2}}), [system, *pairs, last])
    assert [m["content"] for m in sent] == [
        "Answer in one word.", "What is the capital of France?", "Paris",
        "What is the capital of Italy?", "Rome", "What is the capital of Spain?"]
    assert sent[-1] is last


async def test_examples_holding_code_are_never_dropped() -> None:
    code = "Which planet?\n```python\nprint('planet')\n```\n" + TEMPLATE + "\nAnswer:\nB"
    text = "\n\n".join([code, *EXAMPLES, QUESTION])
    _, sent = await _run(_stage({"few_shot": {"keep": 1}}), [{"role": "user", "content": text}])
    assert sent[0]["content"].startswith(code + "\n\n")
    assert sent[0]["content"].endswith(QUESTION)
    assert len(sent[0]["content"]) < len(text)


async def test_system_prompt_whitespace_and_repeated_paragraphs() -> None:
    fenced = "```json\n{\"a\":   1}\n\n\n```"
    prompt = f"You are helpful.   \n\n\n\nBe brief.\n\nYou are helpful.\n\n{fenced}\n"
    messages = [{"role": "system", "content": prompt},
                {"role": "system", "content": prompt},
                {"role": "user", "content": "hi   \n\n\n\nthere"}]
    ctx, sent = await _run(_stage({}), messages)
    assert sent == [{"role": "system", "content": f"You are helpful.\n\nBe brief.\n\n{fenced}"},
                    messages[2]]
    assert ctx.compression is not None and ctx.compression.strategies == ("system_prompt",)
    assert ctx.compression.tokens_removed > 0


async def test_a_json_system_prompt_and_tool_definitions_are_left_alone() -> None:
    prompt = json.dumps({"rules": ["a", "b"], "tone": "dry"}, indent=4)
    tools = [{"type": "function", "function": {"name": "f", "description": "x   \n\n\n y"}}]
    ctx = context({"model": "m", "tools": tools, "messages": [
        {"role": "system", "content": prompt}, {"role": "user", "content": "hi"}]},
        feature="quiz")
    nxt = Recorder()
    await _stage({})(ctx, nxt)
    assert ctx.compression is None and ctx.body["messages"][0]["content"] == prompt
    assert ctx.body["tools"] is tools


def _document() -> tuple[str, str]:
    filler = [f"Paragraph {i} talks about the weather, the harbour and old ships. " * 6
              for i in range(30)]
    filler[7] = "The warranty on the blue kettle lasts two years from purchase. " * 3
    data = '{"order": 42, "items": ["kettle"]}'
    question = "How long is the warranty on the blue kettle?"
    return "\n\n".join([*filler[:20], data, *filler[20:], question]), question


async def test_context_keeps_relevant_chunks_data_and_question_within_the_budget() -> None:
    text, question = _document()
    stage = _stage({"context": {"max_tokens": 200}, "system_prompt": {"normalize": False}})
    ctx, sent = await _run(stage, [{"role": "user", "content": text}])
    trimmed = sent[0]["content"]
    assert trimmed.endswith("\n\n" + question)
    assert "warranty on the blue kettle lasts two years" in trimmed
    assert '{"order": 42, "items": ["kettle"]}' in trimmed
    assert TOKENS.count_text("gpt-4o", trimmed) <= 210
    assert TOKENS.count_text("gpt-4o", text) > 1000
    assert ctx.compression is not None and ctx.compression.strategies == ("context",)
    assert ctx.compression.tokens_removed == (
        TOKENS.count_messages("gpt-4o", [{"role": "user", "content": text}])
        - TOKENS.count_messages("gpt-4o", sent))


async def test_context_cuts_a_long_paragraph_into_sentences() -> None:
    noise = " ".join(f"Sentence {i} is about harbours and ships." for i in range(300))
    text = (f"{noise} The kettle warranty lasts two years. {noise}\n\n"
            "How long is the kettle warranty?")
    _, sent = await _run(_stage({"context": {"max_tokens": 60}}),
                         [{"role": "user", "content": text}])
    trimmed = sent[0]["content"]
    assert "The kettle warranty lasts two years." in trimmed
    assert trimmed.endswith("\n\nHow long is the kettle warranty?")
    assert TOKENS.count_text("gpt-4o", trimmed) <= 60


async def test_context_below_the_budget_is_untouched() -> None:
    text, _ = _document()
    ctx, sent = await _run(_stage({"context": {"max_tokens": 100_000}}),
                           [{"role": "user", "content": text}])
    assert ctx.compression is None and sent[0]["content"] == text


def _conversation() -> list[JSON]:
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    long = "Tell me more about the history of the harbour and its ships. " * 20
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": long},
        {"role": "assistant", "content": long},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"sky": "grey"}'},
        {"role": "assistant", "content": "Grey."},
        {"role": "user", "content": "And tomorrow?"},
    ]


async def test_history_drops_oldest_turns_and_keeps_tool_pairs_together() -> None:
    messages = _conversation()
    ctx, sent = await _run(_stage({"history": {"max_tokens": 120}}), messages)
    assert sent == [messages[0], *messages[3:]]
    assert ctx.compression is not None and ctx.compression.strategies == ("history",)
    assert ctx.compression.tokens_removed == (
        TOKENS.count_messages("gpt-4o", messages) - TOKENS.count_messages("gpt-4o", sent))
    ctx, sent = await _run(_stage({"history": {"max_tokens": 30}}), messages)
    assert sent == [messages[0], messages[7]]  # the tool call went with its result


async def test_the_guard_can_switch_a_strategy_off() -> None:
    asked: list[tuple[str, str]] = []

    def allowed(feature: str, strategy: str) -> bool:
        asked.append((feature, strategy))
        return strategy != "few_shot"

    ctx, sent = await _run(_stage({"few_shot": {"keep": 2}}, allowed=allowed),
                           [{"role": "user", "content": FIVE_SHOT}])
    assert sent[0]["content"] == FIVE_SHOT and ctx.compression is None
    assert ("quiz", "few_shot") in asked


async def test_tokens_saved_are_counted_per_strategy() -> None:
    metrics = Metrics()
    await _run(_stage({"few_shot": {"keep": 2}}, metrics=metrics),
               [{"role": "user", "content": FIVE_SHOT}])
    saved = metrics.registry.get_sample_value(
        "skinflint_compression_tokens_saved_total", {"strategy": "few_shot"})
    assert saved is not None and saved > 50


async def test_unconfigured_the_stage_is_disabled_and_other_features_untouched() -> None:
    assert not Compress(Scoped[CompressionPolicy](), TOKENS, Metrics()).enabled
    stage = _stage({"few_shot": {"keep": 2}})
    assert stage.enabled
    ctx = context({"model": "m", "messages": [{"role": "user", "content": FIVE_SHOT}]},
                  feature="other")
    await stage(ctx, Recorder())
    assert ctx.compression is None and ctx.body["messages"][0]["content"] == FIVE_SHOT


def test_configuration_names_and_checks_the_models_it_uses() -> None:
    base: JSON = {"providers": {"p": {"base_url": "http://127.0.0.1:1/v1"}},
                  "models": {"mini": {"provider": "p"}}}
    ok = settings_from_dict({**base, "compression": {"features": {"docs": {
        "context": {"max_tokens": 2000}, "system_prompt": {"rewrite_with": "mini"},
        "history": {"max_tokens": 4000},
        "shadow": {"sample": 0.05, "floor": 0.9, "judge": "similarity"}}}}}, env={})
    docs = ok.compression.find("docs", "x")
    assert docs is not None and docs.context is not None and docs.context.max_tokens == 2000
    with pytest.raises(ConfigError, match=r"compression\.features\.docs\.shadow\.judge"):
        settings_from_dict({**base, "compression": {"features": {"docs": {
            "shadow": {"judge": "nope"}}}}}, env={})
    with pytest.raises(ConfigError, match="keep"):
        settings_from_dict({**base, "compression": {"default": {"few_shot": {}}}}, env={})


async def test_few_shot_uses_the_local_embedder_once_loaded_else_word_bags() -> None:
    pairs: list[JSON] = []
    for q, a in [("How many legs does a spider have?", "Eight"),
                 ("What is the capital of France?", "Paris"),
                 ("What colour is grass?", "Green"),
                 ("Name the largest city in Japan.", "Tokyo")]:
        pairs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages = [*pairs, {"role": "user", "content": "Which city is Spain's seat of government?"}]
    scoped = Scoped[CompressionPolicy].model_validate({"default": {"few_shot": {"keep": 2}}})
    embedder = GuardedEmbedder(load_embedder("local"), Metrics())
    loaded: list[GuardedEmbedder | None] = [None]
    stage = Compress(scoped, TOKENS, Metrics(), embedder=lambda: loaded[0])
    try:
        _, by_words = await _run(stage, messages)  # not loaded yet: shared words decide
        loaded[0] = embedder
        _, by_meaning = await _run(stage, messages)
    finally:
        embedder.close()
    assert [m["content"] for m in by_words[:4:2]] == [
        "How many legs does a spider have?", "Name the largest city in Japan."]
    assert [m["content"] for m in by_meaning[:4:2]] == [
        "What is the capital of France?", "Name the largest city in Japan."]
