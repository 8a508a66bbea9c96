"""Stage 9, call provider: send the request to each target in turn, retrying transient
failures with capped exponential backoff and jitter, honouring ``Retry-After``.

A stream is retried only until its first chunk arrives; after that the client has seen output
and an upstream failure ends the stream with an error event.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from skinflint.errors import UpstreamError, UpstreamProtocolError, UpstreamStatusError
from skinflint.interfaces import Provider
from skinflint.metrics import Metrics
from skinflint.models import StreamChunk, UpstreamRequest
from skinflint.pipeline.context import Next, Reply, RequestContext, Target

__all__ = ["CallProvider", "RetryPolicy"]

_FALLBACK_STATUSES = frozenset({401, 403, 404})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 2
    backoff_base: float = 0.25
    backoff_max: float = 8.0
    timeout: float = 600.0

    def delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds to wait before retry number ``attempt + 1``; None means do not retry."""
        if attempt >= self.max_retries:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= self.backoff_max else None
        ceiling = min(self.backoff_max, self.backoff_base * (2**attempt))
        return random.uniform(ceiling / 2, ceiling)


def _falls_back(error: UpstreamError) -> bool:
    return error.retryable or (
        isinstance(error, UpstreamStatusError) and error.status in _FALLBACK_STATUSES
    )


async def _prepend(
    first: StreamChunk, rest: AsyncIterator[StreamChunk]
) -> AsyncIterator[StreamChunk]:
    yield first
    async for chunk in rest:
        yield chunk


class CallProvider:
    name = "call_provider"
    enabled = True

    def __init__(
        self,
        providers: Mapping[str, Provider],
        policies: Mapping[str, RetryPolicy],
        metrics: Metrics,
    ) -> None:
        self._providers = providers
        self._policies = policies
        self._metrics = metrics

    async def __call__(self, ctx: RequestContext, next: Next) -> Reply:
        """Terminal stage: ``next`` is never called."""
        for i, target in enumerate(ctx.targets):
            try:
                return await self._try_target(ctx, target)
            except UpstreamError as exc:
                ctx.errors.append(exc)
                if i == len(ctx.targets) - 1 or not _falls_back(exc):
                    raise
        raise AssertionError("route stage produced no target")

    def _request(self, ctx: RequestContext, target: Target, timeout: float) -> UpstreamRequest:
        """The upstream call streams exactly when ``ctx.stream`` says so."""
        body = {**ctx.body, "model": target.provider_model}
        if ctx.stream:  # ask for usage even if the client did not: the ledger needs it
            opts = body.get("stream_options")
            body["stream_options"] = {
                **(opts if isinstance(opts, dict) else {}),
                "include_usage": True,
            }
        elif body.get("stream"):
            body["stream"] = False
            body.pop("stream_options", None)
        return UpstreamRequest(target.provider_model, body, timeout)

    async def _try_target(self, ctx: RequestContext, target: Target) -> Reply:
        provider = self._providers[target.provider]
        policy = self._policies[target.provider]
        request = self._request(ctx, target, policy.timeout)
        ctx.answered = target
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                return await self._send(ctx, provider, request)
            except UpstreamError as exc:
                self._metrics.child(
                    self._metrics.upstream_errors, provider.name, exc.error_type
                ).inc()
                wait = (
                    policy.delay(attempt, getattr(exc, "retry_after", None))
                    if exc.retryable
                    else None
                )
                if wait is None:
                    raise
                ctx.errors.append(exc)
                self._metrics.child(self._metrics.retries, provider.name).inc()
            finally:
                ctx.upstream_ms += (time.perf_counter() - started) * 1000
            await asyncio.sleep(wait)
            attempt += 1

    async def _send(
        self, ctx: RequestContext, provider: Provider, request: UpstreamRequest
    ) -> Reply:
        if ctx.endpoint == "embeddings":
            done = await provider.embed(request)
            return Reply(body=done.body, raw=done.raw)
        if not ctx.stream:
            done = await provider.complete(request)
            return Reply(body=done.body, raw=done.raw)
        chunks = provider.stream(request)
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            raise UpstreamProtocolError(
                f"{provider.name}: empty stream", provider=provider.name
            ) from None
        return Reply(chunks=_prepend(first, chunks))
