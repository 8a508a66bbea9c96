"""The embedded semantic index: exact search in process (numpy), persisted in SQLite next to the
exact cache so the index is rebuilt at start. Capacity is bounded with least-recently-used
eviction. PostgreSQL deployments use :mod:`skinflint.storage.postgres` instead."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import numpy as np

from skinflint.errors import ConfigError
from skinflint.interfaces import Vector
from skinflint.semantic.index import HnswIndex, NumpyIndex, VectorIndex
from skinflint.storage.ledger import open_sqlite
from skinflint.storage.writer import BatchWriter

__all__ = ["EXACT_SEARCH_LIMIT", "LocalSemanticIndex"]

log = logging.getLogger("skinflint.semantic")

T = TypeVar("T")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS semantic_entries (key TEXT PRIMARY KEY, space TEXT NOT NULL,"
    " partition TEXT NOT NULL, text TEXT NOT NULL, vector BLOB NOT NULL)"
)

_Row = tuple[str, str, str, bytes]  # key, partition, text, float32 bytes

#: Exact numpy search stays well inside the lookup budget up to about this many entries per
#: scope. A scan reads every vector (1.5 KB each): 0.4 / 0.8 ms p50 / p99 at 10k entries, 13 / 14
#: ms at 100k, against 0.1 / 0.15 and 0.2 / 0.4 ms for HNSW (bench/semantic_cache.py, 2 cores).
EXACT_SEARCH_LIMIT = 5_000


def _vector_index(dim: int, max_entries: int) -> VectorIndex:
    """Exact search while the index stays small; when it may grow past that and hnswlib is
    installed (``skinflint[ann]``), an index that gives a scope an HNSW graph once the scope
    outgrows the exact scan."""
    if max_entries > EXACT_SEARCH_LIMIT:
        try:
            return HnswIndex(dim, exact_up_to=EXACT_SEARCH_LIMIT)
        except ConfigError:
            log.warning("hnswlib is not installed: exact search over up to %d entries "
                        "(pip install 'skinflint[ann]' for approximate search)", max_entries)
    return NumpyIndex(dim)


class LocalSemanticIndex:
    """Entries of one vector space (embedder name): vectors of different embedders never mix.

    Not thread-safe: used from the event loop. Changes of the vector index run on a worker
    thread of its own, as do searches that would scan a large index or wait for the index's
    lock; other searches run inline. Disk writes go through a write-behind thread."""

    def __init__(
        self,
        path: str,
        space: str,
        dim: int,
        *,
        max_entries: int = 100_000,
        flush_interval: float = 0.2,
    ) -> None:
        self.space = space
        self.max_entries = max_entries
        self._index = _vector_index(dim, max_entries)
        self._texts: OrderedDict[str, str] = OrderedDict()  # key -> question, in LRU order
        self._conn = open_sqlite(path)
        self._conn.execute(_SCHEMA)
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skinflint-semantic")
        self._writer: BatchWriter[tuple[str, _Row | None]] = BatchWriter(
            self._write, interval=flush_interval, name="semantic"
        )
        for key, partition, text, blob in self._conn.execute(
            "SELECT key, partition, text, vector FROM semantic_entries WHERE space = ?", (space,)
        ):
            vector = np.frombuffer(blob, dtype=np.float32)
            if vector.shape == (dim,):
                self._index.add(partition, key, vector)
                self._texts[key] = text

    async def search(self, partition: str, vector: Vector, k: int) -> list[tuple[str, float, str]]:
        # A search takes well under a millisecond, so it runs inline, sparing the hop to the
        # worker thread (0.1-0.6 ms), unless it must scan a large index (no hnswlib) or the
        # graph is busy growing on the worker: then it waits there, not on the event loop.
        found: list[tuple[str, float]] | None = None
        if isinstance(self._index, HnswIndex):
            found = self._index.try_search(partition, vector, k)
        elif self.max_entries <= EXACT_SEARCH_LIMIT:
            found = self._index.search(partition, vector, k)
        if found is None:
            found = await self._in_worker(self._index.search, partition, vector, k)
        return [(key, sim, self._texts.get(key, "")) for key, sim in found]

    async def add(self, partition: str, key: str, text: str, vector: Vector) -> None:
        self._texts[key] = text
        self._texts.move_to_end(key)
        self._writer.append((key, (key, partition, text, vector.astype(np.float32).tobytes())))
        evicted = []
        while len(self._texts) > self.max_entries:
            evicted.append(self._texts.popitem(last=False)[0])
            self._writer.append((evicted[-1], None))
        await self._in_worker(self._change, partition, key, vector, evicted)

    def _change(self, partition: str, key: str, vector: Vector, evicted: list[str]) -> None:
        self._index.add(partition, key, vector)
        for old in evicted:
            self._index.remove(old)

    async def _in_worker(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` on the index's worker thread. One thread runs the calls in the order
        they were made, and a request cancelled meanwhile does not cancel its call, so the
        index always agrees with the key table, which changes on the event loop before."""
        job = asyncio.get_running_loop().run_in_executor(self._worker, partial(call, *args))
        return await asyncio.shield(job)

    async def touch(self, key: str) -> None:
        if key in self._texts:
            self._texts.move_to_end(key)

    async def remove(self, key: str) -> None:
        self._texts.pop(key, None)
        self._writer.append((key, None))
        await self._in_worker(self._index.remove, key)

    async def count(self) -> int:
        return len(self._texts)

    def _write(self, batch: list[tuple[str, _Row | None]]) -> None:
        with self._lock, self._conn:
            for key, row in batch:
                if row is None:
                    self._conn.execute("DELETE FROM semantic_entries WHERE key = ?", (key,))
                else:
                    self._conn.execute(
                        "INSERT OR REPLACE INTO semantic_entries VALUES (?, ?, ?, ?, ?)",
                        (row[0], self.space, row[1], row[2], row[3]),
                    )

    def flush(self) -> None:
        self._writer.flush()

    async def close(self) -> None:
        await asyncio.to_thread(self._worker.shutdown, wait=True)
        self._writer.close()
        self._conn.close()
