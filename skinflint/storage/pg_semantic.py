"""The semantic index in PostgreSQL with pgvector, shared by every replica (see
:mod:`skinflint.storage.postgres`)."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector_async

from skinflint.errors import ConfigError
from skinflint.interfaces import Vector
from skinflint.storage.breaker import Breaker
from skinflint.storage.pgpool import (
    AsyncConn,
    Every,
    Pool,
    bounded,
    open_pool,
    setup,
    unbounded,
)

__all__ = ["PgSemanticIndex"]

_HNSW_MAX_DIM = 2000  # pgvector cannot index wider ``vector`` columns with HNSW


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
        self._evictor = Every(evict_every, self.evict, "semantic eviction")
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
        version = await setup(url, _semantic_schema(f"skinflint_semantic_{int(dim)}", dim))
        configure = partial(_configure_vectors, iterative=_version(version) >= (0, 8))
        pool = await open_pool(
            url, size=pool_size, timeout=timeout, op_timeout=op_timeout, configure=configure)
        return cls(pool, space=space, dim=dim, max_entries=max_entries, evict_every=evict_every,
                   **bounded(breaker, op_timeout))

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
        _, rows = await unbounded(self._pool, self._sql.count, {"space": self.space})
        return int(rows[0][0])

    async def evict(self) -> int:
        """Delete this space's least recently used rows past ``max_entries``; returns how many.
        Safe to run from several replicas at once."""
        keep = max(self.max_entries, 0)
        dropped, _ = await unbounded(
            self._pool, self._sql.evict, {"space": self.space, "keep": keep})
        self.evictions += dropped
        return dropped

    async def _run(self, statement: str, params: dict[str, Any]) -> int:
        async with self._pool.connection() as conn:
            return (await conn.execute(statement, params)).rowcount

    async def close(self) -> None:
        await self._evictor.wait()
        await self._pool.close()
