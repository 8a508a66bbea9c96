"""Stage 10, account, through its one call: the ledger rows, the costs and the cache writes, for
every way a request can end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import asdict
from typing import Any

import pytest

from skinflint.config import CacheConfig
from skinflint.errors import RequestError, UnknownModelError, UpstreamStatusError
from skinflint.interfaces import CacheEntry
from skinflint.metrics import Metrics
from skinflint.models import (
    CASCADE_ATTEMPT,
    CLIENT_LEFT,
    RETRIED_ATTEMPT,
    CacheBypass,
    LedgerRecord,
    StreamChunk,
    Usage,
)
from skinflint.pipeline.account import Account
from skinflint.pipeline.cache import ResponseCache
from skinflint.pipeline.context import (
    Attempt,
    CacheDecision,
    Costs,
    GateVerdict,
    Next,
    Reply,
    RequestContext,
    RouteDecision,
    Target,
)
from skinflint.pricing import PriceCatalog
from skinflint.storage.cache import MemoryCacheStore
from skinflint.storage.ledger import MemoryLedger
from skinflint.streaming import chunks_from_completion
from skinflint.tokens import TokenCounter
from tests.pipeline.parts import Recorder, answer, chat, context

# USD per million tokens: 1000 input and 500 output tokens cost 0.002 on small, 0.025 on big
PRICES: dict[str, tuple[float, float | None, float | None]] = {
    "small": (1.0, 2.0, None), "mid": (4.0, 8.0, None), "big": (10.0, 30.0, None),
    "emb": (0.1, None, None),
}
SMALL, MID, BIG = Target("small", "p", "s-1"), Target("mid", "p", "mid-1"), Target("big", "q", "b-1")
USED = (1000, 500)
TOKENS = TokenCounter()  # loads its tables once, at the first count


class CountingStore(MemoryCacheStore):
    """The in-memory store, counting its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    async def set(self, entry: CacheEntry) -> None:
        self.writes += 1
        await super().set(entry)


class Books:
    """An account stage over an in-memory ledger and response cache."""

    def __init__(self, *, baseline_model: str | None = None,
                 route_baselines: dict[str, str] | None = None) -> None:
        self.ledger, self.metrics, self.store = MemoryLedger(), Metrics(), CountingStore()
        self.cache = ResponseCache(CacheConfig(), self.store, self.metrics)
        self.account = Account(catalog=PriceCatalog(PRICES), tokens=TOKENS,
                               ledger=self.ledger, metrics=self.metrics, cache=self.cache,
                               baseline_model=baseline_model, route_baselines=route_baselines)

    async def __call__(self, ctx: RequestContext, next: Next) -> Reply:
        return await self.account(ctx, next)

    @property
    def row(self) -> LedgerRecord:
        [row] = self.ledger.records
        return row

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


def _fields(row: LedgerRecord, *names: str) -> dict[str, Any]:
    found = asdict(row)
    return {n: found[n] for n in names}


def _looked_up(cache: ResponseCache, reply: Reply) -> Next:
    """The stages between account and the provider: the exact-cache lookup (which serves a
    stored answer), then a provider that answers ``reply``."""

    async def rest(ctx: RequestContext) -> Reply:
        served = await cache.lookup(ctx)
        if served is not None:
            return served
        ctx.answered = ctx.targets[0]
        return reply

    return rest


def _asked(model: str = "small", **fields: Any) -> RequestContext:
    fields.setdefault("targets", (SMALL,))
    return context(chat(model=model, temperature=0), tenant="acme", feature="faq", user="u1",
                   **fields)


async def test_a_miss_is_priced_recorded_and_stored() -> None:
    books = Books()
    ctx = _asked(route=RouteDecision("small"), upstream_ms=12.5)
    body = answer("42", model="s-1-0125", usage=USED)
    reply = await books(ctx, _looked_up(books.cache, Reply(body=body, raw=b"raw")))
    assert reply.body == body and reply.raw == b"raw"
    assert ctx.costs == Costs(pytest.approx(0.002), pytest.approx(0.002), "small",
                              pytest.approx(0.002), pytest.approx(0.0))
    assert asdict(books.row) | {"latency_ms": 0} == asdict(LedgerRecord(
        request_id="r", ts=1_000.0, request_hash="h-small", tenant="acme", feature="faq",
        user="u1", requested_model="small", model="s-1-0125", provider="p", endpoint="chat",
        input_tokens=1000, output_tokens=500, cost_usd=pytest.approx(0.002),
        baseline_cost_usd=pytest.approx(0.002), saved_usd=pytest.approx(0.0),
        cache_status="miss", strategy="", latency_ms=0, upstream_latency_ms=12.5, route="small"))
    assert 0 <= books.row.latency_ms < 10_000
    assert books.store.writes == 1
    labels = {"endpoint": "chat", "model": "s-1-0125", "cache": "miss", "status": "200"}
    assert books.sample("skinflint_requests_total", **labels) == 1
    assert books.sample("skinflint_cost_usd_total", model="s-1-0125") == pytest.approx(0.002)


