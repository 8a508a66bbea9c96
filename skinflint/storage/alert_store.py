"""What cost alerts read and write: spend per window and scope, from the ledger (the truth
every gateway process and replica shares), and the alerts raised, in a table of their own.

The alert table holds one row per alert, keyed by ``(rule, per, name, started)``, and at most
one open row (``ended`` NULL) per ``(rule, per, name)``: both are unique indexes. So when
several processes judge the same window, exactly one records each change: the one whose
``INSERT ... ON CONFLICT DO NOTHING`` inserts the alert, or whose ``UPDATE ... WHERE ended IS
NULL`` closes it. That process, and only it, notifies.

:class:`SQLiteAlertStore` keeps the table in the SQLite file of the ledger;
:class:`~skinflint.storage.pg_alert_store.PostgresAlertStore` in PostgreSQL beside its ledger.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from skinflint.alerts import AlertEvent
from skinflint.storage import rollup
from skinflint.storage.ledger import open_sqlite, sqlite_transaction

__all__ = ["SCOPE_COLUMNS", "SCORES_KEPT", "TRIM_EVERY", "AlertStore", "SQLiteAlertStore",
           "Score", "Spend", "score_cleanup", "score_statements", "spend_query"]

T = TypeVar("T")

#: The ledger column each ``per`` reads (quoted: ``user`` is a reserved word in PostgreSQL).
SCOPE_COLUMNS = {"global": "''", "tenant": '"tenant"', "feature": '"feature"',
                 "model": '"model"', "user": '"user"'}

#: ``(window index, scope name, USD)``
Spend = tuple[int, str, float]

#: A shadow-guard sample: ``(id, name, score, floor, min_samples)``; a score of None marks an
#: operator's re-enable (the test starts afresh there).
Score = tuple[int, str, float | None, float, int]

_COLUMNS = "rule, per, name, started, ended, spend_usd, baseline_usd"


def spend_query(ledger: str, mark: str, per: str, seconds: int, since: float,
                until: float) -> tuple[str, tuple[Any, ...]]:
    """The statement that sums spend per window of ``seconds`` and scope of ``per`` in the
    ledger table ``ledger`` (``mark``: the driver's placeholder, ``?`` for SQLite, ``%s`` for
    PostgreSQL). Hour and day windows read
    the ledger's rollups, which hold those sums already (a day of rows at 1M rows a month
    reads 24 rows a scope, not 33,000); other windows group the rows themselves."""
    bucket = next((b for b, length in rollup.BUCKETS.items() if length == seconds), None)
    if bucket is not None and since % seconds == 0:
        dim = "total" if per == "global" else per
        return (f"SELECT start / {seconds}, name, cost_usd FROM {rollup.table_for(ledger, bucket)}"
                f" WHERE dim = {mark} AND start >= {mark} AND start < {mark}",
                (dim, int(since), until))
    window = f"CAST(ts / {mark} AS INTEGER)" if mark == "?" else f"FLOOR(ts / {mark})::bigint"
    return (f"SELECT {window}, {SCOPE_COLUMNS[per]}, SUM(COALESCE(cost_usd, 0))"
            f" FROM {ledger} WHERE ts >= {mark} AND ts < {mark} GROUP BY 1, 2",
            (seconds, since, until))


class AlertStore(Protocol):
    """Spend from the ledger, and the alerts raised (see the module docstring)."""

    async def spend(self, per: str, seconds: int, since: float, until: float) -> list[Spend]:
        """Spend per window of ``seconds`` and scope of ``per`` between two window bounds."""
        ...

    async def first_ts(self) -> float | None:
        """When the ledger's first row was written; None when it has none."""
        ...

    async def open_at(self, rule: str, per: str, at: float) -> list[AlertEvent]:
        """The rule's alerts firing at ``at``."""
        ...

    async def fire(self, event: AlertEvent) -> bool:
        """Record an alert fired; False when it is recorded already, or another alert of the
        same scope is open."""
        ...

    async def resolve(self, event: AlertEvent) -> AlertEvent | None:
        """Close the open alert of ``event``'s scope at ``event.end``; the alert as recorded,
        or None when none was open (another process closed it)."""
        ...

    async def recent(self, limit: int) -> list[AlertEvent]:
        """The newest alerts, newest first."""
        ...

    async def add_score(self, name: str, score: float | None, floor: float,
                        min_samples: int) -> None:
        """Log one shadow-guard sample for ``name`` (``<feature>/<strategy>``; a score of
        None: an operator's re-enable, before which that name's samples are deleted); ids
        follow the order the samples were logged in, across every process sharing the store.
        See :data:`SCORES_KEPT`."""
        ...

    async def scores_after(self, after: int, limit: int) -> list[Score]:
        """The samples logged after id ``after``, oldest first, at most ``limit``."""
        ...

    async def active(self) -> dict[str, int]:
        """Alerts firing, per rule."""
        ...

    async def close(self) -> None: ...


