"""The response cache: one service that owns the cache's rules, its keys, serving and storing
answers, and tag invalidation. The exact and semantic cache stages, the account stage, the
admin API and the CLI all go through it.

Exact entries hold whole answers under a normalised key, within the request's scope (tenant,
user or shared). Semantic entries point at exact entries: a semantic hit serves the stored
answer of the matched question, which shares that entry's TTL, tags and invalidation, and
nothing is indexed that the exact cache would not store.

What is compared semantically is the last user message, and only against entries with the same
partition: the same scope, model or route, output-affecting parameters and preceding context
(system prompt, tools, earlier turns), so one conversation never matches another. A message
longer than ``max_question_chars`` is compared by its last paragraph, and the text before it
joins the partition, so it must match exactly. Similarity above the threshold is necessary,
not sufficient: a word-level verifier rejects candidates whose numbers, dates, names, negations
or order differ.

Identical requests that miss together are coalesced (see :mod:`skinflint.pipeline.inflight`):
the first goes upstream, the others wait for its answer to be stored and are served it as exact
hits. Whoever learns the answer's fate (the account stage) calls :meth:`ResponseCache.release`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson

from skinflint.cachekey import request_hash, scoped_key
from skinflint.config import UNCAPPED, CacheConfig, CachePolicy, Settings, TokenBudgets
from skinflint.embed import canonical_name
from skinflint.errors import ConfigError
from skinflint.interfaces import CacheEntry, CacheStore, InvalidationFeed, SemanticIndex
from skinflint.messages import last_user_text
from skinflint.metrics import Metrics
from skinflint.models import CacheBypass, StreamChunk, Usage
from skinflint.pipeline.context import (
    CacheDecision,
    CachePlan,
    Reply,
    RequestContext,
    SemanticProbe,
)
from skinflint.pipeline.embedding import GuardedEmbedder
from skinflint.pipeline.inflight import Flights
from skinflint.semantic.verifier import compare
from skinflint.streaming import chunks_from_completion, is_complete

__all__ = [
    "DEFAULT_TEMPERATURE",
    "ItemPlan",
    "Policy",
    "ResponseCache",
    "context_digest",
    "merged_policy",
    "semantic_defaults",
    "semantic_setting",
    "split_question",
    "temperature_bypass",
]

log = logging.getLogger("skinflint.cache")

_TAG_HISTORY = 1024  # invalidations remembered, to tell which in-flight answers they concern

#: What providers use when a request sets no temperature.
DEFAULT_TEMPERATURE = 1.0

# Besides 5xx, the statuses of failures another try may not repeat (a timeout, a rate limit,
# the client gone): one request waiting for the failed one then goes upstream in its place.
_RETRYABLE = frozenset({408, 429, 499})


@dataclass(frozen=True, slots=True)
class Policy:
    """The cache's rules for one feature and route, merged from the configuration."""

    enabled: bool
    ttl_seconds: float
    loose: bool
    max_temperature: float
    any_temperature: bool
    threshold: float | None  # the semantic cache's similarity; None when it is off


def merged_policy(config: CacheConfig, threshold: float, feature: str, model: str) -> Policy:
    """The rules for a feature and a requested model or route: the defaults, then the route's
    own, then the feature's own (``threshold``: the semantic cache's default)."""
    ex, sem = config.exact, config.semantic
    enabled, ttl, norm = ex.enabled, ex.ttl_seconds, ex.normalization
    max_t, any_t = ex.max_temperature, False
    overrides: tuple[CachePolicy | None, ...] = (ex.routes.get(model), ex.features.get(feature))
    for o in overrides:
        if o is None:
            continue
        enabled = enabled if o.enabled is None else o.enabled
        ttl = ttl if o.ttl_seconds is None else o.ttl_seconds
        norm = norm if o.normalization is None else o.normalization
        max_t = max_t if o.max_temperature is None else o.max_temperature
        any_t = any_t if o.cache_any_temperature is None else o.cache_any_temperature
    semantic = sem.enabled
    for p in (sem.routes.get(model), sem.features.get(feature)):
        if p is not None:
            semantic = semantic if p.enabled is None else p.enabled
            threshold = threshold if p.threshold is None else p.threshold
    return Policy(enabled, ttl, norm == "loose", max_t, any_t, threshold if semantic else None)


