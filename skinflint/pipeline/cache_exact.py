"""Stage 4, exact cache: the same request, normalised, within the same scope, is answered from
the store. The rules, keys and storing live in :mod:`skinflint.pipeline.cache`; the answer is
stored by the account stage once it is known to be complete."""

from __future__ import annotations

from skinflint.pipeline.cache import ResponseCache
from skinflint.pipeline.context import Next, Reply, RequestContext

__all__ = ["ExactCache"]


class ExactCache:
    name = "exact_cache"

    def __init__(self, cache: ResponseCache) -> None:
        self._cache = cache
        self.enabled = cache.exact_enabled

    async def __call__(self, ctx: RequestContext, next: Next) -> Reply:
        reply = await self._cache.lookup(ctx)
        return reply if reply is not None else await next(ctx)
