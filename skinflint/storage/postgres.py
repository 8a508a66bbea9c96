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
ledger's synchronous COPY. The cache store lives here, the semantic index in
:mod:`~skinflint.storage.pg_semantic`, the ledger in :mod:`~skinflint.storage.pg_ledger` (all
three importable from here), and what they share in :mod:`~skinflint.storage.pgpool`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import psycopg

from skinflint.interfaces import CacheEntry
from skinflint.storage.breaker import Breaker
from skinflint.storage.pg_ledger import PostgresLedger
from skinflint.storage.pg_semantic import PgSemanticIndex
from skinflint.storage.pgpool import Every, Pool, bounded, open_pool, setup, unbounded

__all__ = ["PgSemanticIndex", "PostgresCacheStore", "PostgresLedger"]

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
        self._sweeper = Every(sweep_every, self.sweep, "cache sweep")
        self._breaker = Breaker("postgres", (psycopg.Error,), **breaker)

    @classmethod
    async def create(
        cls, url: str, *, max_entries: int = 200_000, sweep_every: int = 1000,
        pool_size: int = 4, timeout: float = 5.0, op_timeout: float = 1.0, **breaker: Any,
    ) -> PostgresCacheStore:
        """Create the tables if needed and connect. Raises ConfigError when that fails.
        ``breaker`` passes ``limit``, ``cooldown`` and ``clock`` on to the store's
        :class:`~skinflint.storage.breaker.Breaker`."""
        await setup(url, _CACHE_SCHEMA)
        pool = await open_pool(url, size=pool_size, timeout=timeout, op_timeout=op_timeout)
        return cls(pool, max_entries=max_entries, sweep_every=sweep_every,
                   **bounded(breaker, op_timeout))

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
        dropped, _ = await unbounded(
            self._pool, "DELETE FROM skinflint_cache WHERE tags && %s::text[]", (list(tags),))
        return dropped

    async def sweep(self, now: float | None = None) -> int:
        """Delete expired rows, then the oldest writes past ``max_entries``; returns how many
        rows went. Safe to run from several replicas at once."""
        now = time.time() if now is None else now
        expired, _ = await unbounded(self._pool, _CACHE_EXPIRE, (now,))
        trimmed, _ = await unbounded(self._pool, _CACHE_TRIM, (max(self.max_entries, 0),))
        self.evictions += trimmed
        return expired + trimmed

    async def stats(self) -> dict[str, int]:
        _, rows = await unbounded(
            self._pool, "SELECT count(*), coalesce(sum(octet_length(value)), 0)"
            " FROM skinflint_cache", None)
        entries, size = rows[0]
        return {"entries": int(entries), "bytes": int(size), "evictions": self.evictions}

    async def close(self) -> None:
        await self._sweeper.wait()
        await self._pool.close()
