"""Write-behind batching shared by the embedded stores: callers append without waiting, and one
thread hands everything pending to ``write`` every ``interval`` seconds, in one call."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["BatchWriter"]

log = logging.getLogger("skinflint.storage")

T = TypeVar("T")


class BatchWriter(Generic[T]):
    def __init__(self, write: Callable[[list[T]], None], *, interval: float, name: str) -> None:
        self._write = write
        self._pending: deque[T] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._interval = interval
        self._name = name
        self._thread = threading.Thread(target=self._run, name=f"skinflint-{name}", daemon=True)
        self._thread.start()

    def append(self, item: T) -> None:
        """Never blocks: a deque append is atomic."""
        self._pending.append(item)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

    def flush(self) -> bool:
        """Write everything pending now (blocking); False when nothing was pending."""
        with self._lock:
            batch: list[T] = []
            while self._pending:
                batch.append(self._pending.popleft())
            if not batch:
                return False
            try:
                self._write(batch)
            except Exception:  # the writer must survive a bad batch; it logs what it lost
                log.exception("%s: failed to write %d items", self._name, len(batch))
            return True

    def close(self) -> bool:
        """Stop the thread and write what is left; False when nothing was left."""
        self._stop.set()
        self._thread.join(timeout=5)
        return self.flush()
