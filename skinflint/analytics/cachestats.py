"""Cache figures and offline invalidation, for the CLI.

``db`` is the SQLite path, a ``postgresql://`` URL (as for ``skinflint report``) or a
``redis://`` URL (cache figures only: the ledger lives elsewhere). Offline invalidation with a
shared store runs what a gateway runs; with SQLite it edits the file (a running gateway keeps
its in-memory copies until told, so the CLI tells it first).
"""

from __future__ import annotations

import asyncio
import errno
import json
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from skinflint.interfaces import CacheStore
from skinflint.models import CASCADE_ATTEMPT
from skinflint.storage.ledger import open_sqlite

T = TypeVar("T")

__all__ = ["invalidate", "stats"]


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
        entries = asyncio.run(_with_store(path, redis_prefix, _entries))
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
            return _hit_figures(*ledger.hit_counts())
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
    return _hit_figures(total, hits, semantic_hits, float(saved))


async def _with_store(db: str, redis_prefix: str, job: Callable[[CacheStore], Awaitable[T]]) -> T:
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


def _tell_gateway(url: str, tags: list[str], admin_key: str | None) -> int | None:
    """Ask a running gateway to invalidate (it also drops its in-memory copies)."""
    req = urllib.request.Request(
        url.rstrip("/") + "/api/cache/invalidate",
        data=json.dumps({"tags": tags}).encode(),
        method="POST",
        headers={"content-type": "application/json"},
    )
    if admin_key:
        req.add_header("authorization", f"Bearer {admin_key}")
    try:
        with urllib.request.urlopen(req, timeout=3) as resp:
            return int(json.loads(resp.read())["invalidated"])
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return None


def invalidate(
    path: str, tags: list[str], *, url: str | None, admin_key: str | None = None,
    redis_prefix: str = "skinflint:",
) -> dict[str, Any]:
    if url:
        n = _tell_gateway(url, tags, admin_key)
        if n is not None:
            return {"invalidated": n, "where": f"gateway at {url}"}
    if is_postgres(path) or is_redis(path):
        dropped = asyncio.run(_with_store(path, redis_prefix, lambda s: s.invalidate_tags(tags)))
        return {"invalidated": dropped, "where": "postgres" if is_postgres(path) else "redis"}
    conn = open_sqlite(path)
    try:
        if "cache_tags" not in _tables(conn):
            return {"invalidated": 0, "where": path}
        marks = ", ".join("?" for _ in tags)
        with conn:
            keys = [
                r[0]
                for r in conn.execute(
                    f"SELECT DISTINCT key FROM cache_tags WHERE tag IN ({marks})", tags
                )
            ]
            for key in keys:
                conn.execute("DELETE FROM cache_entries WHERE key = ?", (key,))
                conn.execute("DELETE FROM cache_tags WHERE key = ?", (key,))
        return {"invalidated": len(keys), "where": path}
    finally:
        conn.close()
