"""Stage 5, semantic cache, through its one call: a fake embedder, the embedded index."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from skinflint.config import settings_from_dict
from skinflint.metrics import Metrics
from skinflint.models import CacheBypass
from skinflint.pipeline.cache import ResponseCache
from skinflint.pipeline.cache_semantic import SemanticCache
from skinflint.pipeline.context import MISS, CacheDecision, RequestContext
from skinflint.pipeline.embedding import GuardedEmbedder
from skinflint.storage.cache import MemoryCacheStore
from skinflint.storage.semantic import LocalSemanticIndex
from tests.pipeline.parts import Embedder, Recorder, answer, chat, context

STORED = answer("Paris", usage=(7, 1))


def _cache(semantic: dict[str, Any] | None = None) -> ResponseCache:
    config = {"semantic": {"enabled": True} if semantic is None else semantic}
    settings = settings_from_dict({"cache": config}, env={})
    return ResponseCache(settings.cache, MemoryCacheStore(), Metrics(), threshold=0.99)


@pytest.fixture
async def embedder() -> Embedder:
    return Embedder()


@pytest.fixture
async def opened(tmp_path: Path, embedder: Embedder) -> AsyncIterator[ResponseCache]:
    """A response cache whose semantic side has loaded."""
    cache = _cache()
    index = LocalSemanticIndex(str(tmp_path / "semantic.db"), embedder.name, embedder.dim)
    cache.open_semantic(GuardedEmbedder(embedder, Metrics()), index)
    yield cache
    await cache.close()


async def _asked(cache: ResponseCache, question: str, **fields: Any) -> RequestContext:
    """A request past the exact-cache stage (which plans whether it is cached)."""
    ctx = context(chat(question, temperature=0), request_hash=f"h-{question}", **fields)
    assert await cache.lookup(ctx) is None
    return ctx


async def test_a_similar_question_is_answered_without_the_model(opened: ResponseCache) -> None:
    stage = SemanticCache(opened)
    first, after = await _asked(opened, "What is the capital of France"), Recorder()
    await stage(first, after)
    assert after.called and first.cache == MISS
    assert first.semantic is not None and first.semantic.question == first.body["messages"][0][
        "content"]
    assert await opened.store(first, STORED, None)  # as the account stage does

    second, after = await _asked(opened, "what is the capital of france?"), Recorder()
    reply = await stage(second, after)
    assert not after.called
    assert reply.body == STORED
    assert second.cache.status == "hit-semantic"
    assert second.cache.similarity == pytest.approx(1.0)


async def test_a_dissimilar_question_is_passed_on(opened: ResponseCache) -> None:
    stage = SemanticCache(opened)
    first = await _asked(opened, "What is the capital of France")
    await stage(first, Recorder())
    assert await opened.store(first, STORED, None)
    other, after = await _asked(opened, "How many legs does a spider have"), Recorder()
    await stage(other, after)
    assert after.called and other.cache == MISS


async def test_refresh_embeds_for_the_index_but_asks_the_model(opened: ResponseCache) -> None:
    stage = SemanticCache(opened)
    first = await _asked(opened, "What is the capital of France")
    await stage(first, Recorder())
    assert await opened.store(first, STORED, None)
    after = Recorder()
    again = await _asked(opened, "what is the capital of France", cache_mode="refresh")
    await stage(again, after)
    assert after.called and again.cache == MISS
    assert again.semantic is not None  # so that the fresh answer is indexed in turn


def test_the_stage_is_skipped_when_the_semantic_cache_is_off() -> None:
    assert not SemanticCache(_cache({"enabled": False})).enabled
    assert SemanticCache(_cache({"enabled": False, "features": {"faq": {"enabled": True}}})).enabled
    exact_off = settings_from_dict({"cache": {"exact": {"enabled": False},
                                              "semantic": {"enabled": True}}}, env={})
    assert not SemanticCache(ResponseCache(exact_off.cache, MemoryCacheStore(), Metrics())).enabled


async def test_until_the_embedder_has_loaded_requests_pass_through() -> None:
    cache = _cache()
    stage = SemanticCache(cache)
    assert stage.enabled
    ctx, after = await _asked(cache, "What is the capital of France"), Recorder()
    reply = await stage(ctx, after)
    assert after.seen == [ctx] and reply is after.outcome
    assert ctx.semantic is None


async def test_a_request_the_cache_does_not_plan_to_store_is_not_embedded(
        opened: ResponseCache, embedder: Embedder) -> None:
    ctx, after = await _asked(opened, "What is the capital", cache_mode="bypass"), Recorder()
    assert ctx.cache == CacheDecision("bypass", CacheBypass.CLIENT) and ctx.cache_plan is None
    await SemanticCache(opened)(ctx, after)
    assert after.called and ctx.semantic is None and embedder.calls == 0


async def test_embeddings_are_not_looked_up(opened: ResponseCache, embedder: Embedder) -> None:
    ctx = context({"model": "e", "input": "What is the capital of France"},
                  endpoint="embeddings")
    assert await opened.lookup(ctx) is None and ctx.cache_plan is not None
    after = Recorder()
    await SemanticCache(opened)(ctx, after)
    assert after.called and embedder.calls == 0


async def test_a_feature_with_the_semantic_cache_off_is_passed_on(
        tmp_path: Path, embedder: Embedder) -> None:
    cache = _cache({"enabled": True, "features": {"chat": {"enabled": False}}})
    index = LocalSemanticIndex(str(tmp_path / "semantic.db"), embedder.name, embedder.dim)
    cache.open_semantic(GuardedEmbedder(embedder, Metrics()), index)
    try:
        ctx, after = await _asked(cache, "What is the capital", feature="chat"), Recorder()
        await SemanticCache(cache)(ctx, after)
        assert after.called and embedder.calls == 0
    finally:
        await cache.close()


async def test_a_failing_embedder_costs_the_lookup_not_the_request(
        opened: ResponseCache, embedder: Embedder) -> None:
    embedder.failing = True
    ctx, after = await _asked(opened, "What is the capital of France"), Recorder()
    reply = await SemanticCache(opened)(ctx, after)
    assert reply is after.outcome and embedder.calls == 1
    assert ctx.semantic is None and ctx.cache == MISS
