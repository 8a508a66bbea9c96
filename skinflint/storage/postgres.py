"""PostgreSQL storage, so that several gateway replicas share one cache, one semantic index and
one ledger.

* :class:`PostgresCacheStore` (a :class:`~skinflint.interfaces.CacheStore`): one table whose
  ``tags`` array has a GIN index, so a write is one upsert and invalidating tags is one indexed
  ``DELETE``. Expired rows and rows past ``max_entries`` (oldest writes first) are removed by
  :meth:`~PostgresCacheStore.sweep`, which runs in the background every ``sweep_every`` writes.
* :class:`PgSemanticIndex` (a :class:`~skinflint.interfaces.SemanticIndex`) on pgvector: one
  table per dimension with an HNSW index for cosine distance, rows filtered by vector space
  (embedder name) and partition. Recency lives in a side table, so a touch never rewrites a
  vector row (which would insert it into the HNSW graph again).
* :class:`PostgresLedger` (a :class:`~skinflint.interfaces.Ledger`): ``record`` appends to a
  deque; a writer thread COPYs batches over its own connection and keeps a failed batch for the
  next try, so a database restart loses nothing.

Build the async stores with ``await X.create(url, ...)``; the ledger's constructor connects
(blocking), so async code uses ``await PostgresLedger.create(url)``. Schema creation is
idempotent and serialised by an advisory lock, so replicas may start together. Table names are
unqualified: add ``options=-csearch_path=NAME,public`` to the URL to keep them in a schema.

Cache and semantic reads and writes turn database failures into misses (logged): the cache
saves money and must not take the gateway down. Each of them is cut off by the server after
``op_timeout`` seconds (``statement_timeout``), so a table locked by a long transaction costs a
miss, not a stalled request; the client gives up half a second later still, for a server that
hangs or a network that drops packets silently. After three failures in a row they skip the
database for a few seconds (:class:`~skinflint.storage.breaker.Breaker`). Sweeps, evictions,
invalidation, stats and counts run without those limits; invalidation, stats and counts raise.

psycopg 3 is the driver: it is fully typed, and the same library serves the async pools and the
ledger's synchronous COPY.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector_async
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from skinflint.errors import ConfigError
from skinflint.interfaces import CacheEntry, Vector
from skinflint.models import LedgerRecord
from skinflint.storage.breaker import Breaker
from skinflint.storage.spill import LedgerSpill
from skinflint.storage.writer import BatchWriter

__all__ = ["PgSemanticIndex", "PostgresCacheStore", "PostgresLedger"]

log = logging.getLogger("skinflint.storage")

AsyncConn = psycopg.AsyncConnection[tuple[Any, ...]]
Pool = AsyncConnectionPool[AsyncConn]

_CONNECT_TIMEOUT = 10  # seconds, libpq's connect_timeout
_DEADLINE_GRACE = 0.5  # seconds past op_timeout before a cache or semantic call is abandoned
_SCHEMA_LOCK = 0x5B1F_0001  # advisory lock key held while creating tables
_HNSW_MAX_DIM = 2000  # pgvector cannot index wider ``vector`` columns with HNSW


def _where(url: str) -> str:
    """The server ``url`` names, without credentials, for error messages."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return "an unparsable URL"
    return f"{params.get('host', 'localhost')}:{params.get('port', 5432)}"


def _config_error(url: str, exc: psycopg.Error) -> ConfigError:
    return ConfigError(f"storage: PostgreSQL at {_where(url)}: {str(exc).strip()}")


async def _setup(url: str, statements: Sequence[str]) -> str:
    """Run the schema ``statements`` in one transaction; returns pgvector's version ("" when the
    extension is absent). Raises ConfigError when the server cannot be reached or refuses."""
    try:
        conn = await psycopg.AsyncConnection.connect(
            url, autocommit=True, connect_timeout=_CONNECT_TIMEOUT)
        async with conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                for statement in statements:
                    await conn.execute(statement)
            cur = await conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            row = await cur.fetchone()
    except psycopg.Error as exc:
        raise _config_error(url, exc) from exc
    return str(row[0]) if row else ""


