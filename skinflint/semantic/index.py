"""In-process vector indexes for the semantic cache, partitioned by scope.

A *scope* string (for example ``"tenant:7|model:gpt-4o|feature:faq"``) isolates entries: a search
only ever sees vectors added under the same scope, so one user's or one context's answers are
never served to another. Keys are unique across scopes; adding a key again replaces its vector.

Vectors must be unit length (as :class:`skinflint.embed.Embedder` returns them), so the inner
product is the cosine. :class:`NumpyIndex` searches exactly; :class:`HnswIndex` (``hnswlib``)
searches approximately in logarithmic time, for partitions too big for a linear scan within the
lookup budget. Both are safe to call from several threads.
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from skinflint.errors import ConfigError

__all__ = ["HnswIndex", "NumpyIndex", "VectorIndex"]

log = logging.getLogger("skinflint.semantic")

Vector = npt.NDArray[np.float32]


class VectorIndex(Protocol):
    """Nearest-neighbour search over unit vectors, partitioned by scope."""

    def add(self, scope: str, key: str, vector: Vector) -> None:
        """Store ``vector`` under ``key`` in ``scope``, replacing any earlier entry for ``key``."""
        ...

    def add_many(self, scope: str, keys: list[str], vectors: Vector) -> None:
        """:meth:`add` for each key and row of ``vectors`` (for loading a stored index)."""
        ...

    def search(self, scope: str, vector: Vector, k: int = 1) -> list[tuple[str, float]]:
        """Up to ``k`` ``(key, cosine)`` pairs from ``scope``, best first; [] for an empty scope."""
        ...

    def remove(self, key: str) -> bool:
        """Forget ``key``; False when it was not there."""
        ...

    def __len__(self) -> int:
        """The number of entries, over all scopes."""
        ...


class _Partition:
    """One scope's vectors as rows of a matrix that grows by doubling; removal moves the last
    row into the hole, so rows stay contiguous and a search is one matrix-vector product."""

    def __init__(self, dim: int) -> None:
        self.rows: Vector = np.empty((16, dim), dtype=np.float32)
        self.keys: list[str] = []
        self.where: dict[str, int] = {}

    def add(self, key: str, vector: Vector) -> None:
        n = len(self.keys)
        if n == len(self.rows):
            self.rows = np.concatenate([self.rows, np.empty_like(self.rows)])
        self.rows[n] = vector
        self.keys.append(key)
        self.where[key] = n

    def remove(self, key: str) -> None:
        row = self.where.pop(key)
        last = self.keys.pop()
        if last != key:
            self.rows[row] = self.rows[len(self.keys)]
            self.keys[row] = last
            self.where[last] = row

    def search(self, vector: Vector, k: int) -> list[tuple[str, float]]:
        n = len(self.keys)
        if n == 0 or k <= 0:
            return []
        scores = self.rows[:n] @ vector
        top = np.argpartition(scores, n - k)[n - k:] if k < n else np.arange(n)
        best = top[np.argsort(-scores[top], kind="stable")]
        return [(self.keys[i], float(scores[i])) for i in best]


def _checked(vector: Vector, dim: int) -> Vector:
    out = np.asarray(vector, dtype=np.float32).reshape(-1)
    if out.shape != (dim,):
        raise ValueError(f"expected a vector of {dim} dimensions, got shape {np.shape(vector)}")
    return out


class NumpyIndex:
    """Exact search: a linear scan of the scope's rows (float32, ``4 * dim`` bytes a vector).

    A scan reads the whole partition, so its cost grows with the partition's size: see the
    figures in ``bench/semantic_cache.py`` before letting one scope grow past ~50k vectors.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._parts: dict[str, _Partition] = {}
        self._scope_of: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, scope: str, key: str, vector: Vector) -> None:
        """See :meth:`VectorIndex.add`. Raises ValueError for a vector of the wrong size."""
        row = _checked(vector, self.dim)
        with self._lock:
            self._forget(key)
            self._parts.setdefault(scope, _Partition(self.dim)).add(key, row)
            self._scope_of[key] = scope

    def add_many(self, scope: str, keys: list[str], vectors: Vector) -> None:
        """See :meth:`VectorIndex.add_many`."""
        for key, row in zip(keys, vectors, strict=True):
            self.add(scope, key, row)

    def search(self, scope: str, vector: Vector, k: int = 1) -> list[tuple[str, float]]:
        """See :meth:`VectorIndex.search`."""
        query = _checked(vector, self.dim)
        with self._lock:
            part = self._parts.get(scope)
            return part.search(query, k) if part is not None else []

    def remove(self, key: str) -> bool:
        """See :meth:`VectorIndex.remove`."""
        with self._lock:
            return self._forget(key)

    def __len__(self) -> int:
        return len(self._scope_of)

    def size(self, scope: str) -> int:
        """The number of entries in ``scope``."""
        part = self._parts.get(scope)
        return len(part.keys) if part is not None else 0

    def snapshot(self, scope: str) -> tuple[list[str], Vector]:
        """The keys and a copy of the vectors of ``scope``."""
        with self._lock:
            return self._contents(self._parts.get(scope))

    def pop_scope(self, scope: str) -> tuple[list[str], Vector]:
        """Remove every entry of ``scope`` and return their keys and vectors."""
        with self._lock:
            part = self._parts.pop(scope, None)
            for key in part.keys if part is not None else ():
                del self._scope_of[key]
            return self._contents(part)

    def _contents(self, part: _Partition | None) -> tuple[list[str], Vector]:
        if part is None:
            return [], np.empty((0, self.dim), dtype=np.float32)
        return list(part.keys), part.rows[: len(part.keys)].copy()

    def _forget(self, key: str) -> bool:
        scope = self._scope_of.pop(key, None)
        if scope is None:
            return False
        part = self._parts[scope]
        part.remove(key)
        if not part.keys:
            del self._parts[scope]
        return True