def event_from_row(row: Sequence[Any]) -> AlertEvent:
    rule, per, name, started, ended, spend, baseline = row
    return AlertEvent(str(rule), str(per), str(name), float(started),
                      None if ended is None else float(ended), float(spend), float(baseline))


def score_statements(table: str, mark: str) -> tuple[str, str]:
    """The statements that log a shadow-guard sample in ``table`` (its id returned) and read
    the samples after an id, oldest first (``mark``: the driver's placeholder)."""
    return (f"INSERT INTO {table} (name, score, floor, min_samples, ts)"
            f" VALUES ({mark}, {mark}, {mark}, {mark}, {mark}) RETURNING id",
            f"SELECT id, name, score, floor, min_samples FROM {table} WHERE id > {mark}"
            f" ORDER BY id LIMIT {mark}")


def score_cleanup(table: str, mark: str, name: str, logged: int,
                  score: float | None) -> tuple[str, tuple[Any, ...]] | None:
    """What to delete once sample ``logged`` of ``name`` is in ``table``: for an operator's
    re-enable, that name's samples before it; every :data:`TRIM_EVERY` samples, its samples
    past the newest :data:`SCORES_KEPT`; else nothing (None)."""
    if score is None:
        return f"DELETE FROM {table} WHERE name = {mark} AND id < {mark}", (name, logged)
    if logged % TRIM_EVERY == 0:
        return (f"DELETE FROM {table} WHERE name = {mark} AND id <= (SELECT id FROM {table}"
                f" WHERE name = {mark} ORDER BY id DESC LIMIT 1 OFFSET {mark})",
                (name, name, SCORES_KEPT))
    return None


def score_from_row(row: Sequence[Any]) -> Score:
    id_, name, score, floor, min_samples = row
    return (int(id_), str(name), None if score is None else float(score), float(floor),
            int(min_samples))


_SQLITE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS alert_events (rule TEXT NOT NULL, per TEXT NOT NULL,"
    " name TEXT NOT NULL, started REAL NOT NULL, ended REAL, spend_usd REAL NOT NULL,"
    " baseline_usd REAL NOT NULL, PRIMARY KEY (rule, per, name, started))",
    "CREATE UNIQUE INDEX IF NOT EXISTS alert_events_open ON alert_events (rule, per, name)"
    " WHERE ended IS NULL",
    "CREATE INDEX IF NOT EXISTS alert_events_started ON alert_events (started)",
    "CREATE TABLE IF NOT EXISTS shadow_scores (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " name TEXT NOT NULL, score REAL, floor REAL NOT NULL, min_samples INTEGER NOT NULL,"
    " ts REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS shadow_scores_name ON shadow_scores (name, id)",
)

#: The shadow-guard samples a store keeps per name, newest first: its samples since the last
#: operator's re-enable (older ones are deleted then), at most this many (older ones are
#: deleted every :data:`TRIM_EVERY` samples logged). A restart replays what is kept.
SCORES_KEPT = 100_000
TRIM_EVERY = 1000
_SCORES = score_statements("shadow_scores", "?")