async def _open_pool(
    url: str, *, size: int, timeout: float, op_timeout: float,
    configure: Callable[[AsyncConn], Awaitable[None]] | None = None,
) -> Pool:
    """An opened pool of autocommit connections (each statement is its own transaction) whose
    statements the server cancels after ``op_timeout`` seconds (see :func:`_unbounded`)."""
    options = conninfo_to_dict(url).get("options") or ""  # keep the URL's own, if any
    limit = f"-c statement_timeout={max(1, round(op_timeout * 1000))}"
    kwargs = {"autocommit": True, "connect_timeout": _CONNECT_TIMEOUT,
              "options": f"{options} {limit}".strip()}
    pool: Pool = AsyncConnectionPool(
        url, min_size=1, max_size=size, open=False, timeout=timeout, configure=configure,
        kwargs=kwargs, name="skinflint")
    try:
        await pool.open(wait=True, timeout=timeout)
    except psycopg.Error as exc:
        await pool.close()
        raise _config_error(url, exc) from exc
    return pool


def _bounded(breaker: dict[str, Any], op_timeout: float) -> dict[str, Any]:
    """The breaker's settings, with a client-side deadline a little past the server's
    statement timeout: it ends a call that a hung server or a silent network never answers."""
    return {"deadline": op_timeout + _DEADLINE_GRACE, **breaker}


async def _unbounded(pool: Pool, statement: str, params: Any) -> tuple[int, list[Any]]:
    """``(rowcount, rows)`` of one maintenance statement run without the pool's statement
    timeout: sweeping or invalidating many rows may take longer than a cache read may."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SET LOCAL statement_timeout = 0")
        cur = await conn.execute(statement, params)
        return cur.rowcount, (await cur.fetchall() if cur.description else [])


@contextlib.contextmanager
def _as_miss(what: str) -> Iterator[None]:
    """Swallow (and log) a database failure where a failure must only cost a cache miss."""
    try:
        yield
    except psycopg.Error as exc:
        log.warning("postgres: %s failed: %s", what, exc)


class _Every:
    """Starts ``job`` in the background on every ``n``-th :meth:`tick`, one run at a time; the
    job's database failures are logged, never raised."""

    def __init__(self, n: int, job: Callable[[], Awaitable[object]], what: str) -> None:
        self.n = max(1, n)
        self._job = job
        self._what = what
        self._ticks = 0
        self._task: asyncio.Task[None] | None = None

    def tick(self) -> None:
        self._ticks += 1
        if self._ticks % self.n == 0 and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        with _as_miss(self._what):
            await self._job()

    async def wait(self) -> None:
        """Wait for the run in progress, if any."""
        if self._task is not None:
            await self._task


_CACHE_SCHEMA = (
    "CREATE SEQUENCE IF NOT EXISTS skinflint_cache_seq",
    "CREATE TABLE IF NOT EXISTS skinflint_cache (key TEXT PRIMARY KEY, value BYTEA NOT NULL,"
    " expires_at DOUBLE PRECISION NOT NULL, tags TEXT[] NOT NULL,"
    " written BIGINT NOT NULL DEFAULT nextval('skinflint_cache_seq'))",
    "CREATE INDEX IF NOT EXISTS skinflint_cache_tags ON skinflint_cache USING gin (tags)",
    "CREATE INDEX IF NOT EXISTS skinflint_cache_written ON skinflint_cache (written)",
    "CREATE INDEX IF NOT EXISTS skinflint_cache_expiry ON skinflint_cache (expires_at)"
    " WHERE expires_at > 0",
)
_CACHE_GET = ("SELECT value FROM skinflint_cache"
              " WHERE key = %s AND (expires_at = 0 OR expires_at > %s)")
# EXCLUDED.written is a fresh sequence value, so a rewrite counts as the newest write.
_CACHE_SET = ("INSERT INTO skinflint_cache (key, value, expires_at, tags) VALUES (%s, %s, %s, %s)"
              " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value,"
              " expires_at = EXCLUDED.expires_at, tags = EXCLUDED.tags, written = EXCLUDED.written")
_CACHE_EXPIRE = "DELETE FROM skinflint_cache WHERE expires_at > 0 AND expires_at <= %s"
# Keeps the newest ``max_entries`` writes: a backward walk of the ``written`` index.
_CACHE_TRIM = ("DELETE FROM skinflint_cache WHERE written <= (SELECT written FROM skinflint_cache"
               " ORDER BY written DESC OFFSET %s LIMIT 1)")