class HnswIndex:
    """Approximate search with ``hnswlib`` for scopes too big to scan (``pip install hnswlib``).

    A scope is scanned exactly, as :class:`NumpyIndex` does, until it holds more than
    ``exact_up_to`` entries; then its vectors move into an HNSW graph of their own. Most scopes
    stay small (a scope is one tenant, model, parameter set and conversation context), and an
    hnswlib graph costs about 2.6 MB however few entries it holds (it allocates 65,536 locks),
    so a graph per scope would make memory grow with the number of scopes, not of entries. A
    graph is dropped when its scope empties. Building a scope's graph inserts thousands of
    vectors (about 0.8 s for 5,000 of 384 dimensions), so with ``background`` it is built on a
    thread of its own while the scope is still scanned, then swapped in with the changes made
    meanwhile; searches and additions never wait for it.

    ``ef`` trades recall for time at query; ``m`` and ``ef_construction`` at insertion. Removed
    entries are marked deleted and their labels reused by later additions. Each graph uses one
    thread. A missed neighbour only costs a cache miss, never a wrong hit. ``ef=32`` found the
    exact nearest of 63,208 Quora questions for all 2,323 of 10,000 queries whose nearest was at
    cosine 0.9 or more (the only ones that can hit), at about half the time of ``ef=64``.
    """

    def __init__(
        self, dim: int, *, exact_up_to: int = 4096, background: bool = True, m: int = 16,
        ef_construction: int = 100, ef: int = 32,
    ) -> None:
        try:
            self._hnswlib: Any = importlib.import_module("hnswlib")
        except ImportError as exc:
            raise ConfigError("hnswlib is not installed: pip install hnswlib") from exc
        self.dim = dim
        self.exact_up_to = exact_up_to
        self.background = background
        self._building: set[str] = set()  # scopes whose graph is being built
        self._m, self._ef_construction, self._ef = m, ef_construction, ef
        self._small = NumpyIndex(dim)  # scopes of up to exact_up_to entries
        self._graphs: dict[str, Any] = {}
        self._labels: dict[str, tuple[str, int]] = {}  # key -> (scope, label), for graph scopes
        self._keys: dict[tuple[str, int], str] = {}
        self._free: dict[str, list[int]] = {}
        self._next: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, scope: str, key: str, vector: Vector) -> None:
        """See :meth:`VectorIndex.add`. Raises ValueError for a vector of the wrong size."""
        self.add_many(scope, [key], _checked(vector, self.dim)[None, :])

    def add_many(self, scope: str, keys: list[str], vectors: Vector) -> None:
        """See :meth:`VectorIndex.add_many`; new keys are inserted in one call to the graph."""
        rows = np.asarray(vectors, dtype=np.float32)
        if rows.size != len(keys) * self.dim:
            raise ValueError(f"expected {len(keys)} vectors of {self.dim} dimensions, got shape "
                             f"{np.shape(vectors)}")
        rows = rows.reshape(len(keys), self.dim)
        latest = dict(zip(keys, range(len(keys)), strict=True))  # a repeated key: its last row
        keys, rows = list(latest), rows[list(latest.values())]
        with self._lock:
            for key in keys:
                self._forget(key)
            if scope in self._graphs:
                self._insert(scope, self._graphs[scope], keys, rows)
                return
            self._small.add_many(scope, keys, rows)
            if self._small.size(scope) <= self.exact_up_to or scope in self._building:
                return
            self._building.add(scope)
            snapshot = self._small.snapshot(scope)  # too big to scan: a graph of its own
        if self.background:
            threading.Thread(target=self._build, args=(scope, *snapshot), daemon=True,
                             name="skinflint-hnsw-build").start()
        else:
            self._build(scope, *snapshot)

    def _build(self, scope: str, keys: list[str], rows: Vector) -> None:
        """Build ``scope``'s graph from a snapshot of its rows without holding the lock, then
        swap it in with what changed in the scope meanwhile."""
        try:
            graph = self._new_graph(len(keys))
            graph.add_items(rows, np.arange(len(keys)))
        except Exception:  # out of memory, say: the scope stays scanned exactly
            log.exception("building the HNSW graph of a scope of %d entries failed", len(keys))
            with self._lock:
                self._building.discard(scope)
            return
        with self._lock:
            self._building.discard(scope)
            now_keys, now_rows = self._small.pop_scope(scope)
            if not now_keys:
                return  # emptied meanwhile
            self._graphs[scope], self._free[scope], self._next[scope] = graph, [], len(keys)
            now = dict(zip(now_keys, range(len(now_keys)), strict=True))
            for label, key in enumerate(keys):
                row = now.pop(key, None)
                if row is None:  # removed meanwhile
                    graph.mark_deleted(label)
                    self._free[scope].append(label)
                    continue
                if not np.array_equal(now_rows[row], rows[label]):  # replaced meanwhile
                    graph.add_items(now_rows[row][None, :], np.asarray([label]))
                self._labels[key] = (scope, label)
                self._keys[scope, label] = key
            added = list(now)  # added meanwhile
            self._insert(scope, graph, added, now_rows[[now[k] for k in added]])

    def _insert(self, scope: str, graph: Any, keys: list[str], rows: Vector) -> None:
        if not keys:
            return
        free = self._free[scope]
        labels = [free.pop() if free else self._take_label(scope, graph) for _ in keys]
        # Re-adding a label that was marked deleted revives it with the new vector.
        graph.add_items(rows, np.asarray(labels))
        for key, label in zip(keys, labels, strict=True):
            self._labels[key] = (scope, label)
            self._keys[scope, label] = key

    def search(self, scope: str, vector: Vector, k: int = 1) -> list[tuple[str, float]]:
        """See :meth:`VectorIndex.search`."""
        query = _checked(vector, self.dim)
        with self._lock:
            return self._search(scope, query, k)

    def try_search(self, scope: str, vector: Vector, k: int = 1) -> list[tuple[str, float]] | None:
        """:meth:`search`, or None at once when another thread holds the index (a graph
        growing copies itself, which takes milliseconds at 100k entries)."""
        query = _checked(vector, self.dim)
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self._search(scope, query, k)
        finally:
            self._lock.release()

    def _search(self, scope: str, query: Vector, k: int) -> list[tuple[str, float]]:
        graph = self._graphs.get(scope)
        if graph is None:
            return self._small.search(scope, query, k)
        live = graph.get_current_count() - len(self._free[scope])
        if live <= 0 or k <= 0:
            return []
        k = min(k, live)
        graph.set_ef(max(self._ef, k))
        labels, distances = graph.knn_query(query[None, :], k=k)
        return [
            (self._keys[scope, int(label)], 1.0 - float(dist))
            for label, dist in zip(labels[0], distances[0], strict=True)
        ]

    def remove(self, key: str) -> bool:
        """See :meth:`VectorIndex.remove`."""
        with self._lock:
            return self._forget(key)

    def __len__(self) -> int:
        with self._lock:  # never half way through a graph being swapped in
            return len(self._labels) + len(self._small)

    def graphs(self) -> int:
        """How many scopes have an HNSW graph (the others are scanned)."""
        with self._lock:
            return len(self._graphs)

    def _new_graph(self, entries: int) -> Any:
        graph = self._hnswlib.Index(space="ip", dim=self.dim)
        graph.init_index(max_elements=max(1024, 2 * entries),
                         ef_construction=self._ef_construction, M=self._m)
        graph.set_ef(self._ef)
        graph.set_num_threads(1)
        return graph

    def _take_label(self, scope: str, graph: Any) -> int:
        label = self._next[scope]
        self._next[scope] = label + 1
        if label >= graph.get_max_elements():
            graph.resize_index(2 * graph.get_max_elements())
        return label

    def _forget(self, key: str) -> bool:
        found = self._labels.pop(key, None)
        if found is None:
            return self._small.remove(key)
        scope, label = found
        del self._keys[scope, label]
        graph, free = self._graphs[scope], self._free[scope]
        free.append(label)
        if len(free) == self._next[scope]:  # every label is free: the scope is empty
            del self._graphs[scope], self._free[scope], self._next[scope]
        else:
            graph.mark_deleted(label)
        return True
