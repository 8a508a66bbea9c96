"""Calls a shared service makes to the gateway's providers on its own account, off the
request's answer: the shadow guard's uncompressed requests and judge, the compress stage's
system-prompt rewrites and summaries. One non-streaming call, tried once with its provider's
timeout, and the ledger row that records it (its cost counts; it is not a client request)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from skinflint.interfaces import Ledger, Provider
from skinflint.models import Completion, LedgerRecord, UpstreamRequest, Usage
from skinflint.pipeline.context import RequestContext, Target
from skinflint.pricing import PriceCatalog

__all__ = ["ProviderUpstream", "ServiceUpstream", "record_side_call", "side_call_row"]

JSON = dict[str, Any]


class ServiceUpstream(Protocol):
    """Where a service's calls go: the providers the gateway answers with."""

    def resolve(self, name: str) -> Target:
        """The target a model name or alias stands for."""
        ...

    async def complete(self, target: Target, body: JSON) -> Completion:
        """One non-streaming call of ``body`` to ``target``."""
        ...


class ProviderUpstream:
    """:class:`ServiceUpstream` over the gateway's providers, with each one's timeout."""

    def __init__(self, providers: Mapping[str, Provider], timeouts: Mapping[str, float],
                 resolve: Callable[[str], tuple[Target, ...]]) -> None:
        self._providers = providers
        self._timeouts = timeouts
        self._resolve = resolve

    def resolve(self, name: str) -> Target:
        return self._resolve(name)[0]

    async def complete(self, target: Target, body: JSON) -> Completion:
        body = {**body, "model": target.provider_model, "stream": False}
        body.pop("stream_options", None)
        timeout = self._timeouts.get(target.provider, 600.0)
        request = UpstreamRequest(target.provider_model, body, timeout)
        return await self._providers[target.provider].complete(request)


def side_call_row(ctx: RequestContext, target: Target, request_id: str, strategy: str,
                  usage: Usage | None, outcome: tuple[int, str], ms: float,
                  catalog: PriceCatalog) -> LedgerRecord:
    """The ledger row of a call made for ``ctx`` (``usage`` None: it failed, cost unknown)."""
    known = usage or Usage()
    return LedgerRecord(
        request_id=request_id, ts=time.time(), request_hash=ctx.request_hash,
        tenant=ctx.tenant, feature=ctx.feature, user=ctx.user,
        requested_model=ctx.requested_model, model=target.provider_model,
        provider=target.provider, **known.columns(),
        cost_usd=None if usage is None else catalog.cost(target.name, usage),
        baseline_cost_usd=0.0, saved_usd=0.0, strategy=strategy, latency_ms=ms,
        upstream_latency_ms=ms, status=outcome[0], error_type=outcome[1],
        route=ctx.route_label,
    )


def record_side_call(ledger: Ledger, ctx: RequestContext, row: LedgerRecord) -> None:
    """Record ``row``, a call made for ``ctx`` beside its own, and tell ``ctx`` of it (the
    budgets that admitted the request count its spend)."""
    ledger.record(row)
    if ctx.on_side_call is not None:
        ctx.on_side_call(row)
