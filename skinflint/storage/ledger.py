"""Ledger backends: SQLite (WAL, batched by a writer thread) and in-memory.

``record`` only appends to a deque, so the event loop never waits for disk. A writer thread
drains the deque every ``flush_interval`` seconds in one transaction; ``close`` drains what is
left, so a graceful shutdown (SIGTERM) loses nothing.
"""

from __future__ import annotations

import operator
import sqlite3
from collections.abc import Iterable
from dataclasses import fields

from skinflint.models import LedgerRecord
from skinflint.storage.writer import BatchWriter

__all__ = ["MemoryLedger", "SQLiteLedger", "open_sqlite"]


_COLUMNS = [f.name for f in fields(LedgerRecord)]
_SQL_TYPES = {"str": "TEXT", "float": "REAL", "int": "INTEGER", "float | None": "REAL"}
_AS_ROW = operator.attrgetter(*_COLUMNS)  # 20x faster than dataclasses.astuple
_TYPED = [f"{f.name} {_SQL_TYPES.get(str(f.type), 'TEXT')}" for f in fields(LedgerRecord)]
_SCHEMA = "CREATE TABLE IF NOT EXISTS ledger ({})".format(", ".join(_TYPED))
_INSERT = "INSERT INTO ledger ({}) VALUES ({})".format(
    ", ".join(_COLUMNS), ", ".join("?" for _ in _COLUMNS)
)


def open_sqlite(path: str, *, check_same_thread: bool = False) -> sqlite3.Connection:
    """A connection in WAL mode, as every embedded store uses."""
    conn = sqlite3.connect(path, check_same_thread=check_same_thread, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


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
    conn.execute("BEGIN IMMEDIATE")  # two processes starting at once add a column once
    try:
        conn.execute(_SCHEMA)
        have = {row[1] for row in conn.execute("PRAGMA table_info(ledger)")}
        for name, typed in zip(_COLUMNS, _TYPED, strict=True):
            if name not in have:  # earlier rows read as no value: "" for text
                default = " DEFAULT ''" if typed.endswith(" TEXT") else ""
                conn.execute(f"ALTER TABLE ledger ADD COLUMN {typed}{default}")
        conn.execute("CREATE INDEX IF NOT EXISTS ledger_ts ON ledger (ts)")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class SQLiteLedger:
    def __init__(self, path: str, *, flush_interval: float = 0.2) -> None:
        self.path = path
        self._conn = open_sqlite(path)
        _create_table(self._conn)
        self._writer = BatchWriter(self._write, interval=flush_interval, name="ledger")

    def record(self, record: LedgerRecord) -> None:
        self._writer.append(record)

    def _write(self, batch: list[LedgerRecord]) -> None:
        with self._conn:
            self._conn.executemany(_INSERT, [_AS_ROW(r) for r in batch])

    def flush(self) -> None:
        self._writer.flush()

    def query(self, since: float = 0.0) -> Iterable[LedgerRecord]:
        self.flush()
        conn = open_sqlite(self.path)
        try:
            rows = conn.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM ledger WHERE ts >= ? ORDER BY ts", (since,)
            ).fetchall()
        finally:
            conn.close()
        return [LedgerRecord(*row) for row in rows]

    def close(self) -> None:
        self._writer.close()
        self._conn.close()
