"""The job store in the SQLite file (WAL), shared by every process that opens it (``serve
--workers N``): see :mod:`skinflint.storage.jobs`."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from skinflint.storage.job_thread import SqlJobStore
from skinflint.storage.jobs import added_columns, schema
from skinflint.storage.ledger import open_sqlite, sqlite_transaction

__all__ = ["SQLiteJobStore"]

_INCREMENTAL = 2  # PRAGMA auto_vacuum's value for INCREMENTAL


class _SQLite:
    def __init__(self, path: str, busy_timeout: float) -> None:
        self._conn = open_sqlite(path, busy_timeout=busy_timeout)
        with self.transaction():  # two processes starting at once add a column once
            for statement in schema("sqlite"):
                self._conn.execute(statement)
            have = {row[1] for row in self._conn.execute("PRAGMA table_info(jobs)")}
            for statement in added_columns("sqlite", have):
                self._conn.execute(statement)

    def transaction(self, *, write: bool = True) -> contextlib.AbstractContextManager[None]:
        return sqlite_transaction(self._conn, write=write)

    def run(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, params).fetchall()

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._conn.executemany(sql, rows)

    def reclaim(self, pages: int) -> bool:
        """With ``auto_vacuum=INCREMENTAL`` (set when the file was created), frees up to
        ``pages`` pages; otherwise nothing (a full VACUUM would lock the file for long)."""
        if self._conn.execute("PRAGMA auto_vacuum").fetchone()[0] != _INCREMENTAL:
            return False
        free = int(self._conn.execute("PRAGMA freelist_count").fetchone()[0])
        for _ in range(min(free, pages)):
            # one page per statement: Python's driver steps this pragma only once
            self._conn.execute("PRAGMA incremental_vacuum(1)")
        return free > pages

    def close(self) -> None:
        self._conn.close()


class SQLiteJobStore(SqlJobStore):
    """Jobs in the SQLite file at ``path`` (created if needed); blocks while it connects."""

    def __init__(self, path: str, *, busy_timeout: float = 10.0) -> None:
        super().__init__(lambda: _SQLite(path, busy_timeout), name="jobs")
