"""Budget counters in PostgreSQL, shared by every gateway replica (when no Redis is set).

One row per (budget, subject, window start). Admission is one transaction: it creates the
rows the request meets, locks them in key order (``SELECT ... FOR UPDATE``: concurrent
transactions queue, and never deadlock), decides with :func:`skinflint.storage.counters.admit`
and adds the reservation. Settlements run in the background."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import psycopg

from skinflint.interfaces import Admission, Amounts, Claim, CounterRow
from skinflint.storage.counters import SWEEP_SECONDS, Tally, admit, persist, unless_abandoned
from skinflint.storage.pgpool import Pool, open_pool, setup

__all__ = ["PostgresBudgetCounters"]

log = logging.getLogger("skinflint.budgets")

_SCHEMA = ["""
CREATE TABLE IF NOT EXISTS skinflint_budget_counters (
    budget TEXT NOT NULL, subject TEXT NOT NULL, window_start DOUBLE PRECISION NOT NULL,
    window_end DOUBLE PRECISION NOT NULL,
    su DOUBLE PRECISION NOT NULL DEFAULT 0, sr BIGINT NOT NULL DEFAULT 0,
    st BIGINT NOT NULL DEFAULT 0,
    ru DOUBLE PRECISION NOT NULL DEFAULT 0, rr BIGINT NOT NULL DEFAULT 0,
    rt BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (budget, subject, window_start))
""", "CREATE INDEX IF NOT EXISTS skinflint_budget_counters_end"
     " ON skinflint_budget_counters (window_end)"]
_CREATE = ("INSERT INTO skinflint_budget_counters (budget, subject, window_start, window_end)"
           " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING")
_LOCK = ("SELECT window_end, su, sr, st, ru, rr, rt FROM skinflint_budget_counters"
         " WHERE budget = %s AND subject = %s AND window_start = %s FOR UPDATE")
_RESERVE = ("UPDATE skinflint_budget_counters SET ru = ru + %s, rr = rr + %s, rt = rt + %s"
            " WHERE budget = %s AND subject = %s AND window_start = %s")
_SETTLE = ("UPDATE skinflint_budget_counters SET ru = greatest(ru - %s, 0),"
           " rr = greatest(rr - %s, 0), rt = greatest(rt - %s, 0),"
           " su = su + %s, sr = sr + %s, st = st + %s"
           " WHERE budget = %s AND subject = %s AND window_start = %s")
_SNAPSHOT = ("SELECT budget, subject, window_start, window_end, su, sr, st, ru, rr, rt"
             " FROM skinflint_budget_counters WHERE window_end > %s ORDER BY budget, subject")


def _key(claim: Claim) -> tuple[str, str, float]:
    return claim.budget, claim.subject, claim.window_start


class PostgresBudgetCounters:
    """Counters in PostgreSQL; see the module docstring. Owns its pool."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._pending: set[asyncio.Task[Any]] = set()
        self._next_sweep = 0.0

    @classmethod
    async def create(cls, url: str, *, pool_size: int = 4, timeout: float = 5.0,
                     op_timeout: float = 5.0) -> PostgresBudgetCounters:
        """Create the table if needed and connect. Raises ConfigError when that fails."""
        await setup(url, _SCHEMA)
        return cls(await open_pool(url, size=pool_size, timeout=timeout, op_timeout=op_timeout))

    async def reserve(self, claims: Sequence[Claim], now: float) -> Admission:
        return await unless_abandoned(self._reserve(claims, now),
                                      lambda: self.settle(claims, Amounts()), (psycopg.Error,))

    async def _reserve(self, claims: Sequence[Claim], now: float) -> Admission:
        ordered = sorted(range(len(claims)), key=lambda i: _key(claims[i]))  # lock order
        async with self._pool.connection() as conn, conn.transaction():
            if now >= self._next_sweep:
                self._next_sweep = now + SWEEP_SECONDS
                await conn.execute(
                    "DELETE FROM skinflint_budget_counters WHERE window_end <= %s", (now,))
            counters: list[Tally | None] = [None] * len(claims)
            for i in ordered:
                c = claims[i]
                await conn.execute(_CREATE, (*_key(c), c.window_end))
                row = await (await conn.execute(_LOCK, _key(c))).fetchone()
                assert row is not None  # created above, and locked now
                end, su, sr, st, ru, rr, rt = row
                counters[i] = Tally(end, su, int(sr), int(st), ru, int(rr), int(rt))
            found = [c for c in counters if c is not None]
            admission = admit(claims, found)
            if admission.blocked is None:
                for c in claims:
                    a = c.amount
                    await conn.execute(_RESERVE, (a.usd, a.requests, a.tokens, *_key(c)))
        return admission

    def settle(self, claims: Sequence[Claim], actual: Amounts) -> None:
        rows = [(c.amount.usd, c.amount.requests, c.amount.tokens,
                 actual.usd, actual.requests, actual.tokens, *_key(c)) for c in claims]
        task = asyncio.ensure_future(self._apply(rows))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _apply(self, rows: list[tuple[Any, ...]]) -> None:
        async def write() -> None:
            async with self._pool.connection() as conn, conn.transaction():
                async with conn.cursor() as cur:
                    await cur.executemany(_SETTLE, rows)

        await persist(write, (psycopg.Error,))

    async def snapshot(self, now: float) -> list[CounterRow]:
        if self._pending:  # this process's settlements first
            await asyncio.gather(*self._pending, return_exceptions=True)
        async with self._pool.connection() as conn:
            rows = await (await conn.execute(_SNAPSHOT, (now,))).fetchall()
        return [CounterRow(b, s, start, end, Amounts(su, int(sr), int(st)),
                           Amounts(ru, int(rr), int(rt)))
                for b, s, start, end, su, sr, st, ru, rr, rt in rows]

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self._pool.close()
