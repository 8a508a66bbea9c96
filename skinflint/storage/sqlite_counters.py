"""Budget counters in a table of the SQLite file, shared by every process that opens it (``serve
--workers N``, the CLI).

One thread per store owns the connection and applies, in one ``BEGIN IMMEDIATE`` transaction,
everything that arrived since its last one: given-back grants, settlements, then reservations in
their order (group commit: under load, one transaction admits many requests; settlements wait up
to :data:`SETTLE_DELAY` for the next reservation's). Nothing blocks the event loop.

Far from its limits, a request is admitted from a grant this process holds (see
:mod:`skinflint.storage.grants`), with no transaction at all; what such requests spend is
written in the next transaction.

A file locked past ``busy_timeout`` (another process in a long write transaction) or refusing
writes fails the reservations of that transaction with :class:`BudgetStoreError` (503); the
rest is kept and applied with the next transaction, retried every ``retry`` seconds meanwhile,
so a spent amount is never lost and a reservation never outlives its request. A reservation
whose caller went away (a cancelled request) is released as soon as it is made."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from skinflint.errors import BudgetStoreError
from skinflint.interfaces import Admission, Amounts, Claim, CounterRow
from skinflint.storage import grants as granting
from skinflint.storage.counters import SWEEP_SECONDS, Tally, admit
from skinflint.storage.grants import Grant, limited

__all__ = ["SETTLE_DELAY", "SQLiteBudgetCounters"]

log = logging.getLogger("skinflint.budgets")

SETTLE_DELAY = 0.02  # seconds what was spent waits to share the next reservation's transaction

Key = tuple[str, str, float]

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


def _key(claim: Claim) -> Key:
    return claim.budget, claim.subject, claim.window_start


def _row_counter(row: tuple[float, ...]) -> Tally:
    end, su, sr, st, ru, rr, rt = row
    return Tally(end, su, int(sr), int(st), ru, int(rr), int(rt))


@dataclass(slots=True)
class _Reservation:
    claims: Sequence[Claim]
    now: float
    loop: asyncio.AbstractEventLoop
    waiter: asyncio.Future[Admission]


class _Change(Tally):
    """What to add to a counter: spent (``s*``) and reserved (``r*``, negative to release).
    A counter that no longer exists (its window ended) is not created to take it."""

    def spend(self, a: Amounts) -> None:
        self.su += a.usd
        self.sr += a.requests
        self.st += a.tokens

    def release(self, a: Amounts) -> None:
        self.ru -= a.usd
        self.rr -= a.requests
        self.rt -= a.tokens

    def apply(self, t: Tally) -> None:
        t.su += self.su
        t.sr += self.sr
        t.st += self.st
        t.ru = max(t.ru + self.ru, 0.0)
        t.rr = max(t.rr + self.rr, 0)
        t.rt = max(t.rt + self.rt, 0)


class _Batch:
    """What one transaction applies, taken from the store under its lock."""

    def __init__(self, reservations: list[_Reservation],
                 settlements: list[tuple[Sequence[Claim], Amounts]],
                 changes: dict[Key, _Change]) -> None:
        self.reservations = reservations
        self.settlements = settlements
        self.changes = changes

    def __bool__(self) -> bool:
        return bool(self.reservations or self.settlements or self.changes)


class SQLiteBudgetCounters:
    """See the module docstring. ``transactions`` counts the transactions committed."""

    def __init__(self, path: str, *, busy_timeout: float = 5.0, retry: float = 1.0) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="skinflint-budgets")
        self._conn = self._thread.submit(self._connect, path, busy_timeout).result()
        self._retry = retry
        self._next_sweep = 0.0
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # a reservation was queued
        self._reservations: list[_Reservation] = []
        self._settlements: list[tuple[Sequence[Claim], Amounts]] = []
        self._changes: dict[Key, _Change] = {}  # spent from grants, grants given back
        self._grants: dict[Key, Grant] = {}
        # the grants requests were admitted from, by their claims, oldest first: requests
        # with equal claims are interchangeable for what settling them does
        self._taken: dict[tuple[Claim, ...], list[list[Grant]]] = {}
        self._expiry: asyncio.TimerHandle | None = None
        self._draining = False
        self._closed = False
        self.transactions = 0

    @staticmethod
    def _connect(path: str, busy_timeout: float) -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        return conn

    # ---- on the event loop

    async def reserve(self, claims: Sequence[Claim], now: float) -> Admission:
        if self._grants:
            with self._lock:
                admission = self._from_grants(claims)
            if admission is not None:
                return admission
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

    def _from_grants(self, claims: Sequence[Claim]) -> Admission | None:
        """Admit from this process's grants when they cover every claim (hold ``_lock``)."""
        now = time.monotonic()
        found = []
        for c in claims:
            g = self._grants.get(_key(c))
            if g is None or not g.covers(c.amount, now):
                return None
            found.append(g)
        before, after = zip(*(g.take(c.amount) for g, c in zip(found, claims, strict=True)),
                            strict=True)
        self._taken.setdefault(tuple(claims), []).append(found)
        return Admission(None, before, after)

    def settle(self, claims: Sequence[Claim], actual: Amounts) -> None:
        with self._lock:
            found = self._taken_from(tuple(claims))
            if found is None:
                self._settlements.append((claims, actual))
            else:
                for c, g in zip(claims, found, strict=True):
                    change = self._change(_key(c))
                    change.spend(actual)
                    if g.live:  # spent from the grant; what was not spent goes back to it
                        change.release(limited(g.limits, actual))
                        g.give_back(Amounts(c.amount.usd - actual.usd,
                                            c.amount.requests - actual.requests,
                                            c.amount.tokens - actual.tokens))
                    else:  # the grant was given back without this request's part
                        change.release(limited(g.limits, c.amount))
            self._wake()

    def _taken_from(self, claims: tuple[Claim, ...]) -> list[Grant] | None:
        waiting = self._taken.get(claims)
        if not waiting:
            return None
        found = waiting.pop(0)
        if not waiting:
            del self._taken[claims]
        return found

    def _change(self, key: Key) -> _Change:
        found = self._changes.get(key)
        if found is None:
            found = self._changes[key] = _Change(0.0)
        return found

    def _expire_soon(self) -> None:
        """Have the drain give back the grants once they have expired."""
        if self._expiry is None:
            loop = asyncio.get_running_loop()
            self._expiry = loop.call_later(granting.SECONDS + 0.05, self._expired)

    def _expired(self) -> None:
        self._expiry = None
        with self._lock:
            self._wake()
            if self._grants:
                self._expire_soon()

    # ---- on the store's thread

    def _wake(self) -> None:
        """Start the thread's drain unless it runs already (call holding ``_lock``)."""
        if not self._draining and not self._closed:
            self._draining = True
            self._thread.submit(self._drain)

    def _take_batch(self, *, everything: bool = False) -> _Batch:
        """What is pending, with the grants that expired (or all: ``everything``) given back
        (call holding ``_lock``)."""
        now = time.monotonic()
        for key, g in list(self._grants.items()):
            if everything or now >= g.expires:
                self._give_back(key, g)
        batch = _Batch(self._reservations, self._settlements, self._changes)
        self._reservations, self._settlements, self._changes = [], [], {}
        return batch

    def _give_back(self, key: Key, g: Grant) -> None:
        del self._grants[key]
        g.live = False
        self._change(key).release(g.held())

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._reservations and not self._closed:
                    # what was spent can wait a moment for the next reservation's commit
                    self._arrived.wait(SETTLE_DELAY)
                batch = self._take_batch()
                if not batch:
                    self._draining = False
                    return
            try:
                admissions = self._apply(batch)
            except sqlite3.Error as exc:
                self._failed(batch, exc)
                continue
            for r, (admission, grants) in zip(batch.reservations, admissions, strict=True):
                r.loop.call_soon_threadsafe(self._deliver, r, admission, grants)

    def _failed(self, batch: _Batch, exc: sqlite3.Error) -> None:
        """Keep what was spent or given back for the next transaction; refuse the requests."""
        log.warning("budget counters unavailable (%s); what was spent is kept", exc)
        with self._lock:
            self._settlements[:0] = batch.settlements
            for key, change in batch.changes.items():
                kept = self._change(key)
                kept.spend(Amounts(change.su, change.sr, change.st))
                kept.release(Amounts(-change.ru, -change.rr, -change.rt))
        failure = BudgetStoreError(f"budget counters unavailable: {exc}")
        for r in batch.reservations:
            r.loop.call_soon_threadsafe(_fail, r.waiter, failure)
        if not batch.reservations:
            time.sleep(self._retry)  # only what was spent waits: try again shortly

    def _deliver(self, r: _Reservation, admission: Admission,
                 grants: list[tuple[Key, Grant]]) -> None:
        """On the caller's loop: install the grants taken, hand the admission over, or
        release it if nobody waits any more."""
        if grants:
            with self._lock:
                for key, g in grants:
                    old = self._grants.get(key)
                    if old is not None:
                        self._give_back(key, old)
                    self._grants[key] = g
                self._wake()  # what the replaced grants held goes back
            self._expire_soon()
        if not r.waiter.done():
            r.waiter.set_result(admission)
        elif admission.blocked is None:
            self.settle(r.claims, Amounts())

    def _apply(self, batch: _Batch) -> list[tuple[Admission, list[tuple[Key, Grant]]]]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            now = max((r.now for r in batch.reservations), default=0.0)
            if batch.reservations and now >= self._next_sweep:
                conn.execute("DELETE FROM budget_counters WHERE window_end <= ?", (now,))
            tallies: dict[Key, Tally] = {}
            for key, change in batch.changes.items():
                found = self._existing(tallies, key)
                if found is not None:
                    change.apply(found)
            for claims, actual in batch.settlements:
                for c in claims:
                    found = self._existing(tallies, _key(c))
                    if found is not None:
                        found.settle(c.amount, actual)
            granting_now: set[Key] = set()  # at most one new grant a counter a transaction
            admissions = [self._admit(r, tallies, granting_now) for r in batch.reservations]
            conn.executemany(_WRITE, [(*k, t.window_end, t.su, t.sr, t.st, t.ru, t.rr, t.rt)
                                      for k, t in tallies.items()])
            conn.execute("COMMIT")
            self.transactions += 1
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if batch.reservations and now >= self._next_sweep:
            self._next_sweep = now + SWEEP_SECONDS
        return admissions

    def _admit(self, r: _Reservation, tallies: dict[Key, Tally], granting_now: set[Key],
               ) -> tuple[Admission, list[tuple[Key, Grant]]]:
        """Admit ``r`` against the counters and, far from the limits, take grants for its
        claims (reserved in the same counters, installed once committed) unless this
        process holds grants that still cover them."""
        counters = [self._tally(tallies, _key(c), c.window_end) for c in r.claims]
        admission = admit(r.claims, counters)
        if admission.blocked is not None:
            return admission, []
        now = time.monotonic()
        keys = [_key(c) for c in r.claims]
        with self._lock:
            if all(k in granting_now or (k in self._grants and self._grants[k].covers(
                    c.amount, now)) for k, c in zip(keys, r.claims, strict=True)):
                return admission, []
        taken = []
        for key, c, t in zip(keys, r.claims, counters, strict=True):
            g = granting.grant_for(c, Amounts(t.su + t.ru, t.sr + t.rr, t.st + t.rt), now)
            if g is None:
                return admission, []  # a grant only covers a request if it covers each claim
            taken.append((key, g))
        for (key, g), t in zip(taken, counters, strict=True):
            t.reserve(g.held())
            granting_now.add(key)
        return admission, taken

    def _tally(self, tallies: dict[Key, Tally], key: Key, window_end: float) -> Tally:
        """The counter of ``key`` in this transaction: read once, then kept in ``tallies``."""
        found = self._existing(tallies, key)
        if found is None:
            found = tallies[key] = Tally(window_end)
        return found

    def _existing(self, tallies: dict[Key, Tally], key: Key) -> Tally | None:
        """:meth:`_tally` of a counter that exists (one is not created to be settled: its
        window ended)."""
        found = tallies.get(key)
        if found is None:
            row = self._conn.execute(_SELECT, key).fetchone()
            if row is None:
                return None
            found = tallies[key] = _row_counter(row)
        return found

    # ---- reading and closing

    async def snapshot(self, now: float) -> list[CounterRow]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._snapshot, now)

    def _snapshot(self, now: float) -> list[CounterRow]:
        """The counters, less what this process's grants hold unused (another process's
        grants show as reserved)."""
        with self._lock:
            held = {key: g.held() for key, g in self._grants.items()}
        rows = self._conn.execute(
            f"SELECT budget, subject, window_start, window_end, {_COLUMNS} "
            "FROM budget_counters WHERE window_end > ? ORDER BY budget, subject", (now,))
        out = []
        for b, s, start, end, su, sr, st, ru, rr, rt in rows:
            h = held.get((b, s, start), Amounts())
            out.append(CounterRow(b, s, start, end, Amounts(su, int(sr), int(st)),
                                  Amounts(max(ru - h.usd, 0.0), max(int(rr) - h.requests, 0),
                                          max(int(rt) - h.tokens, 0))))
        return out

    async def close(self) -> None:
        """Give the grants back and write what is pending (one more try), then close."""
        with self._lock:
            self._closed = True
            self._arrived.notify()
        if self._expiry is not None:
            self._expiry.cancel()
        await asyncio.get_running_loop().run_in_executor(self._thread, self._last)
        self._thread.shutdown(wait=True)

    def _last(self) -> None:
        with self._lock:
            batch = self._take_batch(everything=True)
        try:
            if batch:
                self._apply(batch)
        except sqlite3.Error as exc:
            log.error("budget counters: what %d requests spent was not written: %s",
                      len(batch.settlements) + len(batch.changes), exc)
        self._conn.close()


def _fail(waiter: asyncio.Future[Admission], exc: BaseException) -> None:
    if not waiter.done():
        waiter.set_exception(exc)