class PostgresCacheStore:
    """A :class:`~skinflint.interfaces.CacheStore` shared by every replica. Owns its pool.

    ``max_entries`` is enforced by :meth:`sweep`, so the table may overshoot it by up to
    ``sweep_every`` writes per replica between sweeps."""

    def __init__(
        self, pool: Pool, *, max_entries: int = 200_000, sweep_every: int = 1000,
        **breaker: Any,
    ) -> None:
        self.max_entries = max_entries
        self.evictions = 0
        self._pool = pool
        self._sweeper = _Every(sweep_every, self.sweep, "cache sweep")
        self._breaker = Breaker("postgres", (psycopg.Error,), **breaker)

    @classmethod
    async def create(
        cls, url: str, *, max_entries: int = 200_000, sweep_every: int = 1000,
        pool_size: int = 4, timeout: float = 5.0, op_timeout: float = 1.0, **breaker: Any,
    ) -> PostgresCacheStore:
        """Create the tables if needed and connect. Raises ConfigError when that fails.
        ``breaker`` passes ``limit``, ``cooldown`` and ``clock`` on to the store's
        :class:`~skinflint.storage.breaker.Breaker`."""
        await _setup(url, _CACHE_SCHEMA)
        pool = await _open_pool(url, size=pool_size, timeout=timeout, op_timeout=op_timeout)
        return cls(pool, max_entries=max_entries, sweep_every=sweep_every,
                   **_bounded(breaker, op_timeout))

    async def get(self, key: str, now: float) -> bytes | None:
        """The live value under ``key``, or None (also when the database fails, is skipped or
        does not answer in time)."""
        return await self._breaker.call("cache get", partial(self._get, key, now), None)

    async def _get(self, key: str, now: float) -> bytes | None:
        async with self._pool.connection() as conn:
            row = await (await conn.execute(_CACHE_GET, (key, now))).fetchone()
        return None if row is None else bytes(row[0])

    async def set(self, entry: CacheEntry) -> None:
        """Store ``entry``, replacing its value and tags; a database failure is logged only."""
        if self.max_entries > 0:
            await self._breaker.call("cache set", partial(self._set, entry), None)

    async def _set(self, entry: CacheEntry) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(
                _CACHE_SET, (entry.key, entry.value, entry.expires_at, list(entry.tags)))
        self._sweeper.tick()

    async def invalidate_tags(self, tags: Sequence[str]) -> int:
        if not tags:
            return 0
        dropped, _ = await _unbounded(
            self._pool, "DELETE FROM skinflint_cache WHERE tags && %s::text[]", (list(tags),))
        return dropped

    async def sweep(self, now: float | None = None) -> int:
        """Delete expired rows, then the oldest writes past ``max_entries``; returns how many
        rows went. Safe to run from several replicas at once."""
        now = time.time() if now is None else now
        expired, _ = await _unbounded(self._pool, _CACHE_EXPIRE, (now,))
        trimmed, _ = await _unbounded(self._pool, _CACHE_TRIM, (max(self.max_entries, 0),))
        self.evictions += trimmed
        return expired + trimmed

    async def stats(self) -> dict[str, int]:
        _, rows = await _unbounded(
            self._pool, "SELECT count(*), coalesce(sum(octet_length(value)), 0)"
            " FROM skinflint_cache", None)
        entries, size = rows[0]
        return {"entries": int(entries), "bytes": int(size), "evictions": self.evictions}

    async def close(self) -> None:
        await self._sweeper.wait()
        await self._pool.close()


def _semantic_schema(table: str, dim: int) -> tuple[str, ...]:
    return (
        "CREATE EXTENSION IF NOT EXISTS vector",
        f"CREATE TABLE IF NOT EXISTS {table} (space TEXT NOT NULL, key TEXT NOT NULL,"
        f" partition TEXT NOT NULL, text TEXT NOT NULL, embedding vector({dim}) NOT NULL,"
        " PRIMARY KEY (space, key))",
        f"CREATE INDEX IF NOT EXISTS {table}_hnsw ON {table}"
        " USING hnsw (embedding vector_cosine_ops)",
        f"CREATE INDEX IF NOT EXISTS {table}_partition ON {table} (space, partition)",
        f"CREATE TABLE IF NOT EXISTS {table}_used (space TEXT NOT NULL, key TEXT NOT NULL,"
        " last_used TIMESTAMPTZ NOT NULL, PRIMARY KEY (space, key))",
        f"CREATE INDEX IF NOT EXISTS {table}_lru ON {table}_used (space, last_used)",
    )