def temperature_bypass(policy: Policy, body: dict[str, Any]) -> CacheBypass | None:
    """Why the temperature rules keep a chat request ``body`` out of the cache; None when they
    do not."""
    if policy.any_temperature:
        return None
    temperature = body.get("temperature")
    if not isinstance(temperature, int | float):  # providers then sample at the default
        unset = policy.max_temperature < DEFAULT_TEMPERATURE
        return CacheBypass.TEMPERATURE_UNSET if unset else None
    above = temperature > policy.max_temperature
    return CacheBypass.TEMPERATURE_ABOVE_MAX if above else None


def semantic_defaults() -> dict[str, Any]:
    """The calibrated default: embedder, threshold and verifier setting, with the precision and
    recall they reached on labelled pairs (see ``skinflint cache calibrate``)."""
    text = (resources.files("skinflint") / "data" / "semantic_default.json").read_text()
    found: dict[str, Any] = orjson.loads(text)
    return found


def semantic_setting(settings: Settings, feature: str = "", route: str = "") -> tuple[float, bool]:
    """The similarity threshold (a route's, then a feature's own, as the cache applies them)
    and the verifier setting: the configuration's, else the calibrated default. Raises
    ConfigError when the semantic cache is on with an embedder that has no threshold."""
    cfg = settings.cache.semantic
    defaults = semantic_defaults()
    policies = (*cfg.features.values(), *cfg.routes.values())
    enabled = cfg.enabled or any(policy.enabled for policy in policies)
    calibrated_for = canonical_name(defaults["embedder"])
    if enabled and cfg.threshold is None and canonical_name(cfg.embedder) != calibrated_for:
        # a threshold is a property of one vector space: another embedder's would be a guess
        raise ConfigError(
            f"cache.semantic.threshold: the calibrated default is for the {defaults['embedder']!r}"
            f" embedder; choose one for {cfg.embedder!r} with `skinflint cache calibrate PAIRS`"
        )
    threshold = cfg.threshold if cfg.threshold is not None else float(defaults["threshold"])
    for policy in (cfg.routes.get(route), cfg.features.get(feature)):
        if policy is not None and policy.threshold is not None:
            threshold = policy.threshold
    verifier = cfg.verifier if cfg.verifier is not None else bool(defaults["verifier"])
    return threshold, verifier


def split_question(text: str, limit: int) -> tuple[str, str] | None:
    """``(context, question)``: the whole text when it is at most ``limit`` characters, else its
    last paragraph (or line) as the question and what precedes it as context that must match
    exactly, as in "<document>\n\nQuestion: ...". None when no last part is short enough."""
    if len(text) <= limit:
        return "", text
    for separator in ("\n\n", "\n"):
        cut = text.rstrip().rfind(separator)
        if cut < 0:
            continue
        question = text[cut:].strip()
        if question and len(question) <= limit:
            return text[:cut], question
    return None


def _context_digest(ctx: RequestContext, context: str) -> str:
    return context_digest(ctx.body, context)


def context_digest(body: dict[str, Any], context: str) -> str:
    """The semantic partition of a chat request body before its scope: the request hash with
    the last user message replaced by the part of it that must match exactly (everything but
    the question). Offline analyses (the audit) partition logged requests with it too."""
    messages = list(body.get("messages") or [])
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], dict) and messages[i].get("role") == "user":
            content = messages[i].get("content")
            if isinstance(content, list):  # images, audio and files stay part of the context
                others = [p for p in content if not isinstance(p, dict) or p.get("type") != "text"]
                messages[i] = {**messages[i], "content": [*others, context]}
            else:
                messages[i] = {**messages[i], "content": context}
            break
    return request_hash("semantic", {**body, "messages": messages})


