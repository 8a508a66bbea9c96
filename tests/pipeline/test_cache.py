"""The response-cache service through its own calls, with in-memory stores and a fake clock."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from skinflint.config import CacheConfig
from skinflint.interfaces import CacheEntry
from skinflint.metrics import Metrics
from skinflint.models import CacheBypass
from skinflint.pipeline.cache import Policy, ResponseCache
from skinflint.pipeline.context import RequestContext
from skinflint.storage.cache import MemoryCacheStore, TieredCacheStore
from tests.pipeline.parts import Embedder

ANSWER = {"model": "m", "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": "42"}}]}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _cache(config: dict[str, Any] | None = None, store: Any = None, **kw: Any) -> ResponseCache:
    return ResponseCache(CacheConfig.model_validate(config or {}), store or MemoryCacheStore(),
                         Metrics(), **kw)


def _request(*, temperature: float | None = 0, feature: str = "", model: str = "m",
             tags: tuple[str, ...] = (), mode: str = "default") -> RequestContext:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if temperature is not None:
        body["temperature"] = temperature
    return RequestContext("r", 0.0, 0.0, "chat", b"", {}, body=body, feature=feature,
                          requested_model=model, tags=tags, cache_mode=mode,
                          request_hash=f"h-{feature}-{model}")


def test_the_policy_is_decided_in_one_place() -> None:
    """Defaults, then the route's own, then the feature's own, for the exact and the semantic
    cache alike."""
    cache = _cache({
        "exact": {"ttl_seconds": 60, "max_temperature": 0.5,
                  "routes": {"auto": {"ttl_seconds": 30, "normalization": "loose"}},
                  "features": {"news": {"ttl_seconds": 10}, "poems": {"cache_any_temperature": True},
                               "off": {"enabled": False}}},
        "semantic": {"enabled": False, "threshold": 0.9,
                     "features": {"support": {"enabled": True, "threshold": 0.97}},
                     "routes": {"auto": {"enabled": True}}},
    }, threshold=0.9)
    assert cache.policy("", "m") == Policy(True, 60, False, 0.5, False, None)
    assert cache.policy("", "auto") == Policy(True, 30, True, 0.5, False, 0.9)
    assert cache.policy("news", "auto") == Policy(True, 10, True, 0.5, False, 0.9)
    assert cache.policy("support", "m") == Policy(True, 60, False, 0.5, False, 0.97)
    assert cache.policy("poems", "m").any_temperature
    assert not cache.policy("off", "m").enabled
    assert cache.exact_enabled and cache.semantic_enabled


@pytest.mark.parametrize(("request_", "reason"), [
    (_request(temperature=0), None),
    (_request(temperature=None), CacheBypass.TEMPERATURE_UNSET),
    (_request(temperature=0.9), CacheBypass.TEMPERATURE_ABOVE_MAX),
    (_request(temperature=0.9, feature="poems"), None),
    (_request(temperature=None, feature="warm"), None),
    (_request(feature="off"), CacheBypass.DISABLED),
    (_request(mode="bypass"), CacheBypass.CLIENT),
])
def test_why_a_request_is_not_cached(request_: RequestContext, reason: CacheBypass | None) -> None:
    cache = _cache({"exact": {"features": {"poems": {"cache_any_temperature": True},
                                           "warm": {"max_temperature": 1},
                                           "off": {"enabled": False}}}})
    policy = cache.policy(request_.feature, request_.requested_model)
    assert cache.bypass(request_, policy) == reason


def test_the_policy_memo_holds_configured_names_only() -> None:
    """Feature and model names come from the client; remembering each would let any client
    grow the gateway's memory without bound."""
    cache = _cache({"exact": {"features": {"news": {"ttl_seconds": 300}}}})
    for i in range(1000):
        assert cache.policy(f"feature-{i}", f"model-{i}").ttl_seconds == 7 * 86400
    assert cache.policy("news", "model-1").ttl_seconds == 300
    assert len(cache._policies) == 2


async def test_entries_expire_by_the_injected_clock() -> None:
    clock = Clock()
    cache = _cache({"exact": {"features": {"news": {"ttl_seconds": 300}}}}, clock=clock)
    first = _request(feature="news")
    assert await cache.lookup(first) is None and first.cache_plan is not None
    assert await cache.store(first, ANSWER, None)
    cache.release(first)  # as the pipeline does once a request is answered
    clock.now += 299
    again = _request(feature="news")
    reply = await cache.lookup(again)
    assert reply is not None and reply.body == ANSWER and again.cache.status == "hit-exact"
    clock.now += 2
    assert await cache.lookup(_request(feature="news")) is None