async def test_a_hit_costs_nothing_saves_its_baseline_and_is_not_stored_again() -> None:
    books = Books()
    await books(_asked(), _looked_up(books.cache, Reply(body=answer(model="s-1", usage=USED))))
    assert books.store.writes == 1
    ctx, provider = _asked(), Recorder()
    reply = await books(ctx, _looked_up(books.cache, Reply(body=answer("other"))))
    assert reply.body == answer(model="s-1", usage=USED) and not provider.called
    hit = books.ledger.records[-1]
    assert _fields(hit, "provider", "model", "cost_usd", "baseline_cost_usd", "saved_usd",
                   "cache_status", "strategy", "input_tokens") == {
        "provider": "cache", "model": "s-1", "cost_usd": 0.0,
        "baseline_cost_usd": pytest.approx(0.002), "saved_usd": pytest.approx(0.002),
        "cache_status": "hit-exact", "strategy": "exact_cache", "input_tokens": 1000}
    assert books.store.writes == 1
    assert books.sample("skinflint_saved_usd_total", cache="hit-exact") == pytest.approx(0.002)


async def test_a_semantic_hit_records_its_similarity() -> None:
    books = Books()

    async def served(ctx: RequestContext) -> Reply:
        ctx.cache, ctx.usage = CacheDecision("hit-semantic", similarity=0.97), Usage(*USED)
        return Reply(body=answer(model="s-1", usage=USED))

    await books(_asked(), served)
    assert _fields(books.row, "similarity", "strategy", "provider", "cost_usd") == {
        "similarity": 0.97, "strategy": "semantic_cache", "provider": "cache", "cost_usd": 0.0}


async def test_a_bypassed_request_records_why() -> None:
    books = Books()
    ctx = _asked(cache_mode="bypass", cache=CacheDecision("bypass", CacheBypass.CLIENT))
    await books(ctx, _looked_up(books.cache, Reply(body=answer(usage=USED))))
    assert _fields(books.row, "cache_status", "cache_reason") == {
        "cache_status": "bypass", "cache_reason": "client-bypass"}
    assert books.store.writes == 0
    assert books.sample("skinflint_cache_bypassed_total", reason="client-bypass") == 1


@pytest.mark.parametrize(("error", "status", "error_type"), [
    (UpstreamStatusError(429, "slow down"), 429, "rate_limit_error"),
    (UpstreamStatusError(400, "bad", code="context_length_exceeded"), 400,
     "context_length_exceeded"),
    (RequestError("bad header", code="invalid_header"), 400, "invalid_header"),
    (UnknownModelError("no such model"), 404, "model_not_found"),
    (ValueError("bug"), 500, "ValueError"),
    (asyncio.CancelledError(CLIENT_LEFT), 499, "client_disconnected"),
    (asyncio.CancelledError(), 503, "shutdown"),  # cancelled by the server stopping
])
async def test_a_failure_is_recorded_then_raised(error: BaseException, status: int,
                                                 error_type: str) -> None:
    books = Books()
    ctx = _asked(targets=(SMALL,), answered=SMALL)
    with pytest.raises(type(error)) as caught:
        await books(ctx, Recorder(error))
    assert caught.value is error
    assert _fields(books.row, "status", "error_type", "provider", "cost_usd") == {
        "status": status, "error_type": error_type, "provider": "p", "cost_usd": 0.0}
    assert books.store.writes == 0


