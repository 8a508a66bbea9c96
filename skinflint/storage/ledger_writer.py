"""The ledger's write-behind writer. Like :class:`~skinflint.storage.writer.BatchWriter` (which
the caches use, and which drops a batch it cannot write: a lost cache entry costs one upstream
call), callers append without waiting and one thread writes what is pending every ``interval``
seconds, in one transaction. Unlike it, a batch the database refuses (another process holds it
locked past its busy timeout, the disk is full or read-only) is never dropped:

* it is held, in order, and tried again, first after ``retry[0]`` seconds, then after twice as
  long each time up to ``retry[1]``, even when no new record arrives;
* past ``max_held`` records, everything held is saved to the spill file
  (:class:`~skinflint.storage.spill.LedgerSpill`), and loaded and written first when the
  database takes writes again; records that were spilled by an earlier process are written
  when the writer starts, before the gateway serves. With no spill file (library use), the
  oldest records beyond ``max_held`` are dropped, and logged;
* ``close`` tries once more, then saves what is left to the spill file. Only when that file
  cannot be written either (the same full disk) are records lost, and the count is logged.

What a killed process (SIGKILL) held in memory is lost: at most ``interval`` seconds of records
while the database takes writes, up to ``max_held`` while it does not.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager

from skinflint.models import LedgerRecord
from skinflint.storage.spill import LedgerSpill

__all__ = ["LedgerWriter", "Transaction"]

log = logging.getLogger("skinflint.storage")

_REPEAT_ERROR = 60.0  # seconds between two logs of the same failure to save

Insert = Callable[[list[LedgerRecord]], None]
# Opens a write transaction (waiting for the database's lock), yields the insert function, and
# commits on leaving; raises when any of it fails, having written nothing.
Transaction = Callable[[], AbstractContextManager[Insert]]


class LedgerWriter:
    def __init__(
        self, transaction: Transaction, *, interval: float, spill: LedgerSpill | None = None,
        max_held: int = 100_000, retry: tuple[float, float] = (0.5, 5.0),
        close_timeout: float = 15.0, name: str = "ledger",
    ) -> None:
        self._transaction = transaction
        self._spill = spill
        self.max_held = max_held
        self._retry = retry
        self._close_timeout = close_timeout
        self._name = name
        self._interval = interval
        self._pending: deque[LedgerRecord] = deque()
        self._held: list[LedgerRecord] = []  # oldest first; newer than what is spilled
        self._spilled = spill is not None  # records may wait in the spill file
        self._failures = 0
        self._failing_since = 0.0
        self._retry_at = 0.0
        self._save_failed_at = -_REPEAT_ERROR
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"skinflint-{name}", daemon=True)

    def start(self) -> None:
        """Write what an earlier process spilled (blocking), then start the writer thread."""
        with self._lock:
            self._attempt()
        self._thread.start()

    def append(self, record: LedgerRecord) -> None:
        """Never blocks: a deque append is atomic."""
        self._pending.append(record)

    @property
    def held(self) -> int:
        """Records taken from callers and not yet written (those spilled to disk excluded)."""
        return len(self._held) + len(self._pending)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush(wait=False)

    def flush(self, *, wait: bool = True) -> None:
        """Write everything pending and held now (blocking). With ``wait=False``, a write that
        failed recently is not tried again before its retry time."""
        with self._lock:
            self._take_pending()
            if not wait and time.monotonic() < self._retry_at:
                return
            self._attempt()

    def close(self) -> None:
        """Stop the thread, try once more, and spill what is still held (see the module)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._close_timeout)
        if not self._lock.acquire(timeout=self._close_timeout):  # a write that never returns
            log.error("%s: a write did not return; %d records are lost", self._name, self.held)
            return
        try:
            self._take_pending()
            self._attempt()
            if self._held:
                self._save_held()
            if self._held:
                log.error("%s: %d records could not be written or saved and are lost",
                          self._name, len(self._held))
        finally:
            self._lock.release()

    def _take_pending(self) -> None:
        while self._pending:
            self._held.append(self._pending.popleft())

    def _attempt(self) -> None:
        """Write the spilled records, then the held ones, in one transaction; on failure, hold
        them all (in memory up to ``max_held``, else in the spill file)."""
        if not self._held and not self._spilled:
            return
        rows = self._held
        try:
            with self._transaction() as insert:
                if self._spill is not None and self._spilled:
                    rows = self._spill.load() + rows  # older than anything held
                    self._spilled = False
                insert(rows)
        except Exception as exc:  # whatever the cause, the records are kept: logged, retried
            self._held = rows
            self._failed(exc)
        else:
            self._held = []
            if self._spill is not None:
                self._spill.written()
            self._recovered(len(rows))

    def _failed(self, exc: Exception) -> None:
        now = time.monotonic()
        if not self._failures:
            self._failing_since = now
            log.warning("%s: the database takes no writes (%s); %d records are held and "
                        "written when it does", self._name, exc, len(self._held))
        delay = min(self._retry[0] * 2 ** min(self._failures, 30), self._retry[1])
        self._failures += 1
        self._retry_at = now + delay
        if len(self._held) > self.max_held:
            self._save_held()

    def _recovered(self, written: int) -> None:
        if self._failures:
            log.warning("%s: the database takes writes again; %d held records written after "
                        "%.1f s", self._name, written, time.monotonic() - self._failing_since)
        self._failures = 0
        self._retry_at = 0.0

    def _save_held(self) -> None:
        """Move everything held to the spill file; when it cannot be written, keep holding.
        With no spill file, keep the newest ``max_held`` records and drop the others."""
        if self._spill is None:
            lost = len(self._held) - self.max_held
            if lost > 0:
                del self._held[:lost]
                log.error("%s: dropped the %d oldest held records (no spill file)",
                          self._name, lost)
            return
        try:
            self._spill.save(self._held)
        except OSError as exc:
            now = time.monotonic()
            if now - self._save_failed_at >= _REPEAT_ERROR:  # not at every retry
                self._save_failed_at = now
                log.error("%s: %d records stay in memory: the spill file %s cannot be written "
                          "(%s)", self._name, len(self._held), self._spill.path, exc)
            return
        self._held = []
        self._spilled = True
        self._save_failed_at = -_REPEAT_ERROR
