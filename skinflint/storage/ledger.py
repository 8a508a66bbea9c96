"""Ledger backends: SQLite (WAL, batched by a writer thread) and in-memory.

``record`` only appends to a deque, so the event loop never waits for disk. A writer thread
(:class:`~skinflint.storage.ledger_writer.LedgerWriter`) drains the deque every
``flush_interval`` seconds in one transaction. A batch the file does not take (another process
holds it locked past ``busy_timeout``, the disk is full) is held and retried until written,
spilling to the ``spill`` file beyond ``max_held`` records; ``close`` drains what is left, and
saves to the spill file what the database still refuses, so a graceful shutdown (SIGTERM) loses
nothing.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from skinflint.models import LedgerRecord
from skinflint.storage import rollup
from skinflint.storage.ledger_writer import Insert, LedgerWriter
from skinflint.storage.spend import Spend, SpendQueries
from skinflint.storage.spill import LedgerSpill

__all__ = ["READ_ROWS", "MemoryLedger", "SQLiteLedger", "open_sqlite", "sqlite_transaction"]

#: Rows a query reads from the database at a time (an export of millions stays small).
READ_ROWS = 5000


_COLUMNS = [f.name for f in fields(LedgerRecord)]
_SQL_TYPES = {"str": "TEXT", "float": "REAL", "int": "INTEGER", "float | None": "REAL"}
_AS_ROW = operator.attrgetter(*_COLUMNS)  # 20x faster than dataclasses.astuple
_TYPED = [f"{f.name} {_SQL_TYPES.get(str(f.type), 'TEXT')}" for f in fields(LedgerRecord)]
_DEFAULTS = {"TEXT": " DEFAULT ''", "INTEGER": " DEFAULT 0"}
_SCHEMA = "CREATE TABLE IF NOT EXISTS ledger ({})".format(", ".join(_TYPED))
_INSERT = "INSERT INTO ledger ({}) VALUES ({})".format(
    ", ".join(_COLUMNS), ", ".join("?" for _ in _COLUMNS)
)
_ROLL_HOURS = rollup.insert_sql(rollup.table_for("ledger", "hour"))
_ROLL_DAYS = rollup.insert_sql(rollup.table_for("ledger", "day"))
_SPEND = SpendQueries("ledger", "sqlite")
_RECENT = "SELECT {} FROM ledger ORDER BY ts DESC, rowid DESC LIMIT ?".format(
    ", ".join(f'"{c}"' for c in rollup.RECENT_COLUMNS))

log = logging.getLogger("skinflint.storage")


def open_sqlite(
    path: str, *, check_same_thread: bool = False, busy_timeout: float = 5.0,
) -> sqlite3.Connection:
    """A connection in WAL mode, as every embedded store uses, in autocommit mode (a write of
    several statements opens its own transaction). It waits up to ``busy_timeout`` seconds for
    a lock another connection holds."""
    conn = sqlite3.connect(path, check_same_thread=check_same_thread, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout={round(busy_timeout * 1000)}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


@contextlib.contextmanager
def sqlite_transaction(conn: sqlite3.Connection, *, write: bool = True) -> Iterator[None]:
    """One transaction, all or nothing, on a connection in autocommit mode (as
    :func:`open_sqlite` opens them): a writer takes the write lock at once, waiting
    ``busy_timeout`` for another's; a reader never waits."""
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


class MemoryLedger:
    """Keeps records in a list; for tests and library use."""

    def __init__(self) -> None:
        self.records: list[LedgerRecord] = []

    def record(self, record: LedgerRecord) -> None:
        self.records.append(record)

    def flush(self) -> None:
        return None

    def query(self, since: float = 0.0) -> Iterable[LedgerRecord]:
        return [r for r in self.records if r.ts >= since]

    def close(self) -> None:
        return None


