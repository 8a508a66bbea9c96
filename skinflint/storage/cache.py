"""Cache stores: an in-process LRU, and a tiered store (LRU in front of SQLite).

The tiered store keeps the set of keys present on disk in memory, so a miss costs no I/O at all;
the entries other processes write to the file are learnt with their invalidations, 4 times a
second, so a worker of ``serve --workers N`` serves what another one paid for;
disk reads (LRU misses of known keys) run in a worker thread and writes are batched by a writer
thread, so the event loop never touches the disk. Several processes may share the file
(``serve --workers N``, the CLI): invalidations reach each one's memory through the log in
:mod:`skinflint.storage.invalidations`.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from skinflint.interfaces import CacheEntry
from skinflint.storage import invalidations as shared
from skinflint.storage.ledger import open_sqlite
from skinflint.storage.writer import BatchWriter

__all__ = ["MemoryCacheStore", "TieredCacheStore"]

log = logging.getLogger("skinflint.storage")



class MemoryCacheStore:
    """LRU with expiry and a tag index. Not thread-safe: used from the event loop only."""

    def __init__(self, max_entries: int = 10_000, max_bytes: int = 64 << 20) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._by_tag: dict[str, set[str]] = {}
        self.evictions = 0

    def get_entry(self, key: str, now: float) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at and entry.expires_at <= now:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    async def get(self, key: str, now: float) -> bytes | None:
        entry = self.get_entry(key, now)
        return None if entry is None else entry.value

    def put(self, entry: CacheEntry) -> None:
        if self.max_entries <= 0:
            return
        if entry.key in self._entries:
            self._drop(entry.key)
        self._entries[entry.key] = entry
        self.bytes += len(entry.value)
        for tag in entry.tags:
            self._by_tag.setdefault(tag, set()).add(entry.key)
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.evictions += 1

    async def set(self, entry: CacheEntry) -> None:
        self.put(entry)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self.bytes -= len(entry.value)
        for tag in entry.tags:
            keys = self._by_tag.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_tag[tag]

    def drop_tags(self, tags: Sequence[str]) -> int:
        keys = {k for t in tags for k in self._by_tag.get(t, ())}
        for key in keys:
            self._drop(key)
        return len(keys)

    async def invalidate_tags(self, tags: Sequence[str]) -> int:
        return self.drop_tags(tags)

    def clear(self) -> int:
        """Drop every entry; returns how many there were."""
        n = len(self._entries)
        self._entries.clear()
        self._by_tag.clear()
        self.bytes = 0
        return n

    async def stats(self) -> dict[str, int]:
        return {"entries": len(self._entries), "bytes": self.bytes, "evictions": self.evictions}

    async def close(self) -> None:
        self.clear()


_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS cache_entries (key TEXT PRIMARY KEY, value BLOB NOT NULL,"
    " expires_at REAL NOT NULL, tags TEXT NOT NULL, written_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS cache_tags (tag TEXT NOT NULL, key TEXT NOT NULL,"
    " PRIMARY KEY (tag, key))",
    # an overwrite or an eviction deletes a key's tags: without this, a scan of every tag
    "CREATE INDEX IF NOT EXISTS cache_tags_key ON cache_tags (key)",
    "CREATE INDEX IF NOT EXISTS cache_entries_written ON cache_entries (written_at)",
]


class TieredCacheStore:
    """Memory LRU in front of a SQLite table that survives restarts.

    ``max_entries`` bounds the disk table (oldest writes evicted first)."""

    def __init__(
        self,
        path: str,
        *,
        memory_entries: int = 10_000,
        max_entries: int = 200_000,
        memory_bytes: int = 64 << 20,
        flush_interval: float = 0.1,
    ) -> None:
        self.path = path
        self.memory = MemoryCacheStore(memory_entries, memory_bytes)
        self.max_entries = max_entries
        self._conn = open_sqlite(path)
        for stmt in _SCHEMA:
            self._conn.execute(stmt)
        shared.create_tables(self._conn)
        self._on_disk: set[str] = set()
        self._seen_rowid = 0  # rows up to this one are known to be on disk
        self._learn(self._conn.execute("SELECT rowid, key FROM cache_entries ORDER BY rowid"))
        # Following other processes' invalidations: the last log line applied (those before
        # the keys above were read concern nothing in memory), and the lines written here.
        self.poll_seconds = shared.POLL_SECONDS
        self._gateway = shared.gateway_id()
        self._applied = shared.latest(self._conn)
        self._reported: int | None = None  # the line last reported as applied; None: never
        self._reported_at = 0.0
        self._own: builtins.set[int] = set()
        self.logged = 0  # the newest log line this store wrote (0: none)
        self._lock = threading.Lock()
        self._writer: BatchWriter[tuple[CacheEntry, bool]] = BatchWriter(
            self._write_locked, interval=flush_interval, name="cache")
        self.disk_reads = 0
        self._invalidating = 0  # tag invalidations running now
        self._invalidated = 0  # tag invalidations started so far

    async def get(self, key: str, now: float) -> bytes | None:
        entry = self.memory.get_entry(key, now)
        if entry is not None:
            return entry.value
        if key not in self._on_disk or self._invalidating:
            return None  # while tags are invalidated, the row may be one about to go
        before = self._invalidated
        entry = await asyncio.to_thread(self._read, key)
        self.disk_reads += 1
        if entry is None or (entry.expires_at and entry.expires_at <= now):
            return None
        if before != self._invalidated:
            # An invalidation started during the read: the row may be one it deletes, so it
            # is neither served nor brought back into memory.
            return None
        self.memory.put(entry)
        return entry.value

    def _read(self, key: str) -> CacheEntry | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT value, expires_at, tags FROM cache_entries WHERE key = ?", (key,)
            ).fetchone()
        if row is None:
            return None
        tags = tuple(t for t in row[2].split("\n") if t)
        return CacheEntry(key, bytes(row[0]), row[1], tags)

    async def set(self, entry: CacheEntry) -> None:
        self.memory.put(entry)
        overwrite = entry.key in self._on_disk
        self._on_disk.add(entry.key)
        self._writer.append((entry, overwrite))

    async def invalidate_tags(self, tags: Sequence[str]) -> int:
        """Drop the entries tagged with any of ``tags`` here and on disk, and log the
        invalidation so that every other process sharing the file drops them from memory."""
        return await self._drop_tags(tags, log=True)

    async def _drop_tags(self, tags: Sequence[str] | None, *, log: bool) -> int:
        self._invalidating += 1
        self._invalidated += 1
        try:
            if tags is None:
                return self.memory.clear()
            dropped = self.memory.drop_tags(tags)
            keys, line = await asyncio.to_thread(self._drop_tags_on_disk, list(tags), log)
            self._on_disk.difference_update(keys)
            if line is not None:
                self._own.add(line)
                self.logged = line
        finally:
            self._invalidating -= 1
        return max(dropped, len(keys))

    def _drop_tags_on_disk(
        self, tags: list[str], log: bool
    ) -> tuple[builtins.set[str], int | None]:
        """The keys deleted, and the log line written (when ``log``)."""
        self.flush()
        with self._lock:
            if log:
                return shared.invalidate(self._conn, tags)
            return shared.delete_tagged(self._conn, tags), None

    # ---- following invalidations made by other processes (InvalidationFeed)

    async def invalidations(self) -> list[tuple[str, ...]] | None:
        """The tags other processes invalidated since the last call; None when some could not
        be told (the log was pruned meanwhile): then everything in memory must go."""
        found, written = await asyncio.to_thread(self._pending)
        self._learn(written)
        if found.lines:
            self._applied = found.lines[-1][0]
        own = self._own
        self._own = {line for line in own if line > self._applied}
        if found.missed:
            return None
        return [tags for line, tags in found.lines if line not in own]

    def _pending(self) -> tuple[shared.Pending, list[tuple[int, str]]]:
        """The invalidations logged since the last line applied, and the entries written to
        the file since the last call (by the other processes sharing it, mostly)."""
        with self._lock:
            return shared.pending(self._conn, self._applied), self._conn.execute(
                "SELECT rowid, key FROM cache_entries WHERE rowid > ? ORDER BY rowid",
                (self._seen_rowid,)).fetchall()

    def _learn(self, written: Iterable[tuple[int, str]]) -> None:
        """Know these rows to be on disk, so that a lookup of their keys reads them."""
        for rowid, key in written:
            self._on_disk.add(key)
            self._seen_rowid = rowid

    async def forget_tags(self, tags: Sequence[str] | None) -> None:
        """Apply another process's invalidation: drop the entries tagged with any of ``tags``
        (None: every entry) from memory, and from disk those written here meanwhile."""
        await self._drop_tags(tags, log=False)

    async def applied(self) -> None:
        """Tell the other processes how far this one has applied the log; at least every
        :data:`~skinflint.storage.invalidations.HEARTBEAT_SECONDS`, to show it runs."""
        now = time.monotonic()
        if self._applied == self._reported and now - self._reported_at < (
            shared.HEARTBEAT_SECONDS
        ):
            return
        await asyncio.to_thread(self._report, self._applied)
        self._reported, self._reported_at = self._applied, now

    def _report(self, applied: int) -> None:
        with self._lock:
            if self._reported is None:
                shared.register(self._conn, self._gateway, applied)
            else:
                shared.report_applied(self._conn, self._gateway, applied)

    async def gateways(self) -> list[shared.GatewayRow]:
        """The gateways running on this file, with the last log line each has applied: those
        behind :attr:`logged` still hold entries this store invalidated."""
        return await asyncio.to_thread(self._live)

    def _live(self) -> list[shared.GatewayRow]:
        with self._lock:
            return shared.live_gateways(self._conn)

    def _delete(self, keys: builtins.set[str]) -> None:
        for key in keys:
            self._conn.execute("DELETE FROM cache_entries WHERE key = ?", (key,))
            self._conn.execute("DELETE FROM cache_tags WHERE key = ?", (key,))

    async def stats(self) -> dict[str, int]:
        mem = await self.memory.stats()
        return {
            "entries": len(self._on_disk),
            "memory_entries": mem["entries"],
            "evictions": mem["evictions"],
            "disk_reads": self.disk_reads,
        }

    def flush(self) -> None:
        """Write pending entries now (blocking)."""
        self._writer.flush()

    def _write_locked(self, batch: list[tuple[CacheEntry, bool]]) -> None:
        with self._lock, self._conn:
            self._write(batch)

    def _write(self, writes: list[tuple[CacheEntry, bool]]) -> None:
        """``writes``: (entry, whether it overwrites one already stored)."""
        latest = {e.key: (e, overwrite) for e, overwrite in writes}  # the last write of a key wins
        batch = [e for e, _ in latest.values()]
        now = time.time()
        self._conn.executemany(
            "INSERT OR REPLACE INTO cache_entries VALUES (?, ?, ?, ?, ?)",
            [(e.key, e.value, e.expires_at, "\n".join(e.tags), now) for e in batch])
        # an overwritten entry keeps none of its old tags
        overwritten = [(key,) for key, (_, overwrite) in latest.items() if overwrite]
        if overwritten:
            self._conn.executemany("DELETE FROM cache_tags WHERE key = ?", overwritten)
        tagged = [(t, e.key) for e in batch for t in e.tags]
        if tagged:
            self._conn.executemany("INSERT OR IGNORE INTO cache_tags VALUES (?, ?)", tagged)
        excess = len(self._on_disk) - self.max_entries
        if excess > 0:
            old = {r[0] for r in self._conn.execute(
                "SELECT key FROM cache_entries ORDER BY written_at, rowid LIMIT ?", (excess,))}
            self._delete(old)
            self._on_disk.difference_update(old)

    async def close(self) -> None:
        await asyncio.to_thread(self._writer.close)
        await asyncio.to_thread(self._unregister)

    def _unregister(self) -> None:
        """Leave the list of live gateways. When the file is locked, the entry is left to
        expire (a gateway not heard from is no longer waited for)."""
        with self._lock:  # a poll may still be running in a worker thread
            try:
                shared.unregister(self._conn, self._gateway)
            except sqlite3.Error as exc:
                log.warning("cache: could not leave the list of live gateways: %s", exc)
            finally:
                self._conn.close()
