"""The job store in PostgreSQL, shared by every replica: see :mod:`skinflint.storage.jobs`.
The statements are those of SQLite; psycopg's synchronous connection runs them in the store's
own thread, reconnecting after a failure."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg

from skinflint.storage.job_thread import SqlJobStore
from skinflint.storage.jobs import added_columns, schema
from skinflint.storage.pgpool import CONNECT_TIMEOUT, SCHEMA_LOCK, config_error

__all__ = ["PostgresJobStore"]


def _pg(sql: str) -> str:
    return sql.replace("?", "%s")


class _Postgres:
    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        with self.transaction():
            assert self._conn is not None
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            for statement in schema("postgres"):
                self._conn.execute(statement)
            have = {row[0] for row in self._conn.execute(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = 'jobs'")}
            for statement in added_columns("postgres", have):
                self._conn.execute(statement)

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._url, autocommit=True,
                                         connect_timeout=CONNECT_TIMEOUT)
        return self._conn

    @contextlib.contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[None]:
        try:
            conn = self._connection()
        except psycopg.Error as exc:
            raise config_error(self._url, exc) from exc
        try:
            with conn.transaction():
                yield
        except psycopg.OperationalError:  # the connection broke: a new one next time
            with contextlib.suppress(psycopg.Error):
                conn.close()
            raise

    def run(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cur = self._connection().execute(_pg(sql), params)
        return cur.fetchall() if cur.description else []

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            with self._connection().cursor() as cur:
                cur.executemany(_pg(sql), rows)

    def reclaim(self, pages: int) -> bool:
        return False  # autovacuum reuses the space of deleted rows

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class PostgresJobStore(SqlJobStore):
    """Jobs in PostgreSQL at ``url``; blocks while it connects. Raises ConfigError when the
    server cannot be reached."""

    def __init__(self, url: str) -> None:
        super().__init__(lambda: _Postgres(url), name="pg-jobs")