async def test_nothing_is_stored_for_a_bypassed_failed_or_cut_off_request() -> None:
    cache = _cache()
    bypassed = _request(temperature=None)
    assert await cache.lookup(bypassed) is None and bypassed.cache.status == "bypass"
    assert not await cache.store(bypassed, ANSWER, None)
    failed = _request()
    await cache.lookup(failed)
    failed.status = 502
    assert not await cache.store(failed, ANSWER, None)
    cache.release(failed)  # as the pipeline does once a request is answered
    cut = _request()
    await cache.lookup(cut)
    cut_off = {**ANSWER, "choices": [{**ANSWER["choices"][0], "finish_reason": "length"}]}
    assert not await cache.store(cut, cut_off, None)
    cache.release(cut)
    assert await cache.lookup(_request()) is None


async def test_an_invalidation_during_the_cache_write_drops_the_entry_written() -> None:
    """With a shared store the write itself awaits, and an invalidation of the answer's tag may
    run meanwhile and miss the entry: the cache then drops it after writing."""

    class SlowWrites(MemoryCacheStore):
        """The in-process store, its writes held until ``go`` is set, as a network write is."""

        def __init__(self) -> None:
            super().__init__()
            self.go = asyncio.Event()

        async def set(self, entry: Any) -> None:
            await self.go.wait()
            await super().set(entry)

    store = SlowWrites()
    cache = _cache(store=store)
    stale, other = _request(tags=("doc:1",), model="a"), _request(tags=("doc:2",), model="b")
    for ctx in (stale, other):
        await cache.lookup(ctx)
    writes = [asyncio.ensure_future(cache.store(ctx, ANSWER, None)) for ctx in (stale, other)]
    await asyncio.sleep(0)  # both writes are waiting
    await cache.invalidate_tags(["doc:1"])  # finds nothing yet
    store.go.set()
    assert await asyncio.gather(*writes) == [False, True]
    for ctx in (stale, other):
        cache.release(ctx)  # as the pipeline does once a request is answered
    assert await cache.lookup(_request(tags=("doc:1",), model="a")) is None
    assert await cache.lookup(_request(tags=("doc:2",), model="b")) is not None


async def test_the_cache_follows_invalidations_made_elsewhere(tmp_path: Path) -> None:
    """Applied as its own are: the copy in memory goes, and an answer in flight with that tag
    is not stored."""
    db = str(tmp_path / "skinflint.db")
    store, other = TieredCacheStore(db), TieredCacheStore(db)
    cache = _cache(store=store)
    following = asyncio.ensure_future(cache.follow(store))
    try:
        await store.set(CacheEntry("k", b"v", 0.0, ("docs:v1",)))
        in_flight = _request(tags=("docs:v1",))
        await cache.lookup(in_flight)
        await other.invalidate_tags(["docs:v1"])
        deadline = time.monotonic() + 5
        while await store.get("k", time.time()) is not None:
            assert time.monotonic() < deadline, "the invalidation never arrived"
            await asyncio.sleep(0.02)
        assert not await cache.store(in_flight, ANSWER, None)
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
        await store.close()
        await other.close()


async def test_a_semantic_hit_serves_the_stored_answer_of_a_similar_question(
        tmp_path: Path) -> None:
    from skinflint.pipeline.embedding import GuardedEmbedder
    from skinflint.storage.semantic import LocalSemanticIndex

    metrics = Metrics()
    cache = ResponseCache(CacheConfig.model_validate({"semantic": {"enabled": True}}),
                          MemoryCacheStore(), metrics, threshold=0.99, verifier=True)
    index = LocalSemanticIndex(str(tmp_path / "s.db"), "test", 4)
    cache.open_semantic(GuardedEmbedder(Embedder(), metrics), index)
    first = _request()
    first.body["messages"][0]["content"] = "What is the capital of France"
    assert await cache.lookup(first) is None
    threshold = cache.semantic_threshold(first)
    assert threshold == 0.99
    assert await cache.lookup_similar(first, threshold) is None and first.semantic is not None
    assert await cache.store(first, ANSWER, None)
    second = _request(model="m")
    second.request_hash = "another"
    second.body["messages"][0]["content"] = "what is the capital of France?"
    assert await cache.lookup(second) is None
    reply = await cache.lookup_similar(second, threshold)
    assert reply is not None and reply.body == ANSWER
    assert second.cache.status == "hit-semantic" and second.cache.similarity == pytest.approx(1.0)
    await cache.close()