async def _replay(chunks: list[dict[str, Any]]) -> AsyncIterator[StreamChunk]:
    for data in chunks:
        yield StreamChunk(data=data)


class ItemPlan:
    """The answers of single batch_map items, by digest, within one request's scope (the
    runner's ``ItemCache``): stored under the request's tags, for the policy's TTL."""

    def __init__(self, cache: ResponseCache, ctx: RequestContext, ttl_seconds: float, *,
                 read: bool) -> None:
        self._cache, self._ctx, self._ttl, self._read = cache, ctx, ttl_seconds, read

    def _key(self, digest: str) -> str:
        return self._cache.key_for(self._ctx, scoped_key("batch_map_item", digest))

    async def get(self, digests: Sequence[str]) -> list[bytes | None]:
        if not self._read:  # x-skinflint-cache: refresh asks anew, and stores the answers
            return [None] * len(digests)
        now, store = self._cache.clock(), self._cache.backend
        return list(await asyncio.gather(*(store.get(self._key(d), now) for d in digests)))

    async def put(self, entries: Sequence[tuple[str, bytes]]) -> None:
        expires = self._cache.clock() + self._ttl if self._ttl > 0 else 0.0
        tags = self._ctx.tags
        for digest, value in entries:
            await self._cache.backend.set(CacheEntry(self._key(digest), value, expires, tags))