async def test_every_cascade_call_not_returned_gets_a_row_and_counts() -> None:
    books = Books(baseline_model="mid", route_baselines={"auto": "big"})
    attempts = [Attempt(0, SMALL, Usage(*USED), 5.0, verdict=GateVerdict("score", 0.42)),
                Attempt(0, MID, None, 3.0, 502, "connection_error",
                        GateVerdict("connection_error"))]
    ctx = _asked("auto", route=RouteDecision("auto", task="quiz", tier=1, tiers=2),
                 answered=BIG, attempts=attempts)
    await books(ctx, Recorder(Reply(body=answer(model="b-1", usage=USED))))
    assert ctx.costs == Costs(pytest.approx(0.027), pytest.approx(0.025), "big",
                              pytest.approx(0.025), pytest.approx(-0.002))
    first, second, own = books.ledger.records
    names = ("request_id", "model", "provider", "input_tokens", "cost_usd", "baseline_cost_usd",
             "saved_usd", "strategy", "status", "error_type", "upstream_latency_ms", "route")
    assert _fields(first, *names) == {
        "request_id": "r.1", "model": "s-1", "provider": "p", "input_tokens": 1000,
        "cost_usd": pytest.approx(0.002), "baseline_cost_usd": 0.0, "saved_usd": 0.0,
        "strategy": CASCADE_ATTEMPT, "status": 200, "error_type": "score 0.42",
        "upstream_latency_ms": 5.0, "route": "auto;task=quiz;tier=2/2"}
    assert _fields(second, "request_id", "status", "error_type", "cost_usd") == {
        "request_id": "r.1", "status": 502, "error_type": "connection_error", "cost_usd": 0.0}
    assert _fields(own, "request_id", "model", "cost_usd", "saved_usd", "strategy") == {
        "request_id": "r", "model": "b-1", "cost_usd": pytest.approx(0.025),
        "saved_usd": pytest.approx(-0.002), "strategy": "cascade"}
    assert books.sample("skinflint_cascade_escalations_total", model="small",
                        reason="score") == 1
    assert books.sample("skinflint_saved_usd_total", cache="miss") is None  # it saved nothing


async def test_a_retried_call_gets_its_own_row_and_is_not_a_request() -> None:
    """A retried call of unknown tokens has an unknown cost (NULL), adds nothing to the
    request's cost, and does not make the request a cascade."""
    books = Books()
    attempts = [Attempt(0, SMALL, None, 7.0, 504, "timeout", retry=1),
                Attempt(0, SMALL, None, 2.0, 502, "upstream_cut", retry=2)]
    ctx = _asked(answered=SMALL, attempts=attempts, route=RouteDecision("small"))
    await books(ctx, Recorder(Reply(body=answer(model="s-1", usage=USED))))
    assert ctx.costs.cost_usd == pytest.approx(0.002)
    first, second, own = books.ledger.records
    names = ("request_id", "provider", "input_tokens", "cost_usd", "strategy", "status",
             "error_type", "upstream_latency_ms")
    assert _fields(first, *names) == {
        "request_id": "r.1.r1", "provider": "p", "input_tokens": 0, "cost_usd": None,
        "strategy": RETRIED_ATTEMPT, "status": 504, "error_type": "timeout",
        "upstream_latency_ms": 7.0}
    assert _fields(second, "request_id", "error_type") == {
        "request_id": "r.1.r2", "error_type": "upstream_cut"}
    assert _fields(own, "request_id", "strategy", "cost_usd") == {
        "request_id": "r", "strategy": "", "cost_usd": pytest.approx(0.002)}
    assert books.sample("skinflint_cascade_escalations_total", model="small",
                        reason="not chosen") is None


async def test_an_unpriced_call_leaves_the_cost_unknown() -> None:
    books = Books()
    attempts = [Attempt(0, Target("mystery", "p", "mystery-1"), Usage(*USED), 1.0)]
    ctx = _asked("auto", answered=BIG, attempts=attempts,
                 route=RouteDecision("auto", task="quiz", tier=1, tiers=2))
    await books(ctx, Recorder(Reply(body=answer(model="b-1", usage=USED))))
    assert ctx.costs.cost_usd is None and ctx.costs.saved_usd is None
    assert ctx.costs.own_usd == pytest.approx(0.025)
    assert books.ledger.records[0].error_type == "not chosen"
    assert books.sample("skinflint_unknown_price_total", model="mystery") == 1


