"""Stage 10, account: usage (the provider's, else counted offline), cost from the price
catalog, saving against the baseline, the ledger row, and storing the answer in the caches.

It acts after every other stage has returned, for every outcome: answered, served from cache,
failed, or abandoned by the client. A stream is accounted when it ends. A deferred request
(``202``) has no row of its own: the batch service writes one when its result arrives, unless
the exact cache answered it at once (a cache hit's row, now).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, cast

from skinflint.errors import ShuttingDownError, SkinflintError
from skinflint.interfaces import Ledger
from skinflint.metrics import Metrics
from skinflint.models import CLIENT_LEFT, LedgerRecord, StreamChunk, Usage
from skinflint.pipeline.cache import ResponseCache
from skinflint.pipeline.context import Costs, Next, PackedItems, Reply, RequestContext
from skinflint.pipeline.shadow import ShadowGuard
from skinflint.pricing import PriceCatalog
from skinflint.streaming import StreamAssembler, is_truncated
from skinflint.tokens import TokenCounter

__all__ = ["Account"]

CLIENT_CLOSED = 499
RULE_STRATEGY = "rule"  # the ledger's strategy (and provider) for a rule's answer
BATCH_MAP_STRATEGY = "batch_map"  # the strategy of each item's row of a packed call
_CACHE_STRATEGY = {"hit-exact": "exact_cache", "hit-semantic": "semantic_cache"}


def _provider(ctx: RequestContext) -> str:
    """The ledger's ``provider``: who answered (``cache`` and ``rule`` are the gateway)."""
    if ctx.rule is not None:
        return RULE_STRATEGY
    if ctx.cache.hit:
        return "cache"
    return ctx.answered.provider if ctx.answered is not None else ""


def _share(total: float | None, fractions: list[float], i: int, last: int) -> float | None:
    """Item ``i``'s part of ``total``; the last item takes what the others leave, so that the
    parts sum to the total exactly."""
    if total is None:
        return None
    if i < last:
        return total * fractions[i]
    return total - sum(total * f for f in fractions[:last])