class _SemanticSQL:
    """The statements of one ``vector(dim)`` table and its recency side table."""

    def __init__(self, table: str) -> None:
        self.search = (
            f"SELECT key, 1 - (embedding <=> %(v)s), text FROM {table}"
            " WHERE space = %(space)s AND partition = %(partition)s"
            " ORDER BY embedding <=> %(v)s LIMIT %(k)s")
        self.add = (
            f"WITH added AS (INSERT INTO {table} (space, key, partition, text, embedding)"
            " VALUES (%(space)s, %(key)s, %(partition)s, %(text)s, %(v)s)"
            " ON CONFLICT (space, key) DO UPDATE SET partition = EXCLUDED.partition,"
            " text = EXCLUDED.text, embedding = EXCLUDED.embedding)"
            f" INSERT INTO {table}_used (space, key, last_used)"
            " VALUES (%(space)s, %(key)s, clock_timestamp())"
            " ON CONFLICT (space, key) DO UPDATE SET last_used = EXCLUDED.last_used")
        self.touch = (f"UPDATE {table}_used SET last_used = clock_timestamp()"
                      " WHERE space = %(space)s AND key = %(key)s")
        self.remove = (
            f"WITH gone AS (DELETE FROM {table}_used WHERE space = %(space)s AND key = %(key)s)"
            f" DELETE FROM {table} WHERE space = %(space)s AND key = %(key)s")
        self.count = f"SELECT count(*) FROM {table} WHERE space = %(space)s"
        self.evict = (
            f"WITH old AS (SELECT key FROM {table}_used WHERE space = %(space)s"
            " ORDER BY last_used DESC, key OFFSET %(keep)s),"
            f" gone AS (DELETE FROM {table}_used u USING old"
            " WHERE u.space = %(space)s AND u.key = old.key)"
            f" DELETE FROM {table} e USING old WHERE e.space = %(space)s AND e.key = old.key")


async def _configure_vectors(conn: AsyncConn, *, iterative: bool) -> None:
    """Teach a new connection the ``vector`` type (numpy arrays are sent in binary)."""
    await register_vector_async(conn)
    if iterative:
        # Without it an HNSW scan returns ef_search candidates before the space and partition
        # filter, so a small partition among many would look empty (pgvector >= 0.8).
        await conn.execute("SET hnsw.iterative_scan = strict_order")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


