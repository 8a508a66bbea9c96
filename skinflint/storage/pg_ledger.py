"""The ledger in PostgreSQL, shared by every replica (see :mod:`skinflint.storage.postgres`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import psycopg

from skinflint.models import ATTEMPT_STRATEGIES, LedgerRecord
from skinflint.storage import rollup
from skinflint.storage.ledger import READ_ROWS
from skinflint.storage.ledger_writer import Insert, LedgerWriter
from skinflint.storage.pgpool import CONNECT_TIMEOUT, SCHEMA_LOCK, config_error
from skinflint.storage.spend import Spend, SpendQueries
from skinflint.storage.spill import LedgerSpill

__all__ = ["PostgresLedger"]

log = logging.getLogger("skinflint.storage")


_PG_TYPES = {"str": "TEXT", "float": "DOUBLE PRECISION", "int": "BIGINT",
             "float | None": "DOUBLE PRECISION"}
_COLUMNS = [f.name for f in fields(LedgerRecord)]
_QUOTED = ", ".join(f'"{name}"' for name in _COLUMNS)  # "user" is a reserved word
_AS_ROW = operator.attrgetter(*_COLUMNS)
_BATCH = "skinflint_ledger_batch"  # the rows of one write, in a temporary table
_NEW_BATCH = (f"CREATE TEMP TABLE IF NOT EXISTS {_BATCH} (LIKE skinflint_ledger)"
              " ON COMMIT DELETE ROWS")
_COPY = f"COPY {_BATCH} ({_QUOTED}) FROM STDIN"
_FROM_BATCH = f"INSERT INTO skinflint_ledger ({_QUOTED}) SELECT {_QUOTED} FROM {_BATCH}"
_ROLL_BATCH = [rollup.upsert_sql(rollup.table_for("skinflint_ledger", bucket), _BATCH,
                                 "postgres", size) for bucket, size in rollup.BUCKETS.items()]
_SPEND = SpendQueries("skinflint_ledger", "postgres")
_RECENT = "SELECT {} FROM skinflint_ledger ORDER BY ts DESC LIMIT %s".format(
    ", ".join(f'"{c}"' for c in rollup.RECENT_COLUMNS))


@contextlib.contextmanager
def _cut_off_after(conn: psycopg.Connection[Any], seconds: float) -> Iterator[None]:
    """Shut the connection's socket down if the block is still running after ``seconds``: a
    blocking call to a server that stopped answering would otherwise wait forever. The call
    then fails with an OperationalError and the connection is replaced on next use."""
    fd = conn.pgconn.socket
    lock, ended = threading.Lock(), [False]

    def cut() -> None:
        with lock:  # never once the block has ended: the connection may be healthy again
            if ended[0] or conn.closed or conn.pgconn.socket != fd:
                return
            log.warning("postgres ledger: no answer in %g s, dropping the connection", seconds)
            with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(seconds, cut)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            ended[0] = True
        timer.cancel()


def _ledger_schema() -> list[str]:
    """The ledger table, one column per :class:`LedgerRecord` field. Fields added later become
    new columns of an existing table. Raises TypeError for a field type with no mapping."""
    columns = []
    for f in fields(LedgerRecord):
        sql_type = _PG_TYPES.get(str(f.type))
        if sql_type is None:
            raise TypeError(f"LedgerRecord.{f.name}: no PostgreSQL type for {f.type}")
        default = " DEFAULT 0" if sql_type == "BIGINT" else ""  # earlier rows count none
        columns.append(f'"{f.name}" {sql_type}{default}')
    return [
        f"CREATE TABLE IF NOT EXISTS skinflint_ledger ({', '.join(columns)})",
        *(f"ALTER TABLE skinflint_ledger ADD COLUMN IF NOT EXISTS {c}" for c in columns),
        "CREATE INDEX IF NOT EXISTS skinflint_ledger_ts ON skinflint_ledger (ts)",
    ]


class PostgresLedger:
    """A :class:`~skinflint.interfaces.Ledger` in PostgreSQL, shared by every replica.

    ``record`` only appends to a deque. A writer thread
    (:class:`~skinflint.storage.ledger_writer.LedgerWriter`) COPYs what is pending every
    ``flush_interval`` seconds over its own connection, reconnecting after a failure; a batch
    that could not be written is held and retried until written, spilling to the ``spill`` file
    (:class:`~skinflint.storage.spill.LedgerSpill`) beyond ``max_held`` records. A write with no
    answer after ``write_timeout`` seconds (a hung server, a silent network) is cut off and
    counts as a failure, so neither the writer nor ``close`` waits forever. ``close`` writes
    what is left and saves to the spill file what the server still does not take; the next
    ledger started with it writes those records first, in its constructor. The constructor
    connects and creates the table (blocking); raises ConfigError when that fails."""

    def __init__(
        self, url: str, *, flush_interval: float = 0.2, max_held: int = 100_000,
        write_timeout: float = 10.0, spill: str | Path | None = None,
    ) -> None:
        self.url = url
        self.write_timeout = write_timeout
        self._lock = threading.Lock()  # the connection runs one statement at a time
        self._conn = self._connect()
        try:
            with self._conn.transaction():
                self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                for statement in _ledger_schema():
                    self._conn.execute(statement)
                have = {r[0] for r in self._conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
                # made before rollups: built once, here
                for statement in rollup.create_statements("skinflint_ledger", "postgres", have):
                    self._conn.execute(statement)
        except psycopg.Error as exc:
            self._conn.close()
            raise config_error(url, exc) from exc
        self._writer = LedgerWriter(
            self._copy, interval=flush_interval, max_held=max_held, name="pg-ledger",
            spill=LedgerSpill(spill) if spill is not None else None,
            close_timeout=2 * write_timeout + 5)
        self._writer.start()

    @classmethod
    async def create(
        cls, url: str, *, flush_interval: float = 0.2, max_held: int = 100_000,
        write_timeout: float = 10.0, spill: str | Path | None = None,
    ) -> PostgresLedger:
        """The constructor, run in a worker thread so the event loop never waits for it."""
        return await asyncio.to_thread(
            cls, url, flush_interval=flush_interval, max_held=max_held,
            write_timeout=write_timeout, spill=spill)

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        # libpq takes whole seconds, at least 2
        timeout = max(2, min(CONNECT_TIMEOUT, round(self.write_timeout)))
        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=timeout)
        except psycopg.Error as exc:
            raise config_error(self.url, exc) from exc

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._conn.closed:
            self._conn = self._connect()
        return self._conn

    def record(self, record: LedgerRecord) -> None:
        self._writer.append(record)

    @contextlib.contextmanager
    def _copy(self) -> Iterator[Insert]:
        """One transaction (all or nothing), cut off after ``write_timeout``: the rows are
        COPYed to a temporary table, then added to the ledger and to its rollups."""
        with self._lock:
            conn = self._connection()
            with _cut_off_after(conn, self.write_timeout), conn.transaction(), \
                    conn.cursor() as cur:

                def insert(rows: list[LedgerRecord]) -> None:
                    cur.execute(_NEW_BATCH)
                    with cur.copy(_COPY) as copy:
                        for record in rows:
                            copy.write_row(_AS_ROW(record))
                    cur.execute(_FROM_BATCH)
                    for statement in _ROLL_BATCH:
                        cur.execute(statement)

                yield insert

    def flush(self) -> None:
        self._writer.flush()

    def query(self, since: float = 0.0) -> Iterator[LedgerRecord]:
        """Every record with ``ts >= since``, oldest first, after writing what is pending:
        read through a server-side cursor, :data:`READ_ROWS` at a time, as it is iterated
        (blocking; the ledger's connection is held until the iteration ends)."""
        self.flush()
        with self._lock:
            conn = self._connection()
            with conn.transaction(), conn.cursor(name="skinflint_query") as cur:
                cur.itersize = READ_ROWS
                cur.execute(f"SELECT {_QUOTED} FROM skinflint_ledger WHERE ts >= %s"
                            " ORDER BY ts", (since,))
                yield from (LedgerRecord(*row) for row in cur)

    def hit_counts(self) -> tuple[int, int, int, float]:
        """``(requests, hits, semantic hits, USD saved by hits)`` over chat and embeddings
        client requests (not the calls within one), counted by the database after writing what is
        pending."""
        self.flush()
        with self._lock:
            row = self._connection().execute(
                "SELECT COUNT(*), COUNT(*) FILTER (WHERE cache_status LIKE 'hit%%'),"
                " COUNT(*) FILTER (WHERE cache_status = 'hit-semantic'),"
                " COALESCE(SUM(saved_usd) FILTER (WHERE cache_status LIKE 'hit%%'), 0)"
                " FROM skinflint_ledger WHERE endpoint IN ('chat', 'embeddings')"
                " AND NOT (strategy = ANY(%s))",
                (list(ATTEMPT_STRATEGIES),),
            ).fetchone()
        assert row is not None  # an aggregate always returns one row
        return int(row[0]), int(row[1]), int(row[2]), float(row[3])

    def bypass_counts(self) -> dict[str, int]:
        """Chat and embeddings calls the cache did not serve or store, by ``cache_reason``
        ("" for rows written before reasons were recorded), after writing what is pending."""
        self.flush()
        with self._lock:
            rows = self._connection().execute(
                "SELECT COALESCE(cache_reason, ''), COUNT(*) FROM skinflint_ledger"
                " WHERE cache_status = 'bypass' AND endpoint IN ('chat', 'embeddings')"
                " GROUP BY 1"
            ).fetchall()
        return {str(reason): int(n) for reason, n in rows}

    def spend(self, by: str, since: float, until: float, bucket: str) -> Spend:
        """Spend by ``by`` from ``since`` to ``until`` (unix seconds) per ``bucket``, from the
        rollups (see :class:`~skinflint.storage.spend.SpendQueries`). Blocking."""
        return _SPEND.run(self._fetch, by, since, until, bucket)

    def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._connection().execute(sql, params).fetchall()

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` rows, newest first, with the columns of ``GET /api/requests``.
        Blocking."""
        with self._lock:
            rows = self._connection().execute(_RECENT, (limit,)).fetchall()
        return [dict(zip(rollup.RECENT_COLUMNS, row, strict=True)) for row in rows]

    def close(self) -> None:
        self._writer.close()
        with self._lock:
            self._conn.close()
