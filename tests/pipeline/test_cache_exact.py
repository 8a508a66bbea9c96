"""Stage 4, exact cache, through its one call, over the response cache and an in-memory store."""

from __future__ import annotations

from typing import Any

import pytest

from skinflint.config import settings_from_dict
from skinflint.metrics import Metrics
from skinflint.models import CacheBypass, Usage
from skinflint.pipeline.cache import ResponseCache
from skinflint.pipeline.cache_exact import ExactCache
from skinflint.pipeline.context import MISS, CacheDecision, Reply, RequestContext
from skinflint.storage.cache import MemoryCacheStore
from tests.pipeline.parts import Recorder, answer, chat, context

STORED = answer("Paris", model="m-2024", usage=(7, 1))


class CountingStore(MemoryCacheStore):
    """The in-memory store, counting its reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def get(self, key: str, now: float) -> bytes | None:
        self.reads += 1
        return await super().get(key, now)


def _cache(exact: dict[str, Any] | None = None) -> ResponseCache:
    settings = settings_from_dict({"cache": {"exact": exact or {}}}, env={})
    return ResponseCache(settings.cache, CountingStore(), Metrics())


def _request(**fields: Any) -> RequestContext:
    return context(chat("capital of France?", temperature=0), **fields)


async def _stored(cache: ResponseCache) -> None:
    """Answer one request through the stage and store its answer, as the account stage does."""
    first = _request()
    await ExactCache(cache)(first, Recorder())
    assert await cache.store(first, STORED, None)


async def test_a_miss_passes_the_request_on_with_a_plan_to_store_it() -> None:
    cache = _cache({"ttl_seconds": 60})
    ctx, after = _request(), Recorder()
    reply = await ExactCache(cache)(ctx, after)
    assert after.seen == [ctx] and reply is after.outcome
    assert ctx.cache == MISS
    assert ctx.cache_plan is not None and ctx.cache_plan.ttl_seconds == 60
    assert ctx.cache_plan.epoch == cache.invalidations


async def test_a_hit_answers_without_calling_the_next_stage() -> None:
    cache = _cache()
    await _stored(cache)
    ctx, after = _request(), Recorder()
    reply = await ExactCache(cache)(ctx, after)
    assert not after.called
    assert reply.body == STORED and reply.raw is not None
    assert ctx.cache == CacheDecision("hit-exact")
    assert (ctx.model, ctx.usage) == ("m-2024", Usage(7, 1))


async def test_a_streamed_hit_is_replayed_as_chunks() -> None:
    cache = _cache()
    await _stored(cache)
    ctx, after = _request(stream=True), Recorder()
    reply = await ExactCache(cache)(ctx, after)
    assert not after.called and reply.body is None and reply.chunks is not None
    text = "".join([c.data["choices"][0]["delta"].get("content") or ""
                    async for c in reply.chunks])
    assert text == "Paris"


async def test_another_tenant_does_not_share_the_entry() -> None:
    cache = _cache()
    await _stored(cache)
    ctx, after = _request(tenant="other"), Recorder()
    await ExactCache(cache)(ctx, after)
    assert after.called and ctx.cache == MISS


@pytest.mark.parametrize(("fields", "reason"), [
    ({"cache_mode": "bypass"}, CacheBypass.CLIENT),
    ({"feature": "news"}, CacheBypass.DISABLED),
])
async def test_a_bypassed_request_is_passed_on_with_the_reason(fields: dict[str, Any],
                                                               reason: CacheBypass) -> None:
    cache = _cache({"features": {"news": {"enabled": False}}})
    await _stored(cache)
    ctx, after = _request(**fields), Recorder()
    await ExactCache(cache)(ctx, after)
    assert after.called
    assert ctx.cache == CacheDecision("bypass", reason)
    assert ctx.cache_plan is None  # nor is its answer stored


async def test_a_request_sampled_above_the_limit_is_not_cached() -> None:
    cache = _cache({"max_temperature": 0.5})
    ctx, after = context(chat("capital of France?", temperature=0.9)), Recorder()
    await ExactCache(cache)(ctx, after)
    assert after.called and ctx.cache == CacheDecision("bypass",
                                                       CacheBypass.TEMPERATURE_ABOVE_MAX)


async def test_refresh_calls_the_model_without_reading_and_plans_to_store() -> None:
    cache = _cache()
    await _stored(cache)
    store = cache.backend
    assert isinstance(store, CountingStore)
    reads = store.reads
    ctx, after = _request(cache_mode="refresh"), Recorder(Reply(body=answer("Paris!")))
    reply = await ExactCache(cache)(ctx, after)
    assert after.called and reply.body == answer("Paris!")
    assert store.reads == reads
    assert ctx.cache == MISS and ctx.cache_plan is not None


@pytest.mark.parametrize(("exact", "enabled"), [
    ({}, True),
    ({"enabled": False}, False),
    ({"enabled": False, "features": {"faq": {"enabled": True}}}, True),
    ({"enabled": False, "routes": {"auto": {"ttl_seconds": 5}}}, True),
])
def test_the_stage_is_skipped_when_nothing_turns_the_cache_on(exact: dict[str, Any],
                                                              enabled: bool) -> None:
    assert ExactCache(_cache(exact)).enabled is enabled


async def test_only_the_feature_turned_on_is_cached() -> None:
    cache = _cache({"enabled": False, "features": {"faq": {"enabled": True}}})
    faq, other = _request(feature="faq"), _request(feature="chat")
    for ctx in (faq, other):
        await ExactCache(cache)(ctx, Recorder())
    assert faq.cache_plan is not None and faq.cache == MISS
    assert other.cache_plan is None and other.cache == CacheDecision("bypass",
                                                                     CacheBypass.DISABLED)
