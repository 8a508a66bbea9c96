"""Cache figures, for the CLI.

``db`` is the SQLite path, a ``postgresql://`` URL (as for ``skinflint report``) or a
``redis://`` URL (cache figures only: the ledger lives elsewhere). Invalidation is in
:mod:`skinflint.analytics.invalidation`.
"""

from __future__ import annotations

import asyncio
import errno
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from skinflint.interfaces import CacheStore
from skinflint.models import CASCADE_ATTEMPT, CacheBypass
from skinflint.storage.ledger import open_sqlite

T = TypeVar("T")

__all__ = ["bypassed", "is_postgres", "is_redis", "stats", "with_store"]


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def is_postgres(db: str) -> bool:
    return db.startswith(("postgres://", "postgresql://"))


def is_redis(db: str) -> bool:
    return db.startswith(("redis://", "rediss://", "unix://"))


def stats(
    path: str, *, redis_prefix: str = "skinflint:", ledger: str | None = None
) -> dict[str, Any]:
    """Entries in the cache store at ``path`` and, from the ledger, hit rate and money saved by
    cache hits. The ledger is at ``path`` too, except for Redis, which keeps no ledger: then it
    is at ``ledger`` (the gateway's PostgreSQL URL or SQLite file), when given. A SQLite
    ``path`` that does not exist raises FileNotFoundError (it is not created)."""
    if is_postgres(path) or is_redis(path):
        entries = asyncio.run(with_store(path, redis_prefix, _entries))
        source = path if is_postgres(path) else ledger
        return {**entries, **_ledger_hits(source)} if source else entries
    if not Path(path).is_file():  # opening it would create an empty database
        raise FileNotFoundError(errno.ENOENT, "no cache database", path)
    conn = open_sqlite(path)
    try:
        tables = _tables(conn)
        out: dict[str, Any] = {"entries": 0, "expired": 0, "bytes": 0, "tags": 0}
        if "cache_entries" in tables:
            now = time.time()
            n, size, expired = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(value)), 0),"
                " COALESCE(SUM(expires_at > 0 AND expires_at <= ?), 0) FROM cache_entries",
                (now,),
            ).fetchone()
            out.update(entries=n, bytes=size, expired=expired)
            out["tags"] = conn.execute("SELECT COUNT(DISTINCT tag) FROM cache_tags").fetchone()[0]
        if "semantic_entries" in tables:
            semantic = conn.execute("SELECT COUNT(*) FROM semantic_entries").fetchone()[0]
            out["semantic_entries"] = semantic
        return {**out, **_sqlite_hits(conn, tables)}
    finally:
        conn.close()


def _ledger_hits(source: str) -> dict[str, Any]:
    if is_postgres(source):
        from skinflint.storage.pg_ledger import PostgresLedger

        ledger = PostgresLedger(source)
        try:
            return {**_hit_figures(*ledger.hit_counts()),
                    "bypassed": bypassed(ledger.bypass_counts())}
        finally:
            ledger.close()
    if not Path(source).is_file():
        return {}
    conn = open_sqlite(source)
    try:
        return _sqlite_hits(conn, _tables(conn))
    finally:
        conn.close()


def _sqlite_hits(conn: sqlite3.Connection, tables: set[str]) -> dict[str, Any]:
    if "ledger" not in tables:
        return {}
    total, hits, semantic_hits, saved = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(cache_status LIKE 'hit%'), 0),"
        " COALESCE(SUM(cache_status = 'hit-semantic'), 0),"
        " COALESCE(SUM(CASE WHEN cache_status LIKE 'hit%' THEN saved_usd END), 0)"
        " FROM ledger WHERE endpoint IN ('chat', 'embeddings') AND strategy <> ?",
        (CASCADE_ATTEMPT,),  # client requests only
    ).fetchone()
    return {**_hit_figures(total, hits, semantic_hits, float(saved)),
            "bypassed": bypassed(_sqlite_bypass_counts(conn))}


def _sqlite_bypass_counts(conn: sqlite3.Connection) -> dict[str, int]:
    columns = {row[1] for row in conn.execute("PRAGMA table_info(ledger)")}
    reason = "COALESCE(cache_reason, '')" if "cache_reason" in columns else "''"
    rows = conn.execute(
        f"SELECT {reason}, COUNT(*) FROM ledger WHERE cache_status = 'bypass'"
        " AND endpoint IN ('chat', 'embeddings') GROUP BY 1"
    ).fetchall()
    return {str(r): int(n) for r, n in rows}


def bypassed(counts: dict[str, int]) -> dict[str, int]:
    """Requests the cache did not serve or store, by reason (every reason, most first); those
    recorded before reasons were (an empty reason) count as ``unrecorded``."""
    out = {reason.value: counts.get(reason.value, 0) for reason in CacheBypass}
    if counts.get(""):
        out["unrecorded"] = counts[""]
    return dict(sorted(out.items(), key=lambda item: -item[1]))


async def with_store(
    db: str, redis_prefix: str, job: Callable[[CacheStore], Awaitable[T]]
) -> T:
    """Run ``job`` on the shared store behind ``db`` (PostgreSQL or Redis), then close it."""
    store: CacheStore
    if is_postgres(db):
        from skinflint.storage.postgres import PostgresCacheStore

        store = await PostgresCacheStore.create(db, pool_size=1)
    else:
        from skinflint.storage.redis_cache import RedisCacheStore

        store = await RedisCacheStore.create(db, prefix=redis_prefix)
    try:
        return await job(store)
    finally:
        await store.close()


async def _entries(store: CacheStore) -> dict[str, Any]:
    out: dict[str, Any] = await store.stats()
    out.pop("evictions", None)  # counted by a running store, always 0 here
    return out


def _hit_figures(requests: int, hits: int, semantic_hits: int, saved: float) -> dict[str, Any]:
    return {
        "requests": requests,
        "hits": hits,
        "semantic_hits": semantic_hits,
        "hit_rate": hits / requests if requests else 0.0,
        "saved_usd": saved,
    }
