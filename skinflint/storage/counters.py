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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from skinflint.interfaces import Admission, Amounts, Claim, CounterRow

__all__ = ["SWEEP_SECONDS", "MemoryBudgetCounters", "SQLiteBudgetCounters", "Tally", "admit"]

log = logging.getLogger("skinflint.budgets")

SWEEP_SECONDS = 60.0  # how often counters of ended windows are dropped


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
_UPSERT = (f"INSERT INTO budget_counters (budget, subject, window_start, window_end, {_COLUMNS})"
           " VALUES (?, ?, ?, ?, 0, 0, 0, ?, ?, ?) ON CONFLICT DO UPDATE SET"
           " reserved_usd = reserved_usd + excluded.reserved_usd,"
           " reserved_requests = reserved_requests + excluded.reserved_requests,"
           " reserved_tokens = reserved_tokens + excluded.reserved_tokens")
_SETTLE = ("UPDATE budget_counters SET"
           " reserved_usd = max(reserved_usd - ?, 0),"
           " reserved_requests = max(reserved_requests - ?, 0),"
           " reserved_tokens = max(reserved_tokens - ?, 0),"
           " spent_usd = spent_usd + ?, spent_requests = spent_requests + ?,"
           " spent_tokens = spent_tokens + ?"
           " WHERE budget = ? AND subject = ? AND window_start = ?")


def _row_counter(row: tuple[float, ...] | None, window_end: float) -> Tally:
    if row is None:
        return Tally(window_end)
    end, su, sr, st, ru, rr, rt = row
    return Tally(end, su, int(sr), int(st), ru, int(rr), int(rt))


class SQLiteBudgetCounters:
    """Counters in a table of the SQLite file, shared by every process that opens it. One
    thread per store owns the connection, so calls of this process apply in order and never
    block the event loop."""

    def __init__(self, path: str) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="skinflint-budgets")
        self._conn = self._thread.submit(self._connect, path).result()
        self._next_sweep = 0.0

    @staticmethod
    def _connect(path: str) -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        return conn

    async def reserve(self, claims: Sequence[Claim], now: float) -> Admission:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._reserve, list(claims), now)

    def _reserve(self, claims: list[Claim], now: float) -> Admission:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if now >= self._next_sweep:
                self._next_sweep = now + SWEEP_SECONDS
                conn.execute("DELETE FROM budget_counters WHERE window_end <= ?", (now,))
            counters = [_row_counter(conn.execute(_SELECT, _key(c)).fetchone(), c.window_end)
                        for c in claims]
            admission = admit(claims, counters)
            if admission.blocked is None:
                conn.executemany(_UPSERT, [
                    (*_key(c), c.window_end, c.amount.usd, c.amount.requests, c.amount.tokens)
                    for c in claims
                ])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return admission

    def settle(self, claims: Sequence[Claim], actual: Amounts) -> None:
        rows = [(c.amount.usd, c.amount.requests, c.amount.tokens,
                 actual.usd, actual.requests, actual.tokens, *_key(c)) for c in claims]
        self._thread.submit(self._settle, rows)

    def _settle(self, rows: Sequence[tuple[object, ...]]) -> None:
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_SETTLE, rows)
            conn.execute("COMMIT")
        except sqlite3.Error:  # runs in the background: nobody else would hear of it
            log.exception("could not settle budget counters")
            if conn.in_transaction:
                conn.execute("ROLLBACK")

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
        await asyncio.get_running_loop().run_in_executor(self._thread, self._conn.close)
        self._thread.shutdown(wait=True)
