"""The condenser, the compress stage's cheap-model service: rewrites in the background, one per
prompt and a bounded number at once, shared between replicas through the response-cache store;
failures remembered for a while; summaries kept by content; every call one ledger row."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from skinflint.errors import UpstreamStatusError
from skinflint.metrics import Metrics
from skinflint.models import COMPRESS_CALL, Completion, UpstreamRequest, is_attempt
from skinflint.pipeline.condense import TAG, Condenser, Job
from skinflint.pipeline.context import RequestContext, Target
from skinflint.pipeline.upstream import ProviderUpstream
from skinflint.pricing import PriceCatalog
from skinflint.storage.ledger import MemoryLedger
from skinflint.storage.redis_cache import RedisCacheStore
from tests.pipeline.parts import Scripted, answer, chat, context

PROMPT = " ".join(f"Rule {i}: always answer politely and cite the manual." for i in range(20))
SHORT = "Be polite; cite the manual."
MINI = Target("mini", "p", "mini-1")


def _words(text: str) -> int:
    return len(text.split())


class Model(Scripted):
    """A provider answering ``text`` (or failing with ``failure``), after ``gate`` opens."""

    def __init__(self, text: str = SHORT) -> None:
        super().__init__("p")
        self.text = text
        self.finish = "stop"
        self.failure: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def complete(self, request: UpstreamRequest) -> Completion:
        self.requests.append(request)
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return Completion(answer(self.text, model="mini-1", usage=(300, 8), finish=self.finish))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _condenser(model: Model, *, store: Any = None, **options: Any) -> tuple[Condenser,
                                                                             MemoryLedger]:
    ledger = MemoryLedger()
    upstream = ProviderUpstream({"p": model}, {"p": 5.0}, lambda name: (MINI,))
    condenser = Condenser(upstream, ledger=ledger, store=store, metrics=Metrics(),
                          catalog=PriceCatalog({"mini": (1.0, 2.0, None)}), **options)
    return condenser, ledger


def _ctx(request_id: str = "r") -> RequestContext:
    ctx = context(chat(model="big"), feature="docs")
    ctx.request_id = request_id
    return ctx


async def _rewrite(condenser: Condenser, text: str = PROMPT, request_id: str = "r") -> str | None:
    return condenser.rewritten(_ctx(request_id), text, "mini", 10, _words)


async def test_the_first_request_goes_on_and_the_rewrite_is_made_once_for_later_ones() -> None:
    model = Model()
    model.gate = asyncio.Event()
    condenser, ledger = _condenser(model)
    assert [await _rewrite(condenser, request_id=f"r{i}") for i in range(3)] == [None] * 3
    model.gate.set()
    await condenser.drain()
    assert await _rewrite(condenser) == SHORT
    assert len(model.requests) == 1
    sent = model.requests[0].body
    assert sent["messages"][-1] == {"role": "user", "content": PROMPT}
    assert sent["max_tokens"] == _words(PROMPT) and sent["model"] == "mini-1"
    [row] = ledger.records
    assert (row.request_id, row.strategy, row.feature) == ("r0.rewrite", COMPRESS_CALL, "docs")
    assert row.cost_usd == pytest.approx((300 * 1.0 + 8 * 2.0) / 1e6) and is_attempt(row.strategy)


async def test_a_prompt_under_min_tokens_is_left_alone() -> None:
    model = Model()
    condenser, _ = _condenser(model)
    assert condenser.rewritten(_ctx(), "short prompt", "mini", 10, _words) is None
    await condenser.drain()
    assert model.requests == []


async def test_rewrites_in_flight_are_bounded() -> None:
    model = Model()
    model.gate = asyncio.Event()
    condenser, _ = _condenser(model, max_in_flight=2)
    prompts = [f"{PROMPT} Variant {i}." for i in range(3)]
    for p in prompts:
        await _rewrite(condenser, p)
    await asyncio.sleep(0.05)  # the background calls reach the provider
    assert len(model.requests) == 2
    model.gate.set()
    await condenser.drain()
    await _rewrite(condenser, prompts[2])  # seen again once there is room: started
    await condenser.drain()
    assert len(model.requests) == 3 and await _rewrite(condenser, prompts[2]) == SHORT


@pytest.mark.parametrize("failure", ["status", "longer", "empty", "cut"])
async def test_a_bad_rewrite_is_remembered_and_tried_again_only_later(failure: str) -> None:
    model = Model()
    if failure == "status":
        model.failure = UpstreamStatusError(500, "boom", provider="p")
    model.text = {"longer": PROMPT + " And more.", "empty": "  "}.get(failure, SHORT)
    model.finish = "length" if failure == "cut" else "stop"
    clock = Clock()
    condenser, ledger = _condenser(model, clock=clock, retry_after=60)
    for _ in range(3):
        assert await _rewrite(condenser) is None
        await condenser.drain()
    assert len(model.requests) == 1 and len(ledger.records) == 1
    assert ledger.records[0].status == (500 if failure == "status" else 200)
    clock.now += 61
    model.failure, model.text, model.finish = None, SHORT, "stop"
    await _rewrite(condenser)
    await condenser.drain()
    assert len(model.requests) == 2 and await _rewrite(condenser) == SHORT


async def test_replicas_share_rewrites_and_summaries_through_the_store(redis_url: str) -> None:
    stores = [await RedisCacheStore.create(redis_url) for _ in range(2)]
    try:
        first, second = Model(), Model()
        a, _ = _condenser(first, store=stores[0])
        b, b_ledger = _condenser(second, store=stores[1])
        await _rewrite(a)
        await a.drain()
        job = Job("summary.context", "mini", PROMPT, 50)
        assert await a.summary(_ctx(), job, _words, 1.0) == SHORT
        await _rewrite(b)  # not in b's memory: looked up in the store, in the background
        await b.drain()
        assert await _rewrite(b) == SHORT
        assert await b.summary(_ctx(), job, _words, 1.0) == SHORT
        assert len(first.requests) == 2 and second.requests == [] and b_ledger.records == []
        assert await stores[0].invalidate_tags([TAG]) == 2
    finally:
        for store in stores:
            await store.close()


async def test_a_summary_is_kept_by_content_and_the_memory_is_bounded() -> None:
    model = Model()
    condenser, ledger = _condenser(model, memory=1)
    one, two = (Job("summary.history", "mini", f"{PROMPT} {n}", 40) for n in ("one", "two"))
    assert await condenser.summary(_ctx(), one, _words, 1.0) == SHORT
    assert await condenser.summary(_ctx(), one, _words, 1.0) == SHORT
    assert len(model.requests) == 1 and model.requests[0].body["max_tokens"] == 40
    await condenser.summary(_ctx(), two, _words, 1.0)
    await condenser.summary(_ctx(), one, _words, 1.0)  # pushed out by ``two``: asked again
    assert len(model.requests) == 3
    assert [r.request_id for r in ledger.records] == ["r.summary.history"] * 3


async def test_a_slow_summary_is_given_up_and_its_call_still_ledgered() -> None:
    model = Model()
    model.gate = asyncio.Event()
    condenser, ledger = _condenser(model)
    job = Job("summary.context", "mini", PROMPT, 50)
    assert await condenser.summary(_ctx(), job, _words, 0.05) is None
    [row] = ledger.records
    assert (row.status, row.error_type, row.cost_usd) == (499, "cancelled", None)


async def test_draining_cancels_what_does_not_finish_in_time_and_ledgers_it() -> None:
    model = Model()
    model.gate = asyncio.Event()
    condenser, ledger = _condenser(model)
    await _rewrite(condenser)
    await condenser.drain(timeout=0.05)
    assert [r.status for r in ledger.records] == [499]


async def test_an_unreachable_store_only_costs_the_sharing() -> None:
    import redis.asyncio as aioredis

    store = RedisCacheStore(aioredis.from_url("redis://127.0.0.1:9", socket_connect_timeout=0.2))
    try:
        model = Model()
        condenser, ledger = _condenser(model, store=store)
        await _rewrite(condenser)
        await condenser.drain()
        assert await _rewrite(condenser) == SHORT and len(ledger.records) == 1
    finally:
        await store.close()


async def test_requests_needing_the_same_summary_at_once_share_one_call() -> None:
    model = Model()
    model.gate = asyncio.Event()
    condenser, ledger = _condenser(model)
    job = Job("summary.context", "mini", PROMPT, 50)
    waiting = [asyncio.ensure_future(condenser.summary(_ctx(f"r{i}"), job, _words, 5.0))
               for i in range(3)]
    await asyncio.sleep(0.01)
    model.gate.set()
    assert await asyncio.gather(*waiting) == [SHORT] * 3
    assert len(model.requests) == 1
    assert [r.request_id for r in ledger.records] == ["r0.summary.context"]


async def test_a_shared_summary_outlives_a_waiter_that_gave_up() -> None:
    """The first request stops waiting; the call goes on for the second, and its answer is
    kept for the requests after them."""
    model = Model()
    model.gate = asyncio.Event()
    condenser, ledger = _condenser(model)
    job = Job("summary.context", "mini", PROMPT, 50)
    patient = asyncio.ensure_future(condenser.summary(_ctx("b"), job, _words, 5.0))
    await asyncio.sleep(0)
    assert await condenser.summary(_ctx("a"), job, _words, 0.02) is None
    model.gate.set()
    assert await patient == SHORT
    assert await condenser.summary(_ctx("c"), job, _words, 0.02) == SHORT
    assert len(model.requests) == 1
    assert [(r.request_id, r.status) for r in ledger.records] == [("b.summary.context", 200)]


async def test_draining_ends_a_summary_without_failing_its_request() -> None:
    model = Model()
    model.gate = asyncio.Event()
    condenser, ledger = _condenser(model)
    job = Job("summary.context", "mini", PROMPT, 50)
    waiting = asyncio.ensure_future(condenser.summary(_ctx(), job, _words, 5.0))
    await asyncio.sleep(0.01)
    await condenser.drain(timeout=0.01)
    assert await waiting is None
    assert [r.status for r in ledger.records] == [499]