class Account:
    name = "account"
    enabled = True

    def __init__(
        self,
        *,
        catalog: PriceCatalog,
        tokens: TokenCounter,
        ledger: Ledger,
        metrics: Metrics,
        cache: ResponseCache,
        baseline_model: str | None = None,
        route_baselines: Mapping[str, str] | None = None,
        shadow: ShadowGuard | None = None,
    ) -> None:
        """Savings are measured against ``baseline_model`` (a route's own baseline for a
        route), else against the model asked for. ``shadow`` is shown each compressed request
        answered."""
        self._catalog = catalog
        self._tokens = tokens
        self._ledger = ledger
        self._metrics = metrics
        self._cache = cache
        self._baseline_model = baseline_model
        self._route_baselines = dict(route_baselines or {})
        self._shadow = shadow

    async def __call__(self, ctx: RequestContext, next: Next) -> Reply:
        try:
            reply = await next(ctx)
        except BaseException as exc:  # re-raised: the row is written whatever happened
            self._failed(ctx, exc)
            raise
        if reply.chunks is not None:
            if ctx.served_locally:  # priced already: its headers can say so
                ctx.costs = self._price(ctx)
            return Reply(chunks=self._observe(ctx, reply.chunks), status=reply.status)
        assert reply.body is not None
        if ctx.deferred:  # its row is written when its result is (now, if the cache answered)
            self._finish(ctx)
            return reply
        ctx.model = reply.body.get("model") or ctx.answered_model
        ctx.truncated = is_truncated(reply.body)
        try:  # the client may leave (cancelling this task) while usage is counted or stored
            if ctx.usage is None:
                ctx.usage = await self._usage(ctx, reply.body)
            await self._cache.store(ctx, reply.body, reply.raw)
        finally:
            self._finish(ctx)
        if self._shadow is not None and ctx.compression is not None:
            self._shadow.observe(ctx, reply.body)
        return reply

    def _failed(self, ctx: RequestContext, exc: BaseException) -> None:
        self._mark_failure(ctx, exc)
        self._finish(ctx)

    @staticmethod
    def _mark_failure(ctx: RequestContext, exc: BaseException) -> None:
        if isinstance(exc, SkinflintError):
            ctx.status, ctx.error_type = exc.status, exc.code or exc.error_type
        elif isinstance(exc, asyncio.CancelledError) and exc.args != (CLIENT_LEFT,):
            ctx.status, ctx.error_type = ShuttingDownError.status, ShuttingDownError.code or ""
        elif isinstance(exc, asyncio.CancelledError | GeneratorExit):
            ctx.status, ctx.error_type = CLIENT_CLOSED, "client_disconnected"
        else:
            ctx.status, ctx.error_type = 500, type(exc).__name__

    async def _observe(
        self, ctx: RequestContext, chunks: AsyncIterator[StreamChunk]
    ) -> AsyncIterator[StreamChunk]:
        """Relay the stream, rebuilding the completion; account once it ends, however it ends."""
        assembler = StreamAssembler()
        started, failure = time.perf_counter(), None
        completion: dict[str, Any] | None = None
        try:
            async for chunk in chunks:
                assembler.add(chunk.data)
                if ctx.client_wants_usage or chunk.data.get("choices"):
                    yield chunk
        except BaseException as exc:  # re-raised; GeneratorExit is the client leaving
            failure = exc
            raise
        finally:
            ctx.model = assembler.model or ctx.answered_model
            try:
                if not ctx.served_locally:
                    ctx.upstream_ms += (time.perf_counter() - started) * 1000
                    completion = assembler.completion()
                    ctx.truncated = is_truncated(completion)
                    ctx.usage = await self._usage(ctx, completion)
                    if failure is None:
                        await self._cache.store(ctx, completion, None)
            finally:  # the row is written even if this is cancelled in turn
                if failure is not None:
                    self._mark_failure(ctx, failure)
                self._finish(ctx)
            if completion is not None and failure is None and self._shadow is not None:
                self._shadow.observe(ctx, completion)

    async def _usage(self, ctx: RequestContext, body: dict[str, Any]) -> Usage:
        usage = Usage.from_openai(body.get("usage"))
        if usage is not None:
            return usage
        model = ctx.answered_model
        self._metrics.child(self._metrics.counted_usage, model).inc()
        if not self._tokens.ready(model):  # the tokenizer loads once, off the event loop
            await asyncio.to_thread(self._tokens.prepare, model)
        if ctx.endpoint == "embeddings":
            inputs = ctx.body.get("input")
            texts = inputs if isinstance(inputs, list) else [inputs]
            n = sum(self._tokens.count_text(model, t) for t in texts if isinstance(t, str))
            return Usage(input_tokens=n, counted=True)
        messages = ctx.body.get("messages") or []
        return Usage(
            input_tokens=self._tokens.count_messages(model, messages),
            output_tokens=self._tokens.count_completion(model, body),
            counted=True,
        )

    def _cost(self, name: str, usage: Usage | None) -> float | None:
        cost = self._catalog.cost(name, usage or Usage())
        if cost is None:
            self._metrics.child(self._metrics.unknown_price, name).inc()
        return cost

    def _baseline_for(self, ctx: RequestContext) -> str:
        # An embedding is never routed to another model: its baseline is the model asked for.
        if ctx.endpoint == "embeddings":
            return ctx.requested_model
        return (self._route_baselines.get(ctx.requested_model) or self._baseline_model
                or ctx.requested_model)

    def _price(self, ctx: RequestContext) -> Costs:
        """The request's total cost (the calls that did not answer included: a retried call
        of unknown tokens adds nothing), baseline and saving, and the answering call's own
        cost."""
        baseline = self._baseline_for(ctx)
        baseline_cost = self._catalog.cost(baseline, ctx.usage or Usage())
        if ctx.served_locally or ctx.answered is None:
            own: float | None = 0.0  # served without a provider, or never reached one
        else:
            own = self._cost(ctx.answered.name, ctx.usage)
        tiers = [self._cost(a.target.name, a.usage) for a in ctx.attempts]
        known = own is not None and all(c is not None for c in tiers)
        cost = (own or 0.0) + sum(c or 0.0 for c in tiers) if known else None
        saved = baseline_cost - cost if cost is not None and baseline_cost is not None else None
        return Costs(cost, own, baseline, baseline_cost, saved)

    @staticmethod
    def _row(ctx: RequestContext, **fields: Any) -> LedgerRecord:
        """A ledger row for ``ctx``; ``fields`` set what differs from the request's own row."""
        usage = ctx.usage or Usage()
        row: dict[str, Any] = dict(
            request_id=ctx.request_id,
            ts=ctx.ts,
            request_hash=ctx.request_hash,
            tenant=ctx.tenant,
            feature=ctx.feature,
            user=ctx.user,
            requested_model=ctx.requested_model,
            model=ctx.answered_model,
            provider=_provider(ctx),
            endpoint=ctx.endpoint,
            **usage.columns(),
            baseline_cost_usd=ctx.costs.baseline_cost_usd,
            saved_usd=ctx.costs.saved_usd,
            cache_status=ctx.cache.status,
            upstream_latency_ms=ctx.upstream_ms,
            status=ctx.status,
            error_type=ctx.error_type,
            route=ctx.route_label,
            similarity=ctx.cache.similarity,
            cache_reason=ctx.cache.reason.value if ctx.cache.reason is not None else "",
            truncated=int(ctx.truncated),
            tokens_saved=ctx.compression.tokens_removed if ctx.compression is not None else 0,
        )
        row.update(fields)
        return LedgerRecord(**row)

    def _strategy(self, ctx: RequestContext) -> str:
        if ctx.rule is not None:
            return RULE_STRATEGY
        if ctx.cache.hit:
            return _CACHE_STRATEGY[ctx.cache.status]
        if any(not a.retry for a in ctx.attempts):
            return "cascade"
        return "route" if ctx.route is not None and ctx.route.routed else ""

    def _finish(self, ctx: RequestContext) -> None:
        self._cache.release(ctx)  # first: whatever fails below, nobody waits in vain
        ctx.costs = self._price(ctx)
        # Calls whose answer was not returned (cascade tiers, retried calls): their cost
        # counts. A retried call of unknown tokens has an unknown cost (NULL), not zero.
        for a in ctx.attempts:
            u = a.usage or Usage()
            self._ledger.record(
                self._row(
                    ctx,
                    request_id=ctx.request_id + a.suffix,
                    model=a.target.provider_model,
                    provider=a.target.provider,
                    **u.columns(),
                    cost_usd=(None if a.retry and a.usage is None
                              else self._catalog.cost(a.target.name, u)),
                    baseline_cost_usd=0.0,
                    saved_usd=0.0,
                    cache_status="miss",
                    cache_reason="",
                    strategy=a.strategy,
                    tokens_saved=0,
                    upstream_latency_ms=a.upstream_ms,
                    status=a.status,
                    error_type=a.error_type or str(a.verdict),
                    similarity=None,
                    truncated=0,
                )
            )
            if not a.retry:
                self._metrics.child(
                    self._metrics.cascade_escalations, a.target.name, a.verdict.reason
                ).inc()
        latency_ms = (time.perf_counter() - ctx.started) * 1000
        if ctx.deferred and not ctx.cache.hit:
            pass  # its row is written when its result arrives
        elif ctx.packed is not None and not ctx.served_locally:
            self._record_items(ctx, ctx.packed, latency_ms)
        else:
            self._ledger.record(self._row(ctx, cost_usd=ctx.costs.own_usd,
                                          strategy=self._strategy(ctx), latency_ms=latency_ms))
        self._observe_metrics(ctx, ctx.usage or Usage())
        if ctx.on_accounted is not None:
            ctx.on_accounted(ctx)

    def _record_items(self, ctx: RequestContext, packed: PackedItems, latency_ms: float) -> None:
        """A packed call's row, split into one row per item it carried: each with its share
        (by weight) of the call's tokens and cost; the shares sum to the call's figures."""
        counts = cast("dict[str, int]", (ctx.usage or Usage()).columns())  # every value an int
        removed = ctx.compression.tokens_removed if ctx.compression is not None else 0
        split = {name: packed.shares(n) for name, n in (*counts.items(),
                                                         ("tokens_saved", removed))}
        fractions = packed.fractions()
        costs = ctx.costs
        money = {"cost_usd": costs.own_usd, "baseline_cost_usd": costs.baseline_cost_usd,
                 "saved_usd": costs.saved_usd}
        last = len(fractions) - 1
        for i, position in enumerate(packed.positions):
            shared = {name: _share(total, fractions, i, last) for name, total in money.items()}
            tokens = {name: parts[i] for name, parts in split.items()}
            if packed.solo_tokens or packed.retry:
                alone = Usage(input_tokens=packed.solo_tokens[i] if packed.solo_tokens else 0,
                              output_tokens=split["output_tokens"][i])
                shared.update(self._item_baseline(costs.baseline_model, alone, packed.retry,
                                                  shared["cost_usd"]))
                if not packed.retry:  # the prompt tokens packing saved, against the item alone
                    tokens["tokens_saved"] += alone.input_tokens - tokens["input_tokens"]
            self._ledger.record(self._row(
                ctx, request_id=f"{ctx.request_id}.i{position}", **tokens, **shared,
                strategy=BATCH_MAP_STRATEGY, latency_ms=latency_ms))

    def record_cached_items(self, ctx: RequestContext, items: Sequence[tuple[int, Usage]],
                            latency_ms: float) -> None:
        """One row per batch_map item of ``ctx`` (the request as attributed) that the response
        cache answered, ``(position, usage asked alone)``: an exact-cache hit, no cost, saving
        what asking it alone of the baseline model would have cost."""
        baseline = self._baseline_for(ctx)
        for position, alone in items:
            cost = self._catalog.cost(baseline, alone)
            self._ledger.record(self._row(
                ctx, request_id=f"{ctx.request_id}.i{position}", model=ctx.requested_model,
                provider="cache", **alone.columns(), cost_usd=0.0, baseline_cost_usd=cost,
                saved_usd=cost, cache_status="hit-exact", cache_reason="",
                strategy=_CACHE_STRATEGY["hit-exact"], latency_ms=latency_ms, status=200,
                error_type="", similarity=None, truncated=0, tokens_saved=0))
        self._metrics.child(self._metrics.requests, ctx.endpoint, ctx.requested_model,
                            "hit-exact", "200").inc(len(items))

    def _item_baseline(self, model: str, alone: Usage, retry: bool,
                       cost: float | None) -> dict[str, float | None]:
        """An item's baseline: the item asked alone (its prompt, its share of the output) on
        the baseline model; none for a retry, whose cost is what batching lost."""
        baseline = 0.0 if retry else self._catalog.cost(model, alone)
        saved = baseline - cost if baseline is not None and cost is not None else None
        return {"baseline_cost_usd": baseline, "saved_usd": saved}

    def _observe_metrics(self, ctx: RequestContext, usage: Usage) -> None:
        m = self._metrics
        model, status = ctx.answered_model, ctx.cache.status
        m.child(m.requests, ctx.endpoint, model, status, str(ctx.status)).inc()
        m.child(m.latency, ctx.endpoint).observe(time.perf_counter() - ctx.started)
        if ctx.cache.reason is not None:
            m.child(m.cache_bypassed, ctx.cache.reason.value).inc()
        if ctx.costs.cost_usd:
            m.child(m.cost, model).inc(ctx.costs.cost_usd)
        if ctx.costs.saved_usd is not None and ctx.costs.saved_usd > 0:  # a fallback can cost more
            m.child(m.saved, status).inc(ctx.costs.saved_usd)
        if ctx.truncated:
            m.child(m.truncated, m.feature(ctx.feature)).inc()
        if usage.input_tokens:
            m.child(m.tokens, model, "input").inc(usage.input_tokens)
        if usage.output_tokens:
            m.child(m.tokens, model, "output").inc(usage.output_tokens)