def _create_table(conn: sqlite3.Connection) -> None:
    """The ledger table; fields added to :class:`LedgerRecord` since a file was made become new
    columns of its table (empty in the rows written before)."""
    with sqlite_transaction(conn):  # two processes starting at once add a column once
        conn.execute(_SCHEMA)
        have = {row[1] for row in conn.execute("PRAGMA table_info(ledger)")}
        for name, typed in zip(_COLUMNS, _TYPED, strict=True):
            if name not in have:  # earlier rows read as no value: "" for text, 0 for counts
                default = _DEFAULTS.get(typed.rsplit(" ", 1)[1], "")
                conn.execute(f"ALTER TABLE ledger ADD COLUMN {typed}{default}")
        conn.execute("CREATE INDEX IF NOT EXISTS ledger_ts ON ledger (ts)")
        _create_rollups(conn)


def _create_rollups(conn: sqlite3.Connection) -> None:
    """The rollups tables; in a ledger made before them, built once from the rows there."""
    have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    statements = rollup.create_statements("ledger", "sqlite", have)
    if len(statements) > 1:  # more than the index
        rows = conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0]
        if rows:
            log.warning("ledger: building the spend rollups of %d earlier rows, once", rows)
    for statement in statements:
        conn.execute(statement)


class SQLiteLedger:
    """The ledger in a SQLite file (see the module docstring). The constructor creates the
    table and writes what an earlier process left in ``spill`` (blocking)."""

    def __init__(
        self, path: str, *, flush_interval: float = 0.2, busy_timeout: float = 5.0,
        spill: str | Path | None = None, max_held: int = 100_000,
        retry: tuple[float, float] = (0.5, 5.0),
    ) -> None:
        self.path = path
        self._conn = open_sqlite(path, busy_timeout=busy_timeout)
        _create_table(self._conn)
        self._writer = LedgerWriter(
            self._transaction, interval=flush_interval, max_held=max_held, retry=retry,
            spill=LedgerSpill(spill) if spill is not None else None,
            close_timeout=2 * busy_timeout + 5)
        self._writer.start()
        self._reader: sqlite3.Connection | None = None  # the spend API's, opened on first use
        self._reading = threading.Lock()

    def record(self, record: LedgerRecord) -> None:
        self._writer.append(record)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Insert]:
        """One write transaction, all or nothing."""
        with sqlite_transaction(self._conn):
            yield self._insert

    def _insert(self, batch: list[LedgerRecord]) -> None:
        """Every write of rows, spilled ones included: the rows and their rollups."""
        self._conn.executemany(_INSERT, [_AS_ROW(r) for r in batch])
        hours = rollup.aggregate(batch)
        self._conn.executemany(_ROLL_HOURS, hours)
        self._conn.executemany(_ROLL_DAYS, rollup.by_day(hours))

    @property
    def held(self) -> int:
        """Records recorded and not yet written, in memory."""
        return self._writer.held

    def flush(self) -> None:
        self._writer.flush()

    def query(self, since: float = 0.0) -> Iterator[LedgerRecord]:
        """Every record with ``ts >= since``, oldest first, read :data:`READ_ROWS` at a time
        as it is iterated (blocking), on a connection of its own."""
        self.flush()
        conn = open_sqlite(self.path)
        try:
            cursor = conn.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM ledger WHERE ts >= ? ORDER BY ts", (since,))
            while rows := cursor.fetchmany(READ_ROWS):
                yield from (LedgerRecord(*row) for row in rows)
        finally:
            conn.close()

    def _read(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        """Rows of a query on the reading connection (blocking), as written so far."""
        with self._reading:
            if self._reader is None:
                self._reader = open_sqlite(self.path)
            return self._reader.execute(sql, params).fetchall()

    def spend(self, by: str, since: float, until: float, bucket: str) -> Spend:
        """Spend by ``by`` from ``since`` to ``until`` (unix seconds) per ``bucket``, from the
        rollups (see :class:`~skinflint.storage.spend.SpendQueries`). Blocking."""
        return _SPEND.run(self._read, by, since, until, bucket)

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` rows, newest first, with the columns of ``GET /api/requests``.
        Blocking."""
        rows = self._read(_RECENT, (limit,))
        return [dict(zip(rollup.RECENT_COLUMNS, row, strict=True)) for row in rows]

    def close(self) -> None:
        self._writer.close()
        self._conn.close()
        with self._reading:
            if self._reader is not None:
                self._reader.close()
