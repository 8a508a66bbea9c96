"""Cache stores: an in-process LRU, and a tiered store (LRU in front of SQLite).

The tiered store keeps the set of keys present on disk in memory, so a miss costs no I/O at all;
disk reads (LRU misses of known keys) run in a worker thread and writes are batched by a writer
thread, so the event loop never touches the disk.
"""

from __future__ import annotations

import asyncio
import builtins
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

from skinflint.interfaces import CacheEntry
from skinflint.storage.ledger import open_sqlite
from skinflint.storage.writer import BatchWriter

__all__ = ["MemoryCacheStore", "TieredCacheStore"]



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

    async def stats(self) -> dict[str, int]:
        return {"entries": len(self._entries), "bytes": self.bytes, "evictions": self.evictions}

    async def close(self) -> None:
        self._entries.clear()
        self._by_tag.clear()


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
        self._on_disk: set[str] = {
            row[0] for row in self._conn.execute("SELECT key FROM cache_entries")
        }
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
        self._invalidating += 1
        self._invalidated += 1
        try:
            dropped = self.memory.drop_tags(tags)
            keys = await asyncio.to_thread(self._drop_tags_on_disk, list(tags))
            self._on_disk.difference_update(keys)
        finally:
            self._invalidating -= 1
        return max(dropped, len(keys))

    def _drop_tags_on_disk(self, tags: list[str]) -> builtins.set[str]:
        self.flush()
        marks = ", ".join("?" for _ in tags)
        with self._lock, self._conn:
            keys = {
                r[0]
                for r in self._conn.execute(
                    f"SELECT key FROM cache_tags WHERE tag IN ({marks})", tags
                )
            }
            self._delete(keys)
        return keys

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
        self._conn.close()