class PgSemanticIndex:
    """A :class:`~skinflint.interfaces.SemanticIndex` in pgvector, shared by every replica.

    Rows live in ``skinflint_semantic_<dim>``, keyed by (space, key): ``space`` names the
    embedder, so vectors of different embedders never mix. Vectors must be unit length, as the
    embedders return them; a vector of the wrong size raises ValueError. ``max_entries`` bounds
    the rows of this space, least recently added or touched evicted first, by :meth:`evict`,
    which runs in the background every ``evict_every`` additions. Owns its pool."""

    def __init__(
        self, pool: Pool, *, space: str, dim: int, max_entries: int = 100_000,
        evict_every: int = 500, **breaker: Any,
    ) -> None:
        self.space = space
        self.dim = dim
        self.max_entries = max_entries
        self.evictions = 0
        self._pool = pool
        self._sql = _SemanticSQL(f"skinflint_semantic_{int(dim)}")
        self._evictor = _Every(evict_every, self.evict, "semantic eviction")
        self._breaker = Breaker("postgres", (psycopg.Error,), **breaker)

    @classmethod
    async def create(
        cls, url: str, *, space: str, dim: int, max_entries: int = 100_000,
        evict_every: int = 500, pool_size: int = 4, timeout: float = 5.0,
        op_timeout: float = 1.0, **breaker: Any,
    ) -> PgSemanticIndex:
        """Create the extension and tables if needed and connect. Raises ConfigError when that
        fails, or for a ``dim`` outside 1..2000 (the widest vector HNSW indexes). ``breaker``
        is passed on as for :meth:`PostgresCacheStore.create`."""
        if not 0 < dim <= _HNSW_MAX_DIM:
            raise ConfigError(f"storage: a pgvector index takes 1 to {_HNSW_MAX_DIM} dimensions,"
                              f" not {dim}")
        version = await _setup(url, _semantic_schema(f"skinflint_semantic_{int(dim)}", dim))
        configure = partial(_configure_vectors, iterative=_version(version) >= (0, 8))
        pool = await _open_pool(
            url, size=pool_size, timeout=timeout, op_timeout=op_timeout, configure=configure)
        return cls(pool, space=space, dim=dim, max_entries=max_entries, evict_every=evict_every,
                   **_bounded(breaker, op_timeout))

    def _vector(self, vector: Vector) -> Vector:
        out = np.asarray(vector, dtype=np.float32).reshape(-1)
        if out.shape != (self.dim,):
            raise ValueError(
                f"expected a vector of {self.dim} dimensions, got shape {np.shape(vector)}")
        return out

    async def search(self, partition: str, vector: Vector, k: int) -> list[tuple[str, float, str]]:
        """Up to ``k`` (key, cosine similarity, question) triples from ``partition``, most
        similar first; [] when the database fails."""
        params = {"v": self._vector(vector), "space": self.space, "partition": partition, "k": k}
        if k <= 0:
            return []
        return await self._breaker.call("semantic search", partial(self._search, params), [])

    async def _search(self, params: dict[str, Any]) -> list[tuple[str, float, str]]:
        async with self._pool.connection() as conn:
            rows = await (await conn.execute(self._sql.search, params)).fetchall()
        return [(str(key), float(score), str(text)) for key, score, text in rows]

    async def add(self, partition: str, key: str, text: str, vector: Vector) -> None:
        """Store or replace ``key`` (a database failure is logged only)."""
        params = {"v": self._vector(vector), "space": self.space, "partition": partition,
                  "key": key, "text": text}
        await self._breaker.call("semantic add", partial(self._add, params), None)

    async def _add(self, params: dict[str, Any]) -> None:
        await self._run(self._sql.add, params)
        self._evictor.tick()

    async def touch(self, key: str) -> None:
        params = {"space": self.space, "key": key}
        await self._breaker.call("semantic touch", partial(self._run, self._sql.touch, params), 0)

    async def remove(self, key: str) -> None:
        params = {"space": self.space, "key": key}
        await self._breaker.call("semantic remove", partial(self._run, self._sql.remove, params), 0)

    async def count(self) -> int:
        _, rows = await _unbounded(self._pool, self._sql.count, {"space": self.space})
        return int(rows[0][0])

    async def evict(self) -> int:
        """Delete this space's least recently used rows past ``max_entries``; returns how many.
        Safe to run from several replicas at once."""
        keep = max(self.max_entries, 0)
        dropped, _ = await _unbounded(
            self._pool, self._sql.evict, {"space": self.space, "keep": keep})
        self.evictions += dropped
        return dropped

    async def _run(self, statement: str, params: dict[str, Any]) -> int:
        async with self._pool.connection() as conn:
            return (await conn.execute(statement, params)).rowcount

    async def close(self) -> None:
        await self._evictor.wait()
        await self._pool.close()


_PG_TYPES = {"str": "TEXT", "float": "DOUBLE PRECISION", "int": "BIGINT",
             "float | None": "DOUBLE PRECISION"}
_COLUMNS = [f.name for f in fields(LedgerRecord)]
_QUOTED = ", ".join(f'"{name}"' for name in _COLUMNS)  # "user" is a reserved word
_AS_ROW = operator.attrgetter(*_COLUMNS)
_COPY = f"COPY skinflint_ledger ({_QUOTED}) FROM STDIN"


@contextlib.contextmanager
def _cut_off_after(conn: psycopg.Connection[Any], seconds: float) -> Iterator[None]:
    """Shut the connection's socket down if the block is still running after ``seconds``: a
    blocking call to a server that stopped answering would otherwise wait forever. The call
    then fails with an OperationalError and the connection is replaced on next use."""
    fd = conn.pgconn.socket

    def cut() -> None:
        if conn.closed or conn.pgconn.socket != fd:
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
        timer.cancel()


def _ledger_schema() -> list[str]:
    """The ledger table, one column per :class:`LedgerRecord` field. Fields added later become
    new columns of an existing table. Raises TypeError for a field type with no mapping."""
    columns = []
    for f in fields(LedgerRecord):
        sql_type = _PG_TYPES.get(str(f.type))
        if sql_type is None:
            raise TypeError(f"LedgerRecord.{f.name}: no PostgreSQL type for {f.type}")
        columns.append(f'"{f.name}" {sql_type}')
    return [
        f"CREATE TABLE IF NOT EXISTS skinflint_ledger ({', '.join(columns)})",
        *(f"ALTER TABLE skinflint_ledger ADD COLUMN IF NOT EXISTS {c}" for c in columns),
        "CREATE INDEX IF NOT EXISTS skinflint_ledger_ts ON skinflint_ledger (ts)",
    ]