class SQLiteAlertStore:
    """The alert store in the ledger's SQLite file; every call runs in a worker thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn = open_sqlite(path)
        self._lock = threading.Lock()  # one statement at a time on the connection
        for statement in _SQLITE_SCHEMA:
            self._conn.execute(statement)

    @classmethod
    async def create(cls, path: str) -> SQLiteAlertStore:
        return await asyncio.to_thread(cls, path)

    async def _run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                return job(self._conn)

        return await asyncio.to_thread(locked)

    async def spend(self, per: str, seconds: int, since: float, until: float) -> list[Spend]:
        sql, params = spend_query("ledger", "?", per, seconds, since, until)
        rows = await self._run(lambda c: c.execute(sql, params).fetchall())
        return [(int(w), str(name or ""), float(usd)) for w, name, usd in rows]

    async def first_ts(self) -> float | None:
        row = await self._run(lambda c: c.execute("SELECT MIN(ts) FROM ledger").fetchone())
        return None if row[0] is None else float(row[0])

    async def open_at(self, rule: str, per: str, at: float) -> list[AlertEvent]:
        sql = (f"SELECT {_COLUMNS} FROM alert_events WHERE rule = ? AND per = ?"
               " AND started <= ? AND (ended IS NULL OR ended > ?)")
        rows = await self._run(lambda c: c.execute(sql, (rule, per, at, at)).fetchall())
        return [event_from_row(r) for r in rows]

    async def fire(self, event: AlertEvent) -> bool:
        sql = (f"INSERT INTO alert_events ({_COLUMNS}) VALUES (?, ?, ?, ?, NULL, ?, ?)"
               " ON CONFLICT DO NOTHING")
        values = (event.rule, event.per, event.name, event.start, event.spend_usd,
                  event.baseline_usd)
        return await self._run(lambda c: c.execute(sql, values).rowcount == 1)

    async def resolve(self, event: AlertEvent) -> AlertEvent | None:
        sql = (f"UPDATE alert_events SET ended = ? WHERE rule = ? AND per = ? AND name = ?"
               f" AND ended IS NULL AND started < ? RETURNING {_COLUMNS}")
        values = (event.end, event.rule, event.per, event.name, event.end)
        rows = await self._run(lambda c: c.execute(sql, values).fetchall())  # ends the statement
        return event_from_row(rows[0]) if rows else None

    async def recent(self, limit: int) -> list[AlertEvent]:
        sql = (f"SELECT {_COLUMNS} FROM alert_events"
               " ORDER BY started DESC, rule, name LIMIT ?")
        return [event_from_row(r) for r in
                await self._run(lambda c: c.execute(sql, (limit,)).fetchall())]

    async def add_score(self, name: str, score: float | None, floor: float,
                        min_samples: int) -> None:
        def add(c: sqlite3.Connection) -> None:
            with sqlite_transaction(c):  # one writer at a time: ids follow commit order
                logged = int(c.execute(_SCORES[0], (name, score, floor, min_samples,
                                                    time.time())).fetchone()[0])
                cleanup = score_cleanup("shadow_scores", "?", name, logged, score)
                if cleanup is not None:
                    c.execute(*cleanup)

        await self._run(add)

    async def scores_after(self, after: int, limit: int) -> list[Score]:
        rows = await self._run(lambda c: c.execute(_SCORES[1], (after, limit)).fetchall())
        return [score_from_row(r) for r in rows]

    async def active(self) -> dict[str, int]:
        sql = "SELECT rule, COUNT(*) FROM alert_events WHERE ended IS NULL GROUP BY rule"
        return {str(rule): int(n) for rule, n in
                await self._run(lambda c: c.execute(sql).fetchall())}

    async def close(self) -> None:
        await self._run(lambda c: c.close())
