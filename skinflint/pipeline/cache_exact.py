"""Stage 4, exact cache: the same request, normalised, within the same scope, is answered from
the store. Writing happens in the account stage, once a response is known to be complete.
A request the cache may not serve says why (:class:`~skinflint.models.CacheBypass`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from skinflint.cachekey import request_hash, scoped_key
from skinflint.config import CachePolicy, ExactCacheConfig
from skinflint.interfaces import CacheEntry, CacheStore, InvalidationFeed
from skinflint.models import CacheBypass, StreamChunk, Usage
from skinflint.pipeline.context import Next, Reply, RequestContext
from skinflint.streaming import chunks_from_completion, is_complete

__all__ = ["ExactCache", "Policy"]

log = logging.getLogger("skinflint.cache")

_TAG_HISTORY = 1024  # invalidations remembered, to tell which in-flight answers they concern

#: What providers use when a request sets no temperature.
DEFAULT_TEMPERATURE = 1.0


@dataclass(frozen=True, slots=True)
class Policy:
    enabled: bool
    ttl_seconds: float
    loose: bool
    max_temperature: float
    any_temperature: bool


def _merge(base: ExactCacheConfig, *overrides: CachePolicy | None) -> Policy:
    enabled, ttl, norm = base.enabled, base.ttl_seconds, base.normalization
    max_t, any_t = base.max_temperature, False
    for o in overrides:
        if o is None:
            continue
        enabled = enabled if o.enabled is None else o.enabled
        ttl = ttl if o.ttl_seconds is None else o.ttl_seconds
        norm = norm if o.normalization is None else o.normalization
        max_t = max_t if o.max_temperature is None else o.max_temperature
        any_t = any_t if o.cache_any_temperature is None else o.cache_any_temperature
    return Policy(enabled, ttl, norm == "loose", max_t, any_t)


async def _replay(chunks: list[dict[str, Any]]) -> AsyncIterator[StreamChunk]:
    for data in chunks:
        yield StreamChunk(data=data)


class ExactCache:
    name = "exact_cache"

    def __init__(self, config: ExactCacheConfig, store: CacheStore,
                 routes: frozenset[str] = frozenset()) -> None:
        """``routes``: names whose answer also depends on the task header and the feature."""
        self.config = config
        self._routes = routes
        self.store = store
        self.enabled = config.enabled or bool(config.features) or bool(config.routes)
        self._policies: dict[tuple[str, str], Policy] = {}
        # Tag invalidations through this stage: how many have started, and the tags of the
        # latest (by the count when each started).
        self.invalidations = 0
        self._invalidated: deque[tuple[int, frozenset[str]]] = deque(maxlen=_TAG_HISTORY)
        self._cleared = 0  # the count when everything was last invalidated at once

    def policy(self, feature: str, model: str) -> Policy:
        # Memoised by configured names only: feature and model come from the client.
        feature = feature if feature in self.config.features else ""
        model = model if model in self.config.routes else ""
        try:
            return self._policies[feature, model]
        except KeyError:
            found = _merge(
                self.config, self.config.routes.get(model), self.config.features.get(feature)
            )
            self._policies[feature, model] = found
            return found

    def _scope(self, ctx: RequestContext) -> str:
        scope = self.config.scope
        if scope == "shared":
            return "shared"
        if scope == "user":  # the tenant's length keeps ("a:b", "c") apart from ("a", "b:c")
            return f"u:{len(ctx.tenant)}:{ctx.tenant}:{ctx.user}"
        return f"t:{ctx.tenant}"

    def key_for(self, ctx: RequestContext, digest: str) -> str:
        """``digest`` within the request's scope; for a route, also within its task and
        feature, and for a feature with a policy of its own (a TTL, say), within that feature,
        so that no request is served an answer stored under another feature's policy."""
        if ctx.requested_model in self._routes:
            digest = scoped_key(f"route\0{ctx.task}\0{ctx.feature}", digest)
        elif ctx.feature in self.config.features:
            digest = scoped_key(f"feature\0{ctx.feature}", digest)
        return scoped_key(self._scope(ctx), digest)

    async def invalidate_tags(self, tags: list[str]) -> int:
        """Drop the entries tagged with any of ``tags``. An answer with one of those tags to a
        request already in flight is then not stored: it may rest on the data the tag stood
        for (see :meth:`save`)."""
        self._note(tags)
        return await self.store.invalidate_tags(tags)

    def _note(self, tags: list[str] | tuple[str, ...] | None) -> None:
        """Count an invalidation of ``tags`` (None: of everything) before it runs."""
        self.invalidations += 1
        if tags is None:
            self._cleared = self.invalidations
        else:
            self._invalidated.append((self.invalidations, frozenset(tags)))

    async def follow(self, feed: InvalidationFeed) -> None:
        """Apply the invalidations other processes make in the shared storage, as if they
        had come through :meth:`invalidate_tags`, until cancelled."""
        failing = False
        while True:
            try:
                found = await feed.invalidations()
                if found != []:
                    tags = None if found is None else sorted({t for ts in found for t in ts})
                    self._note(tags)
                    await feed.forget_tags(tags)
                await feed.applied()
                if failing:
                    log.warning("exact cache: reading the shared invalidations again")
                failing = False
            except Exception:  # must never stop: a locked or damaged file is tried again
                if not failing:
                    log.exception("exact cache: cannot read the shared invalidations; "
                                  "retrying every %g s", feed.poll_seconds)
                failing = True
            await asyncio.sleep(feed.poll_seconds)

    def _invalidated_since(self, ctx: RequestContext) -> frozenset[str]:
        """The request's tags invalidated since it looked the cache up."""
        if ctx.cache_epoch == self.invalidations or not ctx.tags:
            return frozenset()
        if self._cleared > ctx.cache_epoch or (  # everything, or too long ago to tell
            self._invalidated and self._invalidated[0][0] > ctx.cache_epoch + 1
        ):
            return frozenset(ctx.tags)
        return frozenset(t for epoch, tags in self._invalidated if epoch > ctx.cache_epoch
                         for t in tags if t in ctx.tags)

    @staticmethod
    def _bypass(ctx: RequestContext, policy: Policy) -> CacheBypass | None:
        """Why the cache may not serve or store ``ctx``; None when it may."""
        if ctx.cache_mode == "bypass":
            return CacheBypass.CLIENT
        if not policy.enabled:
            return CacheBypass.DISABLED
        if ctx.endpoint != "chat" or policy.any_temperature:
            return None
        temperature = ctx.body.get("temperature")
        if not isinstance(temperature, int | float):  # providers then sample at the default
            unset = policy.max_temperature < DEFAULT_TEMPERATURE
            return CacheBypass.TEMPERATURE_UNSET if unset else None
        above = temperature > policy.max_temperature
        return CacheBypass.TEMPERATURE_ABOVE_MAX if above else None

    async def __call__(self, ctx: RequestContext, next: Next) -> Reply:
        policy = self.policy(ctx.feature, ctx.requested_model)
        reason = self._bypass(ctx, policy)
        if reason is not None:
            ctx.cache_status, ctx.cache_reason = "bypass", reason
            return await next(ctx)
        digest = (
            request_hash(ctx.endpoint, ctx.body, loose=True) if policy.loose else ctx.request_hash
        )
        ctx.cache_key = self.key_for(ctx, digest)
        ctx.cache_writable, ctx.cache_ttl = True, policy.ttl_seconds
        ctx.cache_epoch = self.invalidations
        if ctx.cache_mode != "refresh":
            raw = await self.store.get(ctx.cache_key, time.time())
            if raw is not None:
                return self.serve(ctx, raw, "hit-exact")
        return await next(ctx)

    def serve(self, ctx: RequestContext, raw: bytes, status: str) -> Reply:
        """Answer ``ctx`` with a stored response (``status``: hit-exact or hit-semantic)."""
        body = orjson.loads(raw)
        ctx.cache_status, ctx.cache_writable = status, False
        ctx.model = body.get("model") or ctx.requested_model
        ctx.provider = "cache"
        ctx.usage = Usage.from_openai(body.get("usage")) or Usage()
        if ctx.stream:
            chunks = chunks_from_completion(body, include_usage=ctx.client_wants_usage)
            return Reply(chunks=_replay(chunks))
        return Reply(body=body, raw=raw)

    async def save(self, ctx: RequestContext, body: dict[str, Any], raw: bytes | None) -> bool:
        """Store a finished response if the request allows it and the answer is complete."""
        if not ctx.cache_writable or ctx.status != 200:
            return False
        if self._invalidated_since(ctx):
            return False  # its data changed since the lookup: the answer may be stale
        if ctx.endpoint == "chat" and not is_complete(body):
            return False
        value = raw if raw is not None else orjson.dumps(body)
        if len(value) > self.config.max_entry_bytes:
            return False
        expires = time.time() + ctx.cache_ttl if ctx.cache_ttl > 0 else 0.0
        await self.store.set(CacheEntry(ctx.cache_key, value, expires, ctx.tags))
        if stale := self._invalidated_since(ctx):  # one ran during the write and may miss it
            await self.store.invalidate_tags(sorted(stale))
            return False
        return True
