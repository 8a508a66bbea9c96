"""The persistent side of the semantic index: each entry's partition, question text and vector,
in SQLite next to the exact cache, so the in-process index is rebuilt at start."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from skinflint.storage.ledger import open_sqlite
from skinflint.storage.writer import BatchWriter

__all__ = ["SemanticRow", "SemanticStore"]

_SCHEMA = ("CREATE TABLE IF NOT EXISTS semantic_entries (key TEXT PRIMARY KEY, space TEXT NOT NULL,"
           " partition TEXT NOT NULL, text TEXT NOT NULL, vector BLOB NOT NULL)")


@dataclass(frozen=True, slots=True)
class SemanticRow:
    key: str  # the exact-cache key of the stored answer
    partition: str
    text: str
    vector: npt.NDArray[np.float32]


class SemanticStore:
    """Rows per vector space (embedder name): vectors of different embedders never mix."""

    def __init__(self, path: str, space: str, *, flush_interval: float = 0.2) -> None:
        self.space = space
        self._conn = open_sqlite(path)
        self._conn.execute(_SCHEMA)
        self._lock = threading.Lock()
        self._writer: BatchWriter[tuple[str, SemanticRow | None]] = BatchWriter(
            self._write, interval=flush_interval, name="semantic")

    def rows(self) -> Iterator[SemanticRow]:
        with self._lock:
            found = self._conn.execute(
                "SELECT key, partition, text, vector FROM semantic_entries WHERE space = ?",
                (self.space,)).fetchall()
        for key, partition, text, blob in found:
            yield SemanticRow(key, partition, text, np.frombuffer(blob, dtype=np.float32))

    def add(self, row: SemanticRow) -> None:
        self._writer.append((row.key, row))

    def remove(self, key: str) -> None:
        self._writer.append((key, None))

    def _write(self, batch: list[tuple[str, SemanticRow | None]]) -> None:
        with self._lock, self._conn:
            for key, row in batch:
                if row is None:
                    self._conn.execute("DELETE FROM semantic_entries WHERE key = ?", (key,))
                else:
                    self._conn.execute(
                        "INSERT OR REPLACE INTO semantic_entries VALUES (?, ?, ?, ?, ?)",
                        (key, self.space, row.partition, row.text,
                         row.vector.astype(np.float32).tobytes()))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
        self._conn.close()
