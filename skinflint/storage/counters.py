"""Budget counters: in memory (one process) and in the SQLite file (every process that opens
it, as ``serve --workers N`` does). Both decide admission with :func:`admit`; SQLite does it
inside one ``BEGIN IMMEDIATE`` transaction, so concurrent processes never both take the last
unit of a budget.

A counter is one row keyed by (budget, subject, window start), holding what was spent and what
admitted requests have reserved but not yet settled."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from skinflint.errors import BudgetStoreError
from skinflint.interfaces import Admission, Amounts, Claim, CounterRow

__all__ = [
    "SWEEP_SECONDS",
    "MemoryBudgetCounters",
    "SQLiteBudgetCounters",
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


_SCHEMA = """
CREATE TABLE IF NOT EXISTS budget_counters (
    budget TEXT NOT NULL, subject TEXT NOT NULL, window_start REAL NOT NULL,
    window_end REAL NOT NULL,
    spent_usd REAL NOT NULL DEFAULT 0, spent_requests INTEGER NOT NULL DEFAULT 0,
    spent_tokens INTEGER NOT NULL DEFAULT 0,
    reserved_usd REAL NOT NULL DEFAULT 0, reserved_requests INTEGER NOT NULL DEFAULT 0,
    reserved_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (budget, subject, window_start)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS budget_counters_end ON budget_counters (window_end);
"""
_COLUMNS = ("spent_usd, spent_requests, spent_tokens, "
            "reserved_usd, reserved_requests, reserved_tokens")
_SELECT = (f"SELECT window_end, {_COLUMNS} FROM budget_counters "
           "WHERE budget = ? AND subject = ? AND window_start = ?")
# Inside the transaction that read them, the counters are written back whole.
_WRITE = (f"INSERT OR REPLACE INTO budget_counters (budget, subject, window_start, window_end,"
          f" {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def _row_counter(row: tuple[float, ...] | None, window_end: float) -> Tally:
    if row is None:
        return Tally(window_end)
    end, su, sr, st, ru, rr, rt = row
    return Tally(end, su, int(sr), int(st), ru, int(rr), int(rt))


class SQLiteBudgetCounters:
    """Counters in a table of the SQLite file, shared by every process that opens it.

    One thread per store owns the connection and applies, in one transaction, everything that
    arrived since its last one: the settlements, then the reservations in their order (group
    commit: under load, one transaction admits many requests; a settlement waits up to 20 ms
    for the next reservation's). Nothing blocks the event loop.

    A file locked past ``busy_timeout`` (another process in a long write transaction) or
    refusing writes fails the reservations of that transaction with :class:`BudgetStoreError`
    (503); its settlements are kept and applied with the next transaction, retried every
    ``retry`` seconds meanwhile, so a spent amount is never lost and a reservation never
    outlives its request. A reservation whose caller went away (a cancelled request) is
    released as soon as it is made."""

    def __init__(self, path: str, *, busy_timeout: float = 5.0, retry: float = 1.0) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="skinflint-budgets")
        self._conn = self._thread.submit(self._connect, path, busy_timeout).result()
        self._retry = retry
        self._next_sweep = 0.0
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # a reservation was queued
        self._reservations: list[_Reservation] = []
        self._settlements: list[tuple[Sequence[Claim], Amounts]] = []
        self._draining = False
        self._closed = False

    @staticmethod
    def _connect(path: str, busy_timeout: float) -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        return conn

    async def reserve(self, claims: Sequence[Claim], now: float) -> Admission:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Admission] = loop.create_future()
        with self._lock:
            self._reservations.append(_Reservation(claims, now, loop, waiter))
            self._arrived.notify()
            self._wake()
        try:
            return await waiter
        except asyncio.CancelledError:  # released here if made, else when it is (_deliver)
            if waiter.done() and not waiter.cancelled() and waiter.result().blocked is None:
                self.settle(claims, Amounts())
            raise

    def settle(self, claims: Sequence[Claim], actual: Amounts) -> None:
        with self._lock:
            self._settlements.append((claims, actual))
            self._wake()

    def _wake(self) -> None:
        """Start the thread's drain unless it runs already (call holding ``_lock``)."""
        if not self._draining and not self._closed:
            self._draining = True
            self._thread.submit(self._drain)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._reservations and self._settlements and not self._closed:
                    # settlements alone can wait a moment for the next reservation's commit
                    self._arrived.wait(_SETTLE_DELAY)
                reservations, self._reservations = self._reservations, []
                settlements, self._settlements = self._settlements, []
                if not reservations and not settlements:
                    self._draining = False
                    return
            try:
                admissions = self._apply(settlements, reservations)
            except sqlite3.Error as exc:
                log.warning("budget counters unavailable (%s); settlements kept", exc)
                with self._lock:
                    self._settlements[:0] = settlements
                failure = BudgetStoreError(f"budget counters unavailable: {exc}")
                for r in reservations:
                    r.loop.call_soon_threadsafe(_fail, r.waiter, failure)
                if not reservations:
                    time.sleep(self._retry)  # only settlements wait: try again shortly
                continue
            for r, admission in zip(reservations, admissions, strict=True):
                r.loop.call_soon_threadsafe(self._deliver, r, admission)

    def _deliver(self, r: _Reservation, admission: Admission) -> None:
        """On the caller's loop: hand the admission over, or release it if nobody waits."""
        if not r.waiter.done():
            r.waiter.set_result(admission)
        elif admission.blocked is None:
            self.settle(r.claims, Amounts())

    def _apply(self, settlements: list[tuple[Sequence[Claim], Amounts]],
               reservations: list[_Reservation]) -> list[Admission]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            now = max((r.now for r in reservations), default=0.0)
            if reservations and now >= self._next_sweep:
                conn.execute("DELETE FROM budget_counters WHERE window_end <= ?", (now,))
            tallies: dict[tuple[str, str, float], Tally] = {}
            for claims, _ in settlements:
                for c in claims:
                    self._tally(tallies, c, create=False)
            for claims, actual in settlements:
                for c in claims:
                    found = tallies.get(_key(c))
                    if found is not None:
                        found.settle(c.amount, actual)
            admissions = [admit(r.claims, [self._tally(tallies, c) for c in r.claims])
                          for r in reservations]
            conn.executemany(_WRITE, [(*k, t.window_end, t.su, t.sr, t.st, t.ru, t.rr, t.rt)
                                      for k, t in tallies.items()])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if reservations and now >= self._next_sweep:
            self._next_sweep = now + SWEEP_SECONDS
        return admissions

    def _tally(self, tallies: dict[tuple[str, str, float], Tally], claim: Claim, *,
               create: bool = True) -> Tally:
        """The counter of ``claim`` in this transaction: read once, then kept in ``tallies``
        (a counter that does not exist is not created to be settled: its window ended)."""
        key = _key(claim)
        found = tallies.get(key)
        if found is None:
            row = self._conn.execute(_SELECT, key).fetchone()
            if row is None and not create:
                return Tally(claim.window_end)
            found = tallies[key] = _row_counter(row, claim.window_end)
        return found

    async def snapshot(self, now: float) -> list[CounterRow]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._snapshot, now)

    def _snapshot(self, now: float) -> list[CounterRow]:
        rows = self._conn.execute(
            f"SELECT budget, subject, window_start, window_end, {_COLUMNS} "
            "FROM budget_counters WHERE window_end > ? ORDER BY budget, subject", (now,))
        return [CounterRow(b, s, start, end, Amounts(su, int(sr), int(st)),
                           Amounts(ru, int(rr), int(rt)))
                for b, s, start, end, su, sr, st, ru, rr, rt in rows]

    async def close(self) -> None:
        """Apply what is pending (one more try), then close the connection."""
        with self._lock:
            self._closed = True
            self._arrived.notify()
        await asyncio.get_running_loop().run_in_executor(self._thread, self._last)
        self._thread.shutdown(wait=True)

    def _last(self) -> None:
        with self._lock:
            settlements, self._settlements = self._settlements, []
        try:
            if settlements:
                self._apply(settlements, [])
        except sqlite3.Error as exc:
            log.error("budget counters: %d settlements not written: %s", len(settlements), exc)
        self._conn.close()


@dataclass(slots=True)
class _Reservation:
    claims: Sequence[Claim]
    now: float
    loop: asyncio.AbstractEventLoop
    waiter: asyncio.Future[Admission]


def _fail(waiter: asyncio.Future[Admission], exc: BaseException) -> None:
    if not waiter.done():
        waiter.set_exception(exc)