class PostgresLedger:
    """A :class:`~skinflint.interfaces.Ledger` in PostgreSQL, shared by every replica.

    ``record`` only appends to a deque. A writer thread COPYs what is pending every
    ``flush_interval`` seconds over its own connection, reconnecting after a failure; a batch
    that could not be written is kept (up to ``max_held`` records, oldest dropped first, logged)
    and written first next time. A write with no answer after ``write_timeout`` seconds (a hung
    server, a silent network) is cut off and counts as a failure, so neither the writer nor
    ``close`` waits forever. ``close`` writes what is left; what the server still does not take
    is saved to the ``spill`` file when one is given
    (:class:`~skinflint.storage.spill.LedgerSpill`), and the next ledger started with it writes
    those records first. The constructor connects and creates the table (blocking); raises
    ConfigError when that fails."""

    def __init__(
        self, url: str, *, flush_interval: float = 0.2, max_held: int = 100_000,
        write_timeout: float = 10.0, spill: str | Path | None = None,
    ) -> None:
        self.url = url
        self.max_held = max_held
        self.write_timeout = write_timeout
        self._held: list[LedgerRecord] = []
        self._spill = LedgerSpill(spill) if spill is not None else None
        self._lock = threading.Lock()  # the connection runs one statement at a time
        self._conn = self._connect()
        try:
            with self._conn.transaction():
                self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                for statement in _ledger_schema():
                    self._conn.execute(statement)
        except psycopg.Error as exc:
            self._conn.close()
            raise _config_error(url, exc) from exc
        if self._spill is not None:
            self._held = self._spill.load()
        self._writer = BatchWriter(self._write, interval=flush_interval, name="pg-ledger")

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
        timeout = max(2, min(_CONNECT_TIMEOUT, round(self.write_timeout)))
        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=timeout)
        except psycopg.Error as exc:
            raise _config_error(self.url, exc) from exc

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._conn.closed:
            self._conn = self._connect()
        return self._conn

    def record(self, record: LedgerRecord) -> None:
        self._writer.append(record)

    def _write(self, batch: list[LedgerRecord]) -> None:
        """Write the held records, then ``batch``, in one COPY (all or nothing)."""
        with self._lock:
            rows, self._held = self._held + batch, []
            try:
                conn = self._connection()
                with _cut_off_after(conn, self.write_timeout), conn.cursor() as cur, \
                        cur.copy(_COPY) as copy:
                    for record in rows:
                        copy.write_row(_AS_ROW(record))
            except (psycopg.Error, ConfigError) as exc:
                self._hold(rows, exc)
            else:
                if self._spill is not None:
                    self._spill.written()

    def _hold(self, rows: list[LedgerRecord], exc: Exception) -> None:
        lost = max(0, len(rows) - self.max_held)
        self._held = rows[lost:]
        log.warning("postgres ledger: %d records held for the next write: %s", len(rows), exc)
        if lost:
            log.error("postgres ledger: dropped the %d oldest held records", lost)

    def flush(self) -> None:
        if not self._writer.flush() and self._held:  # it calls back only with new records
            self._write([])

    def query(self, since: float = 0.0) -> list[LedgerRecord]:
        """Every record with ``ts >= since``, oldest first, after writing what is pending."""
        self.flush()
        with self._lock:
            cur = self._connection().execute(
                f"SELECT {_QUOTED} FROM skinflint_ledger WHERE ts >= %s ORDER BY ts", (since,))
            return [LedgerRecord(*row) for row in cur.fetchall()]

    def hit_counts(self) -> tuple[int, int, int, float]:
        """``(requests, hits, semantic hits, USD saved by hits)`` over chat and embeddings
        calls, counted by the database after writing what is pending."""
        self.flush()
        with self._lock:
            row = self._connection().execute(
                "SELECT COUNT(*), COUNT(*) FILTER (WHERE cache_status LIKE 'hit%'),"
                " COUNT(*) FILTER (WHERE cache_status = 'hit-semantic'),"
                " COALESCE(SUM(saved_usd) FILTER (WHERE cache_status LIKE 'hit%'), 0)"
                " FROM skinflint_ledger WHERE endpoint IN ('chat', 'embeddings')"
            ).fetchone()
        assert row is not None  # an aggregate always returns one row
        return int(row[0]), int(row[1]), int(row[2]), float(row[3])

    def close(self) -> None:
        if not self._writer.close() and self._held:
            self._write([])
        if self._held and self._spill is not None:
            self._spill.save(self._held)
            self._held = []
        if self._held:
            log.error("postgres ledger: %d records could not be written", len(self._held))
        with self._lock:
            self._conn.close()
