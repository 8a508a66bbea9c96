"""Stage 5, semantic cache: answer a question from a similar earlier one, safely (see
:mod:`skinflint.pipeline.cache` for what is compared and how). The cache saves money and must
never cost a request: a slow or failing embedder or index passes the request on."""

from __future__ import annotations

from skinflint.pipeline.cache import ResponseCache
from skinflint.pipeline.context import Next, Reply, RequestContext

__all__ = ["SemanticCache"]


class SemanticCache:
    name = "semantic_cache"

    def __init__(self, cache: ResponseCache) -> None:
        self._cache = cache
        self.enabled = cache.semantic_enabled

    async def __call__(self, ctx: RequestContext, next: Next) -> Reply:
        threshold = self._cache.semantic_threshold(ctx)
        if threshold is not None:
            reply = await self._cache.lookup_similar(ctx, threshold)
            if reply is not None:
                return reply
        return await next(ctx)
