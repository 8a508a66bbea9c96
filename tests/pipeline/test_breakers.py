"""The per-provider circuit breaker: alone with a hand-driven clock, then in the call stage
against scripted providers."""

from __future__ import annotations

import pytest

from skinflint.errors import (
    UpstreamConnectionError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from skinflint.metrics import Metrics
from skinflint.pipeline.breakers import BreakerState, ProviderBreaker, counts_against
from skinflint.pipeline.call import CallProvider, RetryPolicy
from skinflint.pipeline.context import Target
from tests.pipeline.parts import Recorder, Scripted, answer, chat, context

NO_RETRY = RetryPolicy(max_retries=0, timeout=5)
A, B = Target("a", "p", "a-1"), Target("b", "q", "b-1")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _breaker(metrics: Metrics, clock: Clock, failures: int = 3) -> ProviderBreaker:
    return ProviderBreaker("p", failures=failures, cooldown=10.0, metrics=metrics, clock=clock)


def _state(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("skinflint_provider_circuit_state",
                                             {"provider": "p"})


@pytest.mark.parametrize(("error", "counts"), [
    (UpstreamConnectionError("refused"), True), (UpstreamTimeoutError("slow"), True),
    (UpstreamProtocolError("garbled"), True), (UpstreamStatusError(500, "oops"), True),
    (UpstreamStatusError(503, "busy"), True), (UpstreamStatusError(429, "slow down"), False),
    (UpstreamStatusError(400, "bad"), False), (UpstreamStatusError(404, "no model"), False),
])
def test_what_counts_against_a_provider(error: UpstreamError, counts: bool) -> None:
    assert counts_against(error) is counts


def test_it_opens_after_n_failures_in_a_row_then_probes_once_after_the_cooldown() -> None:
    metrics, clock = Metrics(), Clock()
    b = _breaker(metrics, clock)
    for _ in range(2):
        assert b.wait() is None
        b.failed()
    b.succeeded()  # a success in between: the count starts again
    for _ in range(3):
        assert b.wait() is None
        b.failed()
    assert b.state is BreakerState.OPEN and _state(metrics) == 1 and b.tripped
    assert metrics.registry.get_sample_value("skinflint_provider_circuit_opened_total",
                                             {"provider": "p"}) == 1
    clock.now += 4
    assert b.wait() == pytest.approx(6.0)
    clock.now += 6
    assert b.wait() is None  # the probe
    assert b.state is BreakerState.HALF_OPEN and _state(metrics) == 2
    assert b.wait() == 0.0  # only one probe at a time
    b.failed()  # the probe failed: another cool-down
    assert b.state is BreakerState.OPEN and b.wait() == pytest.approx(10.0)
    clock.now += 10
    assert b.wait() is None
    b.succeeded()
    assert b.state is BreakerState.CLOSED and _state(metrics) == 0 and not b.tripped
    assert b.wait() is None and b.wait() is None
    assert metrics.registry.get_sample_value("skinflint_provider_circuit_opened_total",
                                             {"provider": "p"}) == 2


def test_an_abandoned_probe_lets_the_next_call_probe() -> None:
    metrics, clock = Metrics(), Clock()
    b = _breaker(metrics, clock, failures=1)
    b.failed()
    clock.now += 10
    assert b.wait() is None
    b.abandoned()
    assert b.wait() is None and b.state is BreakerState.HALF_OPEN


def test_zero_failures_never_opens() -> None:
    b = ProviderBreaker("p", failures=0, cooldown=1.0, metrics=Metrics())
    for _ in range(100):
        b.failed()
    assert b.wait() is None and b.state is BreakerState.CLOSED


def _stage(metrics: Metrics, clock: Clock, *providers: Scripted) -> CallProvider:
    return CallProvider({p.name: p for p in providers}, {p.name: NO_RETRY for p in providers},
                        metrics, {"p": _breaker(metrics, clock, failures=2)})


async def test_an_open_provider_fails_fast_then_falls_back() -> None:
    metrics, clock = Metrics(), Clock()
    p = Scripted("p", *[_timeout() for _ in range(2)], answer("p again"))
    q = Scripted("q", *[answer("from q")] * 3)
    stage = _stage(metrics, clock, p, q)
    for _ in range(2):
        ctx = context(chat(), targets=(A, B))
        assert (await stage(ctx, Recorder())).body == answer("from q")
    assert len(p.requests) == 2
    ctx = context(chat(), targets=(A, B))
    assert (await stage(ctx, Recorder())).body == answer("from q")
    assert len(p.requests) == 2  # skipped: no call made
    assert isinstance(ctx.errors[0], UpstreamUnavailableError)

    with pytest.raises(UpstreamUnavailableError) as caught:
        await stage(context(chat(), targets=(A,)), Recorder())
    assert caught.value.status == 503 and caught.value.code == "upstream_unavailable"
    assert caught.value.retry_after == pytest.approx(10.0)

    clock.now += 10  # the probe goes through and closes the circuit
    assert (await stage(context(chat(), targets=(A,)), Recorder())).body == answer("p again")
    assert len(p.requests) == 3 and _state(metrics) == 0


async def test_retries_stop_once_the_circuit_opens() -> None:
    metrics, clock = Metrics(), Clock()
    p = Scripted("p", *[_timeout() for _ in range(5)])
    retrying = RetryPolicy(max_retries=4, backoff_base=0.001, backoff_max=0.01, timeout=5)
    stage = CallProvider({"p": p}, {"p": retrying}, metrics,
                         {"p": _breaker(metrics, clock, failures=2)})
    with pytest.raises(UpstreamTimeoutError):
        await stage(context(chat(), targets=(A,)), Recorder())
    assert len(p.requests) == 2


def _timeout() -> UpstreamTimeoutError:
    return UpstreamTimeoutError("slow", provider="p")
