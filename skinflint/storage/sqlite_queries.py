"""Read-only figures from a SQLite file the gateway writes (the ledger and the exact cache), for
``skinflint cache stats``. A file written by an earlier version (a table or a column missing)
is read as it is: nothing here creates or changes a table. The PostgreSQL counterparts are
methods of :class:`~skinflint.storage.pg_ledger.PostgresLedger` and the stores' ``stats``.

Each function opens its own connection and closes it; all of them block (call them from a
worker thread in async code).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TypeVar

from skinflint.models import ATTEMPT_STRATEGIES
from skinflint.storage.ledger import open_sqlite

__all__ = ["bypass_counts", "cache_figures", "hit_counts", "holds_cache"]

T = TypeVar("T")

#: The requests a client sent (not the cascade tiers called on their behalf).
_CLIENT_REQUESTS = "endpoint IN ('chat', 'embeddings')"
_ATTEMPTS = ", ".join("?" * len(ATTEMPT_STRATEGIES))  # placeholders of the attempt strategies


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _read(path: str, job: Callable[[sqlite3.Connection, set[str]], T]) -> T:
    conn = open_sqlite(path)
    try:
        return job(conn, _tables(conn))
    finally:
        conn.close()


def holds_cache(path: str) -> bool:
    """Whether a gateway has ever kept a cache in the file."""
    return _read(path, lambda _, tables: "cache_tags" in tables)


def cache_figures(path: str, now: float) -> dict[str, int]:
    """Entries in the exact cache (and of them, those expired at ``now``), their bytes, the
    distinct tags, and the semantic index's entries when the file has one."""
    return _read(path, lambda conn, tables: _cache_figures(conn, tables, now))


def _cache_figures(conn: sqlite3.Connection, tables: set[str], now: float) -> dict[str, int]:
    out = {"entries": 0, "expired": 0, "bytes": 0, "tags": 0}
    if "cache_entries" in tables:
        n, size, expired = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(value)), 0),"
            " COALESCE(SUM(expires_at > 0 AND expires_at <= ?), 0) FROM cache_entries",
            (now,),
        ).fetchone()
        out.update(entries=n, bytes=size, expired=expired)
        out["tags"] = conn.execute("SELECT COUNT(DISTINCT tag) FROM cache_tags").fetchone()[0]
    if "semantic_entries" in tables:
        out["semantic_entries"] = conn.execute(
            "SELECT COUNT(*) FROM semantic_entries").fetchone()[0]
    return out


def hit_counts(path: str) -> tuple[int, int, int, float] | None:
    """``(requests, hits, semantic hits, USD saved by hits)`` over chat and embeddings client
    requests, as :meth:`PostgresLedger.hit_counts
    <skinflint.storage.pg_ledger.PostgresLedger.hit_counts>` counts them; None when the file
    has no ledger."""
    return _read(path, _hit_counts)


def _hit_counts(
    conn: sqlite3.Connection, tables: set[str]
) -> tuple[int, int, int, float] | None:
    if "ledger" not in tables:
        return None
    total, hits, semantic_hits, saved = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(cache_status LIKE 'hit%'), 0),"
        " COALESCE(SUM(cache_status = 'hit-semantic'), 0),"
        " COALESCE(SUM(CASE WHEN cache_status LIKE 'hit%' THEN saved_usd END), 0)"
        f" FROM ledger WHERE {_CLIENT_REQUESTS} AND strategy NOT IN ({_ATTEMPTS})",
        ATTEMPT_STRATEGIES,
    ).fetchone()
    return int(total), int(hits), int(semantic_hits), float(saved)


def bypass_counts(path: str) -> dict[str, int]:
    """Chat and embeddings calls the cache did not serve or store, by ``cache_reason`` (""
    for rows written before reasons were recorded, or by a version without the column)."""
    return _read(path, _bypass_counts)


def _bypass_counts(conn: sqlite3.Connection, tables: set[str]) -> dict[str, int]:
    if "ledger" not in tables:
        return {}
    columns = {row[1] for row in conn.execute("PRAGMA table_info(ledger)")}
    reason = "COALESCE(cache_reason, '')" if "cache_reason" in columns else "''"
    rows = conn.execute(
        f"SELECT {reason}, COUNT(*) FROM ledger WHERE cache_status = 'bypass'"
        f" AND {_CLIENT_REQUESTS} GROUP BY 1"
    ).fetchall()
    return {str(r): int(n) for r, n in rows}
