"""The batch_map runner with its ``complete`` injected: the packed-format answerer of the fake
upstream answers in process, so the sizes, retries and statuses can be followed call by call."""

from __future__ import annotations

import json
from collections.abc import Sequence

from skinflint.batchmap import CallAnswer, CallFailed, PackedCall, run_batch_map, weigh
from skinflint.packing import PackSpec, parse_items
from skinflint.tokens import TokenCounter
from tests.fake_packed import PackedAnswerer, classify

TOKENS = TokenCounter()
INSTRUCTION = "Classify the sentiment."


class Answering:
    """A ``complete`` that answers with the packed-format answerer and keeps every call."""

    def __init__(self, answerer: PackedAnswerer, cost: float | None = 0.001) -> None:
        self.answerer = answerer
        self.cost = cost
        self.calls: list[PackedCall] = []

    async def __call__(self, call: PackedCall) -> CallAnswer:
        self.calls.append(call)
        text = self.answerer(call.body)
        usage = {"prompt_tokens": 10 * len(call.items), "completion_tokens": 3,
                 "total_tokens": 10 * len(call.items) + 3}
        return CallAnswer({"choices": [{"message": {"content": text}}], "usage": usage},
                          self.cost)


async def test_batches_stay_within_the_input_token_budget() -> None:
    short = [f"fine {i}" for i in range(30)]
    long = [" ".join(["a long and winding review"] * 40) + f" {i}" for i in range(6)]
    items = parse_items([*short, *long])
    spec = PackSpec("gpt-4o-mini", INSTRUCTION, max_input_tokens=500)
    complete = Answering(PackedAnswerer())
    result = await run_batch_map(items, spec, complete, tokens=TOKENS)
    assert result.outputs == [classify(t) for t in [*short, *long]]
    weights = {i.id: w for i, (w, _) in zip(items, weigh(items, spec, TOKENS), strict=True)}
    for call in complete.calls:
        assert sum(call.weights) <= 500 or len(call.items) == 1
        assert list(call.weights) == [weights[i.id] for i in call.items]
    sizes = [len(c.items) for c in complete.calls]
    assert sizes[0] == 30 and max(sizes[1:]) < 5  # many short items, few long ones per call
    assert result.calls == len(complete.calls)
    assert result.cost_usd is not None and abs(result.cost_usd - 0.001 * result.calls) < 1e-12
    assert result.usage["prompt_tokens"] == 10 * sum(sizes)


async def test_retries_are_marked_and_counted() -> None:
    complete = Answering(PackedAnswerer(drop=0.3, seed=5))
    texts = [f"item {i} bad" if i % 2 else f"item {i} good" for i in range(40)]
    result = await run_batch_map(parse_items(texts), PackSpec("gpt-4o-mini", INSTRUCTION,
                                                              max_items_per_call=20),
                                 complete, tokens=TOKENS)
    retried = {c.attempt for c in complete.calls}
    assert retried == {0, 1, 2}
    first = [c for c in complete.calls if c.attempt == 0]
    assert [len(c.items) for c in first] == [20, 20]
    assert all(len(c.items) <= 5 for c in complete.calls if c.attempt == 1)
    assert all(len(c.items) == 1 for c in complete.calls if c.attempt == 2)
    again = {i.id for c in complete.calls if c.attempt for i in c.items}
    for r in result.results:
        assert r.status == ("retried" if r.id in again and r.output is not None else
                            "error" if r.output is None else "ok")
    assert [r.output for r in result.results if r.status != "error"] == [
        classify(t) for t, r in zip(texts, result.results, strict=True) if r.status != "error"]


async def test_a_call_that_cannot_succeed_is_not_retried() -> None:
    calls: list[PackedCall] = []

    async def refused(call: PackedCall) -> CallAnswer:
        calls.append(call)
        raise CallFailed("budget 'daily' exceeded", retryable=False)

    result = await run_batch_map(parse_items(["a", "b"]), PackSpec("m", INSTRUCTION),
                                 refused, tokens=TOKENS)
    assert len(calls) == 1 and result.calls == 1
    assert [r.to_json() for r in result.results] == [
        {"id": str(i), "output": None, "status": "error", "error": "budget 'daily' exceeded"}
        for i in range(2)]
    assert result.cost_usd == 0.0


async def test_an_unknown_cost_makes_the_total_unknown() -> None:
    result = await run_batch_map(parse_items(["a"]), PackSpec("m", INSTRUCTION),
                                 Answering(PackedAnswerer(), cost=None),
                                 tokens=TOKENS)
    assert result.cost_usd is None and result.results[0].status == "ok"


class DictCache:
    """An item cache kept in a dict (the gateway's is the response cache's store)."""

    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}

    async def get(self, digests: Sequence[str]) -> list[bytes | None]:
        return [self.entries.get(d) for d in digests]

    async def put(self, entries: Sequence[tuple[str, bytes]]) -> None:
        self.entries.update(entries)


async def test_cached_items_are_not_sent_and_errors_are_not_cached() -> None:
    cache = DictCache()
    complete = Answering(PackedAnswerer())
    spec = PackSpec("gpt-4o-mini", INSTRUCTION)
    first = await run_batch_map(parse_items(["good", "[[item:garbage]]", "bad"]), spec,
                                complete, tokens=TOKENS, cache=cache)
    assert [r.status for r in first.results] == ["ok", "error", "ok"]
    assert len(cache.entries) == 2
    assert {json.loads(v)["output"] for v in cache.entries.values()} == {"positive", "negative"}
    complete.calls.clear()
    second = await run_batch_map(parse_items(["bad", "new and poor", "good"]), spec, complete,
                                 tokens=TOKENS, cache=cache)
    assert [[i.input for i in c.items] for c in complete.calls] == [["new and poor"]]
    assert second.outputs == ["negative", "negative", "positive"]
    assert second.calls == 1