@pytest.mark.parametrize(("requested", "baseline_model", "routes", "baseline"), [
    ("small", None, None, "small"),
    ("small", "big", None, "big"),
    ("auto", "mid", {"auto": "big"}, "big"),
    ("auto", "mid", {"other": "big"}, "mid"),
])
async def test_savings_are_measured_against_the_baseline(
        requested: str, baseline_model: str | None, routes: dict[str, str] | None,
        baseline: str) -> None:
    books = Books(baseline_model=baseline_model, route_baselines=routes)
    ctx = _asked(requested, answered=SMALL)
    await books(ctx, Recorder(Reply(body=answer(usage=USED))))
    baseline_cost = PriceCatalog(PRICES).cost(baseline, Usage(*USED))
    assert baseline_cost is not None
    assert ctx.costs == Costs(pytest.approx(0.002), pytest.approx(0.002), baseline,
                              pytest.approx(baseline_cost), pytest.approx(baseline_cost - 0.002))


async def test_an_embedding_is_its_own_baseline_and_its_usage_is_counted() -> None:
    books = Books(baseline_model="big")
    body = {"model": "emb", "input": ["hello world", "hi", 7]}
    ctx = context(body, endpoint="embeddings", answered=Target("emb", "p", "emb-1"))
    vectors = {"object": "list", "model": "emb-1", "data": [{"embedding": [0.1], "index": 0}]}
    await books(ctx, Recorder(Reply(body=vectors)))
    n = TOKENS.count_text("emb-1", "hello world") + TOKENS.count_text("emb-1", "hi")
    assert n > 0 and ctx.usage == Usage(input_tokens=n, counted=True)
    assert ctx.costs.baseline_model == "emb"
    assert ctx.costs.cost_usd == pytest.approx(n * 0.1e-6) == ctx.costs.baseline_cost_usd


async def test_an_answer_without_usage_is_counted_offline() -> None:
    books = Books()
    ctx = _asked(answered=SMALL)
    body = answer("The capital of France is Paris.", model="s-1", usage=None)
    await books(ctx, Recorder(Reply(body=body)))
    expected = Usage(TOKENS.count_messages("s-1", ctx.body["messages"]),
                     TOKENS.count_completion("s-1", body), counted=True)
    assert ctx.usage == expected and expected.input_tokens > 0 and expected.output_tokens > 0
    assert (books.row.input_tokens, books.row.output_tokens) == (expected.input_tokens,
                                                                 expected.output_tokens)
    assert books.sample("skinflint_counted_usage_total", model="s-1") == 1


async def _stream(body: dict[str, Any]) -> AsyncIterator[StreamChunk]:
    for data in chunks_from_completion(body, include_usage=True):
        yield StreamChunk(data)


async def test_a_stream_is_accounted_and_stored_once_it_ends() -> None:
    books = Books()
    body = answer("Paris", model="s-1", usage=USED)
    ctx = _asked(stream=True)
    reply = await books(ctx, _looked_up(books.cache, Reply(chunks=_stream(body))))
    assert reply.chunks is not None and books.ledger.records == []
    relayed = [c.data async for c in reply.chunks]
    assert all(c["choices"] for c in relayed)  # the usage chunk the client did not ask for
    assert _fields(books.row, "input_tokens", "output_tokens", "cost_usd", "status") == {
        "input_tokens": 1000, "output_tokens": 500, "cost_usd": pytest.approx(0.002),
        "status": 200}
    assert books.store.writes == 1
    again = _asked(stream=True)
    replayed = await books(again, _looked_up(books.cache, Reply(chunks=_stream(answer("x")))))
    assert again.cache.status == "hit-exact" and again.costs.saved_usd == pytest.approx(0.002)
    assert replayed.chunks is not None
    assert "".join([c.data["choices"][0]["delta"].get("content") or ""
                    async for c in replayed.chunks if c.data["choices"]]) == "Paris"
    assert books.store.writes == 1


async def test_a_stream_the_client_leaves_is_recorded_as_abandoned() -> None:
    books = Books()
    body = answer("Paris is the capital", model="s-1", usage=USED)
    ctx = _asked(stream=True)
    reply = await books(ctx, _looked_up(books.cache, Reply(chunks=_stream(body))))
    assert isinstance(reply.chunks, AsyncGenerator)
    await anext(reply.chunks)
    await reply.chunks.aclose()
    assert _fields(books.row, "status", "error_type") == {
        "status": 499, "error_type": "client_disconnected"}
    assert books.store.writes == 0
