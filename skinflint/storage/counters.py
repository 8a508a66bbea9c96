"""Budget counters in memory (one process), and what every store shares: :func:`admit`, which
decides admission (the SQLite store, :mod:`skinflint.storage.sqlite_counters`, runs it inside one
``BEGIN IMMEDIATE`` transaction, so concurrent processes never both take the last unit of a
budget), and the handling of reservations and settlements made on a server.

A counter is one row keyed by (budget, subject, window start), holding what was spent and what
admitted requests have reserved but not yet settled."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from skinflint.errors import BudgetStoreError
from skinflint.interfaces import Admission, Amounts, Claim, CounterRow

__all__ = [
    "SWEEP_SECONDS",
    "MemoryBudgetCounters",
    "Tally",
    "admit",
    "persist",
    "unless_abandoned",
]

log = logging.getLogger("skinflint.budgets")

SWEEP_SECONDS = 60.0  # how often counters of ended windows are dropped
_SETTLE_DELAY = 0.02  # seconds a settlement waits to share the next reservation's transaction


@dataclass(slots=True)
class Tally:
    """One counter's amounts, spent (``s*``) and reserved (``r*``), kept as plain numbers:
    they change for every request."""

    window_end: float
    su: float = 0.0
    sr: int = 0
    st: int = 0
    ru: float = 0.0
    rr: int = 0
    rt: int = 0

    def reserve(self, a: Amounts) -> None:
        self.ru += a.usd
        self.rr += a.requests
        self.rt += a.tokens

    def settle(self, reserved: Amounts, actual: Amounts) -> None:
        # never below zero: a counter swept with its window may be settled late
        self.ru = max(self.ru - reserved.usd, 0.0)
        self.rr = max(self.rr - reserved.requests, 0)
        self.rt = max(self.rt - reserved.tokens, 0)
        self.su += actual.usd
        self.sr += actual.requests
        self.st += actual.tokens

    def row(self, budget: str, subject: str, start: float) -> CounterRow:
        return CounterRow(budget, subject, start, self.window_end,
                          Amounts(self.su, self.sr, self.st), Amounts(self.ru, self.rr, self.rt))


def admit(claims: Sequence[Claim], counters: Sequence[Tally]) -> Admission:
    """Decide for ``claims`` against their ``counters`` (same order) and, when admitted,
    reserve their amounts in the counters. Written for speed: it runs for every request."""
    before, after = [], []
    for i, claim in enumerate(claims):
        n, a, limits = counters[i], claim.amount, claim.limits
        usd, requests, tokens = n.su + n.ru, n.sr + n.rr, n.st + n.rt
        before.append(limits.ratio(usd, requests, tokens))
        usd, requests, tokens = usd + a.usd, requests + a.requests, tokens + a.tokens
        if claim.hard and not limits.allows(usd, requests, tokens):
            return Admission(i, (), ())
        after.append(limits.ratio(usd, requests, tokens))
    for claim, counter in zip(claims, counters, strict=True):
        counter.reserve(claim.amount)
    return Admission(None, tuple(before), tuple(after))


async def unless_abandoned(
    reservation: Awaitable[Admission], release: Callable[[], None],
    errors: tuple[type[BaseException], ...],
) -> Admission:
    """Await a reservation made on a server. If the caller is cancelled meanwhile (its client
    left), the reservation still completes and, if it was made, is released by ``release``:
    nobody would settle it. A server error in ``errors`` becomes :class:`BudgetStoreError`."""
    task = asyncio.ensure_future(reservation)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda t: _release_if_made(t, release))
        raise
    except errors as exc:
        raise BudgetStoreError(f"budget counters unavailable: {type(exc).__name__}") from exc


def _release_if_made(task: asyncio.Future[Admission], release: Callable[[], None]) -> None:
    if not task.cancelled() and task.exception() is None and task.result().blocked is None:
        release()


#: Seconds between tries to write a settlement to a server that refuses it; then it is lost.
SETTLE_RETRIES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


async def persist(write: Callable[[], Awaitable[None]],
                  errors: tuple[type[BaseException], ...]) -> None:
    """Write a settlement, trying again for about half a minute while the server refuses it
    (a reservation never settled would hold its amount until its window ends)."""
    for delay in (*SETTLE_RETRIES, None):
        try:
            await write()
            return
        except errors as exc:
            if delay is None:
                log.error("budget counters: a settlement was not written: %s", exc)
                return
            log.warning("budget counters: settlement refused (%s); trying again", exc)
            await asyncio.sleep(delay)


def _key(claim: Claim) -> tuple[str, str, float]:
    return claim.budget, claim.subject, claim.window_start


class MemoryBudgetCounters:
    """Counters in this process's memory: for one process, and for tests."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, str, float], Tally] = {}
        self._lock = threading.Lock()  # callers may be threads (the CLI, tests)
        self._next_sweep = 0.0

    async def reserve(self, claims: Sequence[Claim], now: float) -> Admission:
        with self._lock:
            if now >= self._next_sweep:
                self._sweep(now)
            counters = [self._counter(c) for c in claims]
            return admit(claims, counters)

    def _counter(self, claim: Claim) -> Tally:
        key = _key(claim)
        found = self._counters.get(key)
        if found is None:
            found = self._counters[key] = Tally(claim.window_end)
        return found

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_SECONDS
        for key in [k for k, c in self._counters.items() if c.window_end <= now]:
            del self._counters[key]

    def settle(self, claims: Sequence[Claim], actual: Amounts) -> None:
        with self._lock:
            for claim in claims:
                found = self._counters.get(_key(claim))
                if found is not None:
                    found.settle(claim.amount, actual)

    async def snapshot(self, now: float) -> list[CounterRow]:
        with self._lock:
            return [c.row(b, s, start) for (b, s, start), c in self._counters.items()
                    if c.window_end > now]

    async def close(self) -> None:
        pass
