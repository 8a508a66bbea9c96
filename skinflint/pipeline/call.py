"""Stage 9, call provider: send the request to each target in turn, retrying transient
failures with capped exponential backoff and jitter, honouring ``Retry-After``.

A stream is retried only until its first chunk arrives; after that the client has seen output
and an upstream failure ends the stream with an error event.

A failed call after which the provider may have done (and billed) the work, a timeout or an
answer cut short or unreadable, is kept on the context as an :class:`Attempt` when it is
retried or falls back, so that the account stage writes its ledger row; the call that ends the
request is the request's own row. Each provider's :class:`ProviderBreaker` hears the outcome of
every call, and a provider whose circuit is open is skipped without a call.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from skinflint.errors import (
    UpstreamConnectionError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from skinflint.interfaces import Provider
from skinflint.metrics import Metrics
from skinflint.models import StreamChunk, UpstreamRequest
from skinflint.pipeline.breakers import ProviderBreaker, counts_against
from skinflint.pipeline.context import Attempt, Next, Reply, RequestContext, Target
from skinflint.providers.http import DISCONNECTED

__all__ = ["CallProvider", "RetryPolicy", "may_have_cost"]

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


def may_have_cost(error: UpstreamError) -> bool:
    """Whether the provider may have done the work of a call that failed with ``error``: it
    was sent and no error status came back (a refused connection or an error answer is free)."""
    if isinstance(error, UpstreamConnectionError):
        return error.code == DISCONNECTED
    return isinstance(error, UpstreamTimeoutError | UpstreamProtocolError)


def _attempt(ctx: RequestContext, target: Target, error: UpstreamError, ms: float) -> Attempt:
    tier = ctx.route.tier if ctx.route is not None else 0
    number = sum(1 for a in ctx.attempts if a.retry) + 1
    return Attempt(tier, target, None, ms, error.status, error.code or error.error_type,
                   retry=number)


async def _prepend(
    first: StreamChunk, rest: AsyncIterator[StreamChunk], breaker: ProviderBreaker | None
) -> AsyncIterator[StreamChunk]:
    """The whole stream; a failure after its first chunk still tells the breaker."""
    yield first
    try:
        async for chunk in rest:
            yield chunk
    except UpstreamError as exc:
        if breaker is not None and counts_against(exc):
            breaker.failed()
        raise


class CallProvider:
    name = "call_provider"
    enabled = True

    def __init__(
        self,
        providers: Mapping[str, Provider],
        policies: Mapping[str, RetryPolicy],
        metrics: Metrics,
        breakers: Mapping[str, ProviderBreaker] | None = None,
    ) -> None:
        """``breakers``: the circuit of each provider that has one."""
        self._providers = providers
        self._policies = policies
        self._metrics = metrics
        self._breakers = dict(breakers or {})

    async def __call__(self, ctx: RequestContext, next: Next) -> Reply:
        """Terminal stage: ``next`` is never called."""
        for i, target in enumerate(ctx.targets):
            try:
                return await self._try_target(ctx, target)
            except UpstreamError as exc:
                ctx.errors.append(exc)
                if i == len(ctx.targets) - 1 or not _falls_back(exc):
                    if may_have_cost(exc):
                        ctx.attempts.pop()  # the request's own row records the last call
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
        """The target's answer, after retries; a call that may have cost money and failed is
        added to ``ctx.attempts`` (:meth:`__call__` takes back the one it raises)."""
        provider = self._providers[target.provider]
        policy = self._policies[target.provider]
        breaker = self._breakers.get(target.provider)
        request = self._request(ctx, target, policy.timeout)
        ctx.answered = target
        attempt = 0
        while True:
            if breaker is not None and (closed_for := breaker.wait()) is not None:
                raise UpstreamUnavailableError(
                    f"{provider.name}: upstream failing, skipped for {closed_for:.1f} s",
                    provider=provider.name,
                    retry_after=closed_for,
                )
            started = time.perf_counter()
            try:
                return await self._send(ctx, provider, request, breaker)
            except UpstreamError as exc:
                ms = (time.perf_counter() - started) * 1000
                if may_have_cost(exc):
                    ctx.attempts.append(_attempt(ctx, target, exc, ms))
                wait = self._retry_wait(provider.name, policy, attempt, exc, breaker)
                if wait is None:
                    raise
                ctx.errors.append(exc)
                self._metrics.child(self._metrics.retries, provider.name).inc()
            finally:
                ctx.upstream_ms += (time.perf_counter() - started) * 1000
            await asyncio.sleep(wait)
            attempt += 1

    def _retry_wait(
        self,
        name: str,
        policy: RetryPolicy,
        attempt: int,
        exc: UpstreamError,
        breaker: ProviderBreaker | None,
    ) -> float | None:
        """Seconds before trying provider ``name`` again after ``exc``; None: give up on it."""
        self._metrics.child(self._metrics.upstream_errors, name, exc.error_type).inc()
        if breaker is not None and breaker.tripped:
            return None  # its circuit just opened: fall back now rather than fail fast later
        if not exc.retryable:
            return None
        return policy.delay(attempt, exc.retry_after)

    async def _send(
        self,
        ctx: RequestContext,
        provider: Provider,
        request: UpstreamRequest,
        breaker: ProviderBreaker | None,
    ) -> Reply:
        """One call; ``breaker`` hears how it went."""
        if breaker is None:
            return await self._call(ctx, provider, request, None)
        try:
            reply = await self._call(ctx, provider, request, breaker)
        except UpstreamError as exc:
            if counts_against(exc):
                breaker.failed()
            else:
                breaker.succeeded()  # it answered: the request, not the provider, was wrong
            raise
        except BaseException:
            breaker.abandoned()
            raise
        breaker.succeeded()
        return reply

    async def _call(
        self,
        ctx: RequestContext,
        provider: Provider,
        request: UpstreamRequest,
        breaker: ProviderBreaker | None,
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
        return Reply(chunks=_prepend(first, chunks, breaker))
