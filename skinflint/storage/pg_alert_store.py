"""The alert store in PostgreSQL, beside the ledger every replica writes (see
:mod:`skinflint.storage.alert_store`)."""

from __future__ import annotations

import time
from typing import Any

from skinflint.alerts import AlertEvent
from skinflint.storage.alert_store import (
    Score,
    Spend,
    event_from_row,
    score_cleanup,
    score_from_row,
    score_statements,
    spend_query,
)
from skinflint.storage.pgpool import Pool, open_pool, setup

__all__ = ["PostgresAlertStore"]

_COLUMNS = "rule, per, name, started, ended, spend_usd, baseline_usd"
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS skinflint_alert_events (rule TEXT NOT NULL, per TEXT NOT NULL,"
    " name TEXT NOT NULL, started DOUBLE PRECISION NOT NULL, ended DOUBLE PRECISION,"
    " spend_usd DOUBLE PRECISION NOT NULL, baseline_usd DOUBLE PRECISION NOT NULL,"
    " PRIMARY KEY (rule, per, name, started))",
    "CREATE UNIQUE INDEX IF NOT EXISTS skinflint_alert_events_open"
    " ON skinflint_alert_events (rule, per, name) WHERE ended IS NULL",
    "CREATE INDEX IF NOT EXISTS skinflint_alert_events_started"
    " ON skinflint_alert_events (started)",
    "CREATE TABLE IF NOT EXISTS skinflint_shadow_scores (id BIGSERIAL PRIMARY KEY,"
    " name TEXT NOT NULL, score DOUBLE PRECISION, floor DOUBLE PRECISION NOT NULL,"
    " min_samples INTEGER NOT NULL, ts DOUBLE PRECISION NOT NULL)",
    "CREATE INDEX IF NOT EXISTS skinflint_shadow_scores_name"
    " ON skinflint_shadow_scores (name, id)",
)
#: Taken by each insert into the shadow-score log: ids then follow commit order, so a reader
#: that has seen id n has seen every id below it.
_SCORES_LOCK = 0x5C0E5
_SCORES_TABLE = "skinflint_shadow_scores"
_SCORES = score_statements(_SCORES_TABLE, "%s")


class PostgresAlertStore:
    """An :class:`~skinflint.storage.alert_store.AlertStore` shared by every replica. Owns a
    small pool; a statement may run ``op_timeout`` seconds (a spend query reads a few windows
    of the ledger through its ``ts`` index)."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    @classmethod
    async def create(cls, url: str, *, op_timeout: float = 30.0) -> PostgresAlertStore:
        """Create the table if needed and connect. Raises ConfigError when that fails."""
        await setup(url, _SCHEMA)
        return cls(await open_pool(url, size=2, timeout=10.0, op_timeout=op_timeout))

    async def _rows(self, sql: str, params: Any) -> tuple[int, list[Any]]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql, params)
            return cur.rowcount, (await cur.fetchall() if cur.description else [])

    async def spend(self, per: str, seconds: int, since: float, until: float) -> list[Spend]:
        _, rows = await self._rows(
            *spend_query("skinflint_ledger", "%s", per, seconds, since, until))
        return [(int(w), str(name or ""), float(usd)) for w, name, usd in rows]

    async def first_ts(self) -> float | None:
        _, rows = await self._rows("SELECT MIN(ts) FROM skinflint_ledger", None)
        return None if rows[0][0] is None else float(rows[0][0])

    async def open_at(self, rule: str, per: str, at: float) -> list[AlertEvent]:
        _, rows = await self._rows(
            f"SELECT {_COLUMNS} FROM skinflint_alert_events WHERE rule = %s AND per = %s"
            " AND started <= %s AND (ended IS NULL OR ended > %s)", (rule, per, at, at))
        return [event_from_row(r) for r in rows]

    async def fire(self, event: AlertEvent) -> bool:
        count, _ = await self._rows(
            f"INSERT INTO skinflint_alert_events ({_COLUMNS})"
            " VALUES (%s, %s, %s, %s, NULL, %s, %s) ON CONFLICT DO NOTHING",
            (event.rule, event.per, event.name, event.start, event.spend_usd,
             event.baseline_usd))
        return count == 1

    async def resolve(self, event: AlertEvent) -> AlertEvent | None:
        _, rows = await self._rows(
            "UPDATE skinflint_alert_events SET ended = %s WHERE rule = %s AND per = %s"
            f" AND name = %s AND ended IS NULL AND started < %s RETURNING {_COLUMNS}",
            (event.end, event.rule, event.per, event.name, event.end))
        return event_from_row(rows[0]) if rows else None

    async def recent(self, limit: int) -> list[AlertEvent]:
        _, rows = await self._rows(
            f"SELECT {_COLUMNS} FROM skinflint_alert_events"
            " ORDER BY started DESC, rule, name LIMIT %s", (limit,))
        return [event_from_row(r) for r in rows]

    async def add_score(self, name: str, score: float | None, floor: float,
                        min_samples: int) -> None:
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCORES_LOCK,))
            cur = await conn.execute(_SCORES[0], (name, score, floor, min_samples, time.time()))
            row = await cur.fetchone()
            assert row is not None
            cleanup = score_cleanup(_SCORES_TABLE, "%s", name, int(row[0]), score)
            if cleanup is not None:
                await conn.execute(*cleanup)

    async def scores_after(self, after: int, limit: int) -> list[Score]:
        _, rows = await self._rows(_SCORES[1], (after, limit))
        return [score_from_row(r) for r in rows]

    async def active(self) -> dict[str, int]:
        _, rows = await self._rows(
            "SELECT rule, COUNT(*) FROM skinflint_alert_events WHERE ended IS NULL"
            " GROUP BY rule", None)
        return {str(rule): int(n) for rule, n in rows}

    async def close(self) -> None:
        await self._pool.close()