class ResponseCache:
    def __init__(
        self,
        config: CacheConfig,
        store: CacheStore,
        metrics: Metrics,
        *,
        routes: frozenset[str] = frozenset(),
        threshold: float = 1.0,
        verifier: bool = True,
        clock: Callable[[], float] = time.time,
        token_budgets: TokenBudgets | None = None,
    ) -> None:
        """``routes``: names whose answer also depends on the task header and the feature.
        ``threshold`` and ``verifier``: the semantic cache's defaults (see
        :func:`semantic_setting`). ``clock``: the time entries expire by. ``token_budgets``:
        the output caps the budget-tokens stage applies after the lookup; keys include them."""
        self.config = config
        self.backend = store
        self._routes = routes
        self._metrics = metrics
        self._threshold = threshold
        self._verifier = verifier
        self.clock = clock  # the time entries expire by
        capped = token_budgets is not None and token_budgets.configured
        self._caps = token_budgets if capped else None
        self._policies: dict[tuple[str, str], Policy] = {}
        self._flights = Flights(config.exact.coalesce_timeout_seconds)
        ex, sem = config.exact, config.semantic
        self.exact_enabled = ex.enabled or bool(ex.features) or bool(ex.routes)
        self.semantic_enabled = self.exact_enabled and (
            sem.enabled or any(p.enabled for p in (*sem.features.values(), *sem.routes.values()))
        )
        # Tag invalidations: how many have started, and the tags of the latest (by the count
        # when each started).
        self.invalidations = 0
        self._invalidated: deque[tuple[int, frozenset[str]]] = deque(maxlen=_TAG_HISTORY)
        self._cleared = 0  # the count when everything was last invalidated at once
        # both set by ``open_semantic`` once the embedder is in memory; until then the semantic
        # cache passes requests through
        self._embedder: GuardedEmbedder | None = None
        self._index: SemanticIndex | None = None

    # ---- policy: the one place the cache's rules are decided

    def policy(self, feature: str, model: str) -> Policy:
        """The rules for a feature and a requested model or route: the defaults, then the
        route's own, then the feature's own."""
        ex, sem = self.config.exact, self.config.semantic
        # Memoised by configured names only: feature and model come from the client.
        feature = feature if feature in ex.features or feature in sem.features else ""
        model = model if model in ex.routes or model in sem.routes else ""
        try:
            return self._policies[feature, model]
        except KeyError:
            found = self._policies[feature, model] = self._merge(feature, model)
            return found

    def _merge(self, feature: str, model: str) -> Policy:
        return merged_policy(self.config, self._threshold, feature, model)

    def bypass(self, ctx: RequestContext, policy: Policy) -> CacheBypass | None:
        """Why the cache may not serve or store ``ctx``; None when it may."""
        if ctx.cache_mode == "bypass":
            return CacheBypass.CLIENT
        if not policy.enabled:
            return CacheBypass.DISABLED
        if ctx.endpoint != "chat":
            return None
        return temperature_bypass(policy, ctx.body)

    # ---- keys

    def _scope(self, ctx: RequestContext) -> str:
        scope = self.config.exact.scope
        if scope == "shared":
            return "shared"
        if scope == "user":  # the tenant's length keeps ("a:b", "c") apart from ("a", "b:c")
            return f"u:{len(ctx.tenant)}:{ctx.tenant}:{ctx.user}"
        return f"t:{ctx.tenant}"

    def key_for(self, ctx: RequestContext, digest: str, *, uncapped: bool = False) -> str:
        """``digest`` within the request's scope; for a route, also within its task and
        feature, and for a feature with a policy of its own (a TTL, say), within that feature,
        so that no request is served an answer stored under another feature's policy; with
        token budgets, also within the output cap that applies to it (none, ``uncapped``: a
        request deferred to a provider batch is sent as the client wrote it)."""
        if self._caps is not None:
            scope = UNCAPPED if uncapped else self._cap_scope(ctx)
            digest = scoped_key(f"cap\0{scope}", digest)
        if ctx.requested_model in self._routes:
            digest = scoped_key(f"route\0{ctx.task}\0{ctx.feature}", digest)
        elif ctx.feature in self.config.exact.features:
            digest = scoped_key(f"feature\0{ctx.feature}", digest)
        return scoped_key(self._scope(ctx), digest)

    def _cap_scope(self, ctx: RequestContext) -> str:
        assert self._caps is not None
        downgrade = ctx.budget.downgrade_to if ctx.budget is not None else ""
        routed = ctx.requested_model in self._routes or downgrade in self._routes
        return self._caps.cache_scope(ctx.feature, ctx.requested_model, routed=routed)

    # ---- serving

    def _exact(self, ctx: RequestContext, *, uncapped: bool = False
               ) -> tuple[str, Policy] | None:
        """``ctx``'s exact key and policy (see :meth:`key_for`); None (and ``ctx.cache`` says
        why) when the cache may not serve it."""
        policy = self.policy(ctx.feature, ctx.requested_model)
        reason = self.bypass(ctx, policy)
        if reason is not None:
            ctx.cache = CacheDecision("bypass", reason)
            return None
        digest = (
            request_hash(ctx.endpoint, ctx.body, loose=True) if policy.loose else ctx.request_hash
        )
        return self.key_for(ctx, digest, uncapped=uncapped), policy

    async def lookup(self, ctx: RequestContext) -> Reply | None:
        """Decide whether the cache serves and stores ``ctx`` (its ``cache`` and
        ``cache_plan``), and answer it from an exact entry when there is one."""
        found = self._exact(ctx)
        if found is None:
            return None
        key, policy = found
        ctx.cache_plan = CachePlan(key, policy.ttl_seconds, self.invalidations)
        if ctx.cache_mode == "refresh":  # never waits, but those that arrive meanwhile may
            self._flights.lead(key, ctx)
            return None
        raw = await self.backend.get(key, self.clock())
        if raw is None:  # wait for an identical request in flight, else lead the key
            raw = await self._flights.join(key, ctx, lambda: self.backend.get(key, self.clock()))
        return None if raw is None else self.serve(ctx, raw, CacheDecision("hit-exact"))

    async def deferred(self, ctx: RequestContext
                       ) -> tuple[Reply | None, tuple[str, float] | None]:
        """For a request deferred to a provider batch (answered now, or later by its batch,
        with no output cap either way): ``ctx`` answered from an exact entry when the cache
        holds one and may serve it (nothing in flight is waited for or led); else the key and
        TTL under which its answer may be stored when it arrives, None when it may not be: the
        cache may not store it, or it has tags (an invalidation in the hours before its answer
        arrives could not be told from one before the request)."""
        found = self._exact(ctx, uncapped=True) if self.exact_enabled else None
        if found is None:
            return None, None
        key, policy = found
        if ctx.cache_mode != "refresh":
            raw = await self.backend.get(key, self.clock())
            if raw is not None:
                return self.serve(ctx, raw, CacheDecision("hit-exact")), None
        return None, (None if ctx.tags else (key, policy.ttl_seconds))

    async def keep(self, key: str, ttl_seconds: float, raw: bytes) -> bool:
        """Store an answer that arrived later under ``key`` (see :meth:`deferred`), if it is a
        complete answer and fits."""
        if len(raw) > self.config.exact.max_entry_bytes or not is_complete(orjson.loads(raw)):
            return False
        expires = self.clock() + ttl_seconds if ttl_seconds > 0 else 0.0
        await self.backend.set(CacheEntry(key, raw, expires, ()))
        return True

    def release(self, ctx: RequestContext) -> None:
        """Wake the requests waiting for ``ctx``'s answer: call it once the answer is stored or
        known never to be (failed, abandoned, not storable), whatever happened. After a failure
        another try may fix, one of them goes upstream next; otherwise they all do."""
        if ctx.cache_plan is not None:
            retry = ctx.status >= 500 or ctx.status in _RETRYABLE
            self._flights.land(ctx.cache_plan.key, ctx, retry=retry)

    def semantic_threshold(self, ctx: RequestContext) -> float | None:
        """The similarity a semantic match needs, or None when the semantic cache does not
        look ``ctx`` up (off for it, not yet loaded, not cacheable, or a batch_map packed
        call)."""
        if self._index is None or ctx.cache_plan is None or ctx.endpoint != "chat":
            return None
        if ctx.packed is not None:  # a similar list of items is other items: never the same
            return None
        return self.policy(ctx.feature, ctx.requested_model).threshold

    async def lookup_similar(self, ctx: RequestContext, threshold: float) -> Reply | None:
        """Answer ``ctx`` from the entry of a similar earlier question, if one passes; keep
        its question's embedding (``ctx.semantic``) to index the answer once stored."""
        assert self._index is not None and self._embedder is not None
        split = split_question(last_user_text(ctx.body.get("messages")),
                               self.config.semantic.max_question_chars)
        if split is None or not split[1].strip():
            return None
        context, question = split
        partition = self.key_for(ctx, _context_digest(ctx, context))
        vector = await self._embedder.vector(question)
        if vector is None:
            return None
        ctx.semantic = SemanticProbe(partition, question, vector)
        if ctx.cache_mode == "refresh":
            return None
        try:
            return await self._similar(ctx, self._index, ctx.semantic, threshold)
        except Exception as exc:  # a broken index costs a lookup, not the request
            self._index_failed("lookup", exc)
            return None

    async def _similar(
        self, ctx: RequestContext, index: SemanticIndex, probe: SemanticProbe, threshold: float
    ) -> Reply | None:
        top_k = self.config.semantic.top_k
        for key, similarity, text in await index.search(probe.partition, probe.vector, top_k):
            if similarity < threshold:
                break
            if self._verifier:
                kind = compare(probe.question, text).kind
                if kind:
                    self._metrics.child(self._metrics.semantic_rejected, kind).inc()
                    continue
            raw = await self.backend.get(key, self.clock())
            if raw is None:  # expired or invalidated with its exact entry
                await index.remove(key)
                continue
            await index.touch(key)
            return self.serve(ctx, raw, CacheDecision("hit-semantic", similarity=similarity))
        return None

    def _index_failed(self, what: str, exc: Exception) -> None:
        self._metrics.child(self._metrics.semantic_skipped, f"index_{what}_error").inc()
        log.warning("semantic cache: %s failed, request passed on: %r", what, exc)

    def serve(self, ctx: RequestContext, raw: bytes, decision: CacheDecision) -> Reply:
        """Answer ``ctx`` with a stored response."""
        body = orjson.loads(raw)
        ctx.cache, ctx.model = decision, body.get("model") or ""
        ctx.usage = Usage.from_openai(body.get("usage")) or Usage()
        if ctx.stream:
            chunks = chunks_from_completion(body, include_usage=ctx.client_wants_usage)
            return Reply(chunks=_replay(chunks))
        return Reply(body=body, raw=raw)

    # ---- storing

    async def store(self, ctx: RequestContext, body: dict[str, Any], raw: bytes | None) -> bool:
        """Store a finished answer if the request allows it, the answer is complete and the
        model chosen for it gave it (not a fallback's or a downgrade's): the exact entry, then
        the question in the semantic index."""
        plan = ctx.cache_plan
        if plan is None or ctx.cache.hit or ctx.status != 200:
            return False
        if ctx.substituted:  # later requests for the model asked would get another's answer
            return False
        if self._invalidated_since(ctx, plan):
            return False  # its data changed since the lookup: the answer may be stale
        if ctx.endpoint == "chat" and not is_complete(body):
            return False
        value = raw if raw is not None else orjson.dumps(body)
        if len(value) > self.config.exact.max_entry_bytes:
            return False
        expires = self.clock() + plan.ttl_seconds if plan.ttl_seconds > 0 else 0.0
        await self.backend.set(CacheEntry(plan.key, value, expires, ctx.tags))
        if stale := self._invalidated_since(ctx, plan):  # one ran during the write
            await self.backend.invalidate_tags(sorted(stale))
            return False
        await self._index_question(ctx, plan)
        return True

    async def _index_question(self, ctx: RequestContext, plan: CachePlan) -> None:
        if ctx.semantic is None or self._index is None:
            return
        probe = ctx.semantic
        try:
            await self._index.add(probe.partition, plan.key, probe.question, probe.vector)
        except Exception as exc:  # the answer is already served; only the index misses it
            self._index_failed("add", exc)

    # ---- single items of batch_map requests

    def item_plan(self, ctx: RequestContext) -> ItemPlan | None:
        """How batch_map items asked like ``ctx`` (an attributed request: its scope, feature
        and model) are cached; None when the cache may not serve them."""
        policy = self.policy(ctx.feature, ctx.requested_model)
        if self.bypass(ctx, policy) is not None:
            return None
        return ItemPlan(self, ctx, policy.ttl_seconds, read=ctx.cache_mode != "refresh")

    # ---- invalidation

    async def invalidate_tags(self, tags: list[str]) -> int:
        """Drop the entries tagged with any of ``tags``. An answer with one of those tags to a
        request already in flight is then not stored: it may rest on the data the tag stood
        for (see :meth:`store`)."""
        self._note(tags)
        return await self.backend.invalidate_tags(tags)

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

    def _invalidated_since(self, ctx: RequestContext, plan: CachePlan) -> frozenset[str]:
        """The request's tags invalidated since it looked the cache up."""
        if plan.epoch == self.invalidations or not ctx.tags:
            return frozenset()
        if self._cleared > plan.epoch or (  # everything, or too long ago to tell
            self._invalidated and self._invalidated[0][0] > plan.epoch + 1
        ):
            return frozenset(ctx.tags)
        return frozenset(t for epoch, tags in self._invalidated if epoch > plan.epoch
                         for t in tags if t in ctx.tags)

    # ---- life cycle

    @property
    def embedder(self) -> GuardedEmbedder | None:
        """The semantic cache's embedder, once loaded (None before, or with the cache off)."""
        return self._embedder

    def open_semantic(self, embedder: GuardedEmbedder, index: SemanticIndex) -> None:
        """Start the semantic cache (called once loading is done, from the loading thread:
        the two assignments are atomic, and requests treat a missing index as 'not yet')."""
        self._embedder, self._index = embedder, index

    async def close(self) -> None:
        """Stop the semantic cache (the store is closed by whoever opened it)."""
        if self._embedder is not None:
            self._embedder.close()
        if self._index is not None:
            await self._index.close()
