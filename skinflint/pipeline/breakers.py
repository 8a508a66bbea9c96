"""A circuit breaker per provider, so that a provider that keeps failing is skipped quickly
instead of costing every request its timeouts and retries.

After ``failures`` failed calls in a row (connection errors, timeouts, 5xx, unreadable or cut
answers; not the client's own 4xx, not 429 which says when to come back) the provider's circuit
is **open** for ``cooldown`` seconds: calls to it fail at once without touching the network.
Then it is **half-open**: one call is let through as a probe (the others still fail fast); its
success closes the circuit, its failure opens it for another cool-down.

State is per process: each gateway worker or replica learns a provider's health on its own,
which costs each of them at most ``failures`` failed calls per cool-down.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import IntEnum

from skinflint.errors import UpstreamError, UpstreamStatusError
from skinflint.metrics import Metrics

__all__ = ["BreakerState", "ProviderBreaker", "counts_against"]

log = logging.getLogger("skinflint.upstream")


class BreakerState(IntEnum):
    """The value of the ``skinflint_provider_circuit_state`` gauge."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


def counts_against(error: UpstreamError) -> bool:
    """Whether ``error`` says the provider is unwell (rather than the request being wrong or
    the provider asking to slow down)."""
    if isinstance(error, UpstreamStatusError):
        return error.status >= 500
    return error.retryable


class ProviderBreaker:
    """The circuit of one provider. ``failures`` 0 disables it (it never opens)."""

    def __init__(
        self,
        provider: str,
        *,
        failures: int,
        cooldown: float,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider = provider
        self._limit = failures if failures > 0 else float("inf")
        self._cooldown = cooldown
        self._metrics = metrics
        self._clock = clock
        self._failures = 0
        self._open_until = 0.0
        self._probing = False
        self.state = BreakerState.CLOSED
        metrics.breaker_state.labels(provider).set(0)

    @property
    def tripped(self) -> bool:
        """Whether the circuit is open or half-open (read only: no probe is granted)."""
        return self._failures >= self._limit

    def wait(self) -> float | None:
        """None to make the call now; else the seconds until the provider is tried again.
        A call let through while the circuit is not closed is the probe: report its outcome
        with :meth:`succeeded`, :meth:`failed` or :meth:`abandoned`."""
        if self._failures < self._limit:
            return None  # closed: the whole cost on the hot path
        now = self._clock()
        if self._probing or now < self._open_until:
            return max(self._open_until - now, 0.0)
        self._probing = True
        self._set(BreakerState.HALF_OPEN)
        return None

    def succeeded(self) -> None:
        if self._failures:
            self._failures = 0
            if self._probing or self.state is not BreakerState.CLOSED:
                log.warning("provider %s answers again: its circuit is closed", self.provider)
                self._probing = False
                self._set(BreakerState.CLOSED)

    def failed(self) -> None:
        self._failures += 1
        if self._failures < self._limit:
            return
        if self._probing or self.state is BreakerState.CLOSED:
            log.warning("provider %s failed %d times in a row: skipped for %g s",
                        self.provider, self._failures, self._cooldown)
            self._metrics.breaker_opened.labels(self.provider).inc()
        self._probing = False
        self._open_until = self._clock() + self._cooldown
        self._set(BreakerState.OPEN)

    def abandoned(self) -> None:
        """The call ended with no verdict on the provider (the client left): if it was the
        probe, the next call probes instead."""
        if self._probing:
            self._probing = False
            self._open_until = 0.0
            self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        if state is not self.state:
            self.state = state
            self._metrics.breaker_state.labels(self.provider).set(int(state))
