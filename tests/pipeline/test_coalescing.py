"""Coalescing through the response cache's own calls: the first request to miss a key leads it,
identical ones wait for its answer, and every outcome releases them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import nullcontext
from typing import Any

import pytest
from pydantic import ValidationError

from skinflint.config import CacheConfig
from skinflint.errors import UpstreamStatusError
from skinflint.metrics import Metrics
from skinflint.models import StreamChunk
from skinflint.pipeline.account import Account
from skinflint.pipeline.cache import ResponseCache
from skinflint.pipeline.context import Reply, RequestContext, Target
from skinflint.pipeline.inflight import Flights
from skinflint.pricing import PriceCatalog
from skinflint.storage.cache import MemoryCacheStore
from skinflint.storage.ledger import MemoryLedger
from skinflint.streaming import chunks_from_completion
from skinflint.tokens import TokenCounter
from tests.pipeline.parts import answer, context


def _cache(timeout: float = 5.0, **exact: Any) -> ResponseCache:
    config = CacheConfig.model_validate({"exact": {"coalesce_timeout_seconds": timeout, **exact}})
    return ResponseCache(config, MemoryCacheStore(), Metrics())


def _request(**fields: Any) -> RequestContext:
    return context(headers={}, **{"body": {"model": "m", "temperature": 0,
                                           "messages": [{"role": "user", "content": "hi"}]},
                                  **fields})


async def _waiting(cache: ResponseCache, n: int, **fields: Any) -> list[asyncio.Task[Any]]:
    """``n`` identical requests looking the cache up, all waiting by the time this returns."""
    tasks = [asyncio.ensure_future(cache.lookup(_request(**fields))) for _ in range(n)]
    await asyncio.sleep(0.01)
    assert not any(t.done() for t in tasks)
    return tasks


async def test_waiters_are_served_the_leaders_stored_answer_as_exact_hits() -> None:
    cache = _cache()
    leader = _request()
    assert await cache.lookup(leader) is None
    waiters = await _waiting(cache, 3)
    assert await cache.store(leader, answer(), None)
    cache.release(leader)
    for reply in await asyncio.gather(*waiters):
        assert reply is not None and reply.body == answer()
    assert len(cache._flights) == 0


async def test_a_failed_leader_hands_over_to_exactly_one_waiter() -> None:
    cache = _cache()
    leader = _request()
    await cache.lookup(leader)
    waiters = await _waiting(cache, 4)
    leader.status = 502
    cache.release(leader)
    await asyncio.sleep(0.01)
    assert sum(t.done() for t in waiters) == 1  # the new leader, sent upstream
    assert waiters[[t.done() for t in waiters].index(True)].result() is None
    # it stores an answer: the others are served it
    (new_leader,) = [f.leader for f in cache._flights._flights.values()]
    assert isinstance(new_leader, RequestContext)
    assert await cache.store(new_leader, answer(), None)
    cache.release(new_leader)
    assert all(r is not None for r in await asyncio.gather(*(t for t in waiters if not t.done())))


@pytest.mark.parametrize("status", [200, 400])
async def test_an_answer_that_will_not_be_stored_sends_every_waiter_upstream(
    status: int,
) -> None:
    """Not storable (cut off, too big, a semantic hit) or refused as the request stands: another
    try would fare the same, so nobody waits for one."""
    cache = _cache()
    leader = _request()
    await cache.lookup(leader)
    waiters = await _waiting(cache, 3)
    leader.status = status
    cache.release(leader)
    assert await asyncio.gather(*waiters) == [None, None, None]
    assert len(cache._flights) == 0


async def test_the_wait_is_bounded_and_a_lost_leader_is_replaced() -> None:
    cache = _cache(timeout=0.05)
    leader = _request()
    await cache.lookup(leader)  # never released
    assert await cache.lookup(_request()) is None  # waited 0.05 s, then went on
    late = _request()
    assert await cache.lookup(late) is None  # leads now
    waiter = asyncio.ensure_future(cache.lookup(_request()))
    await asyncio.sleep(0)
    assert await cache.store(late, answer(), None)
    cache.release(late)
    assert (await waiter) is not None
    cache.release(leader)  # too late: changes nothing
    assert len(cache._flights) == 0


async def test_a_cancelled_waiter_leaves_the_others_waiting() -> None:
    cache = _cache()
    leader = _request()
    await cache.lookup(leader)
    gone, stays = await _waiting(cache, 2)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    await cache.store(leader, answer(), None)
    cache.release(leader)
    assert await stays is not None


async def test_only_identical_requests_in_the_same_scope_wait() -> None:
    cache = _cache(scope="user")
    leader = _request(user="ann")
    await cache.lookup(leader)
    others = [_request(user="bob"), _request(body={"model": "m", "temperature": 0,
                                                   "messages": [{"role": "user", "content": "x"}]},
                                             request_hash="other", user="ann")]
    for ctx in others:
        assert await asyncio.wait_for(cache.lookup(ctx), 1) is None
    assert len(cache._flights) == 3  # each leads its own key


@pytest.mark.parametrize("mode", ["bypass", "refresh"])
async def test_bypass_and_refresh_do_not_wait(mode: str) -> None:
    cache = _cache()
    await cache.lookup(_request())
    assert await asyncio.wait_for(cache.lookup(_request(cache_mode=mode)), 1) is None


async def test_identical_requests_wait_for_a_refresh() -> None:
    cache = _cache()
    refresh = _request(cache_mode="refresh")
    await cache.lookup(refresh)
    (waiter,) = await _waiting(cache, 1)
    await cache.store(refresh, answer(), None)
    cache.release(refresh)
    assert await waiter is not None


async def test_a_zero_timeout_never_registers_anything() -> None:
    cache = _cache(timeout=0)
    for _ in range(3):
        assert await asyncio.wait_for(cache.lookup(_request()), 1) is None
    assert len(cache._flights) == 0


def test_the_timeout_is_validated() -> None:
    assert CacheConfig().exact.coalesce_timeout_seconds == 30
    with pytest.raises(ValidationError, match="coalesce_timeout_seconds"):
        CacheConfig.model_validate({"exact": {"coalesce_timeout_seconds": -1}})


async def test_a_flight_expires_by_its_clock() -> None:
    now = [0.0]
    flights = Flights(10, clock=lambda: now[0])
    assert flights.lead("k", "a") and not flights.lead("k", "b")
    now[0] = 10.0  # "a" was lost: past waiting for
    assert flights.lead("k", "b")
    flights.land("k", "a", retry=False)  # not the leader any more
    assert len(flights) == 1
    flights.land("k", "b", retry=False)
    assert len(flights) == 0


# ---- the account stage releases the waiters, whatever happens to the leader's answer


async def _chunks(body: dict[str, Any], cut: bool = False) -> AsyncIterator[StreamChunk]:
    for data in chunks_from_completion(body, include_usage=True):
        yield StreamChunk(data)
        if cut:
            raise UpstreamStatusError(502, "cut off")


async def _relay(reply: Reply, leave: bool) -> None:
    assert isinstance(reply.chunks, AsyncGenerator)
    if leave:  # the client goes after the first chunk
        await anext(reply.chunks)
        await reply.chunks.aclose()
        return
    async for _ in reply.chunks:
        pass


@pytest.mark.parametrize(("outcome", "stored"), [
    ("answered", True), ("failed", False), ("cancelled", False),
    ("streamed", True), ("stream cut off", False), ("stream left", False),
])
async def test_every_outcome_of_the_leader_releases_its_waiters(outcome: str,
                                                                stored: bool) -> None:
    cache = _cache(timeout=30)
    account = Account(catalog=PriceCatalog({"m": (1.0, 2.0, None)}), tokens=TokenCounter(),
                      ledger=MemoryLedger(), metrics=Metrics(), cache=cache)
    upstream = asyncio.Event()
    stream = outcome.startswith("stream")

    async def rest(ctx: RequestContext) -> Reply:
        assert await cache.lookup(ctx) is None
        ctx.answered = Target("m", "p", "m")
        await upstream.wait()
        if outcome == "failed":
            raise UpstreamStatusError(503, "down")
        if stream:
            return Reply(chunks=_chunks(answer(), cut=outcome == "stream cut off"))
        return Reply(body=answer())

    leader = asyncio.ensure_future(account(_request(stream=stream), rest))
    await asyncio.sleep(0.01)
    (waiter,) = await _waiting(cache, 1)
    if outcome == "cancelled":
        leader.cancel()
    upstream.set()
    reply = await asyncio.gather(leader, return_exceptions=True)
    if isinstance(reply[0], Reply) and stream:
        with pytest.raises(UpstreamStatusError) if outcome == "stream cut off" else nullcontext():
            await _relay(reply[0], leave=outcome == "stream left")
    served = await asyncio.wait_for(waiter, 1)  # released, not left to time out
    assert (served is not None) is stored
    if not stored:  # the waiter goes upstream in the leader's place, or alone
        assert len(cache._flights) <= 1
