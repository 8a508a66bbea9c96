"""The embedded semantic index: partitions, least-recently-used eviction, persistence."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from skinflint.interfaces import Vector
from skinflint.semantic.index import NumpyIndex
from skinflint.storage.semantic import EXACT_SEARCH_LIMIT, LocalSemanticIndex


def _unit(*values: float) -> np.ndarray:  # type: ignore[type-arg]
    v = np.asarray(values, dtype=np.float32)
    return v / np.linalg.norm(v)


async def test_partitions_eviction_and_reload(tmp_path: Path) -> None:
    db = str(tmp_path / "s.db")
    index = LocalSemanticIndex(db, "space-a", 3, max_entries=2, flush_interval=0.01)
    await index.add("p1", "k1", "first question", _unit(1, 0, 0))
    await index.add("p1", "k2", "second question", _unit(0, 1, 0))
    assert await index.search("p2", _unit(1, 0, 0), 3) == []  # another partition sees nothing
    await index.touch("k1")  # k2 is now the least recently used
    await index.add("p1", "k3", "third question", _unit(0, 0, 1))
    assert await index.count() == 2
    found = await index.search("p1", _unit(1, 0.1, 0), 3)
    assert [k for k, _, _ in found] == ["k1", "k3"]
    assert found[0][2] == "first question" and found[0][1] > 0.99
    await index.close()
    again = LocalSemanticIndex(db, "space-a", 3, max_entries=2)
    assert {k for k, _, _ in await again.search("p1", _unit(1, 0, 0), 3)} == {"k1", "k3"}
    other_space = LocalSemanticIndex(db, "space-b", 3)
    assert await other_space.count() == 0  # vectors of another embedder never mix
    await again.close()
    await other_space.close()


class _ThreadRecorder(NumpyIndex):
    """The real exact index, noting the thread each call runs on."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.threads: set[int] = set()

    def add(self, scope: str, key: str, vector: Vector) -> None:
        self.threads.add(threading.get_ident())
        super().add(scope, key, vector)

    def search(self, scope: str, vector: Vector, k: int = 1) -> list[tuple[str, float]]:
        self.threads.add(threading.get_ident())
        return super().search(scope, vector, k)

    def remove(self, key: str) -> bool:
        self.threads.add(threading.get_ident())
        return super().remove(key)


async def test_slow_index_work_stays_off_the_event_loop(tmp_path: Path) -> None:
    """Changes may move a scope into an HNSW graph, and an exact index big enough to need one
    (hnswlib missing) takes milliseconds to scan: neither may run on the event loop's thread."""
    index = LocalSemanticIndex(str(tmp_path / "s.db"), "space", 3,
                               max_entries=EXACT_SEARCH_LIMIT + 1)
    recorder = _ThreadRecorder(3)
    index._index = recorder
    await index.add("p", "k1", "q1", _unit(1, 0, 0))
    await index.add("p", "k2", "q2", _unit(0, 1, 0))
    await index.remove("k1")
    assert [k for k, _, _ in await index.search("p", _unit(0, 1, 0), 2)] == ["k2"]
    assert recorder.threads and threading.get_ident() not in recorder.threads
    await index.close()
