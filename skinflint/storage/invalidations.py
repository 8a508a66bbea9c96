"""Tag invalidations shared by every process that uses one SQLite file.

Each gateway process keeps recent cache entries in memory, in front of the file. So that an
invalidation made anywhere (a gateway's admin API, another ``serve --workers`` process,
``skinflint cache invalidate``) reaches every one of them, whoever invalidates deletes the
tagged rows and appends one line to ``cache_invalidations`` in the same transaction. Each
gateway reads the lines newer than the last one it applied every :data:`POLL_SECONDS`, drops
those tags from memory, and writes the last line applied in its row of ``cache_gateways``,
which it keeps fresh while it runs (:data:`HEARTBEAT_SECONDS`) and deletes when it stops.
Whoever invalidated can then tell which running gateways have applied the line.

All functions here are blocking: gateways call them from worker threads.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass

from skinflint.storage.ledger import sqlite_transaction

__all__ = [
    "HEARTBEAT_SECONDS",
    "LIVE_SECONDS",
    "POLL_SECONDS",
    "GatewayRow",
    "Pending",
    "create_tables",
    "delete_tagged",
    "gateway_id",
    "invalidate",
    "latest",
    "live_gateways",
    "pending",
    "register",
    "report_applied",
    "unregister",
]

#: How often a gateway reads the log: the longest it serves an entry invalidated elsewhere.
POLL_SECONDS = 0.25
#: How often a gateway that applied nothing new still marks itself alive.
HEARTBEAT_SECONDS = 2.0
#: A gateway not heard from for this long is taken to have stopped (killed, not shut down).
LIVE_SECONDS = 10.0
#: Log lines are kept at least this long, so a gateway paused for a while still finds them.
_KEEP_SECONDS = 86400.0

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS cache_invalidations (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " ts REAL NOT NULL, tags TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS cache_gateways (id TEXT PRIMARY KEY, pid INTEGER NOT NULL,"
    " host TEXT NOT NULL, started_at REAL NOT NULL, seen_at REAL NOT NULL,"
    " applied INTEGER NOT NULL)",
]


@dataclass(frozen=True, slots=True)
class GatewayRow:
    """A running gateway process as it registered itself."""

    id: str
    pid: int
    host: str
    applied: int  # the last log line it applied

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


@dataclass(frozen=True, slots=True)
class Pending:
    """Log lines newer than a gateway's last, as (id, tags). ``missed`` when older lines it
    never read were pruned (it then must drop everything it holds)."""

    lines: list[tuple[int, tuple[str, ...]]]
    missed: bool = False


def gateway_id() -> str:
    """A new identity for one gateway process."""
    return os.urandom(8).hex()


def create_tables(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA:
        conn.execute(statement)


def delete_tagged(conn: sqlite3.Connection, tags: Sequence[str]) -> set[str]:
    """Delete the cache entries tagged with any of ``tags``, logging nothing (to apply a
    logged invalidation again); returns their keys."""
    with sqlite_transaction(conn):
        return _delete_tagged(conn, tags)


def _delete_tagged(conn: sqlite3.Connection, tags: Sequence[str]) -> set[str]:
    marks = ", ".join("?" for _ in tags)
    keys = {r[0] for r in conn.execute(
        f"SELECT key FROM cache_tags WHERE tag IN ({marks})", list(tags))}
    conn.executemany("DELETE FROM cache_entries WHERE key = ?", [(k,) for k in keys])
    conn.executemany("DELETE FROM cache_tags WHERE key = ?", [(k,) for k in keys])
    return keys


def invalidate(conn: sqlite3.Connection, tags: Sequence[str]) -> tuple[set[str], int]:
    """Delete the entries tagged with any of ``tags`` and append the log line that tells every
    gateway, in one transaction; returns the keys deleted and the line's id. The connection
    must be in autocommit mode (as :func:`skinflint.storage.ledger.open_sqlite` opens it)."""
    with sqlite_transaction(conn):
        keys = _delete_tagged(conn, tags)
        line = conn.execute(
            "INSERT INTO cache_invalidations (ts, tags) VALUES (?, ?)",
            (time.time(), "\n".join(tags)),
        ).lastrowid
    assert line is not None
    return keys, line


def latest(conn: sqlite3.Connection) -> int:
    """The id of the newest log line (0 when there is none)."""
    row = conn.execute("SELECT MAX(id) FROM cache_invalidations").fetchone()
    return int(row[0] or 0)


def pending(conn: sqlite3.Connection, applied: int) -> Pending:
    """The log lines after ``applied``."""
    rows = conn.execute(
        "SELECT id, tags FROM cache_invalidations WHERE id > ? ORDER BY id", (applied,)
    ).fetchall()
    return Pending(
        [(int(line), tuple(t for t in tags.split("\n") if t)) for line, tags in rows],
        missed=bool(rows) and int(rows[0][0]) > applied + 1,  # ids are never reused: pruned
    )


def register(conn: sqlite3.Connection, gateway: str, applied: int) -> None:
    """Record a gateway that has applied the log up to ``applied`` (at start, the newest line:
    its memory was empty). Forgets gateways long gone, and log lines every gateway has
    applied once they are old."""
    now = time.time()
    with sqlite_transaction(conn):
        conn.execute("DELETE FROM cache_gateways WHERE seen_at < ?", (now - _KEEP_SECONDS,))
        conn.execute(
            "INSERT OR REPLACE INTO cache_gateways VALUES (?, ?, ?, ?, ?, ?)",
            (gateway, os.getpid(), socket.gethostname(), now, now, applied),
        )
        oldest = conn.execute("SELECT MIN(applied) FROM cache_gateways").fetchone()[0]
        conn.execute(
            "DELETE FROM cache_invalidations WHERE id < ? AND ts < ?",
            (int(oldest), now - _KEEP_SECONDS),
        )


def report_applied(conn: sqlite3.Connection, gateway: str, applied: int) -> None:
    """Mark ``gateway`` alive, having applied the log up to ``applied``."""
    with sqlite_transaction(conn):
        conn.execute(
            "INSERT INTO cache_gateways VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE"
            " SET seen_at = excluded.seen_at, applied = excluded.applied",
            (gateway, os.getpid(), socket.gethostname(), time.time(), time.time(), applied),
        )


def unregister(conn: sqlite3.Connection, gateway: str) -> None:
    with sqlite_transaction(conn):
        conn.execute("DELETE FROM cache_gateways WHERE id = ?", (gateway,))


def live_gateways(conn: sqlite3.Connection) -> list[GatewayRow]:
    """The gateways heard from within :data:`LIVE_SECONDS`."""
    rows = conn.execute(
        "SELECT id, pid, host, applied FROM cache_gateways WHERE seen_at >= ? ORDER BY started_at",
        (time.time() - LIVE_SECONDS,),
    ).fetchall()
    return [GatewayRow(str(r[0]), int(r[1]), str(r[2]), int(r[3])) for r in rows]
