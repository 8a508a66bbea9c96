"""A circuit breaker for the shared stores' reads and writes.

A shared cache (Redis, PostgreSQL) saves money; it must not slow every request when it fails.
Each operation is bounded in time, and :class:`Breaker` bounds how often that time is paid:
after ``limit`` failures in a row the store stops calling the server for ``cooldown`` seconds,
then lets one call through to probe it, and a success resumes normal service.

A store whose client bounds each call itself (Redis's socket timeout) wraps it in
:meth:`Breaker.guard`. One whose client can wait forever on a server that stopped answering (a
PostgreSQL backend that hangs, a network partition that drops packets silently) runs it through
:meth:`Breaker.call`, which gives up after ``deadline`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

__all__ = ["Breaker"]

log = logging.getLogger("skinflint.storage")

T = TypeVar("T")


class Breaker:
    """Counts failures in a row of calls to one server named ``server``; ``errors`` are the
    exceptions that count (and that :meth:`guard` logs instead of raising)."""

    def __init__(
        self, server: str, errors: tuple[type[Exception], ...], *, limit: int = 3,
        cooldown: float = 5.0, deadline: float = 5.0, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._server = server
        self._errors: tuple[type[Exception], ...] = (*errors, TimeoutError)
        self._limit, self._cooldown, self._deadline, self._clock = limit, cooldown, deadline, clock
        self._failures = 0
        self._closed_until = 0.0  # clock time before which no call is let through
        self._abandoned: set[asyncio.Task[object]] = set()

    def allows(self) -> bool:
        """Whether to call the server now (False while it is skipped)."""
        if self._failures < self._limit:
            return True
        now = self._clock()
        if now < self._closed_until:
            return False
        self._closed_until = now + self._cooldown  # this call is the probe
        return True

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Record the outcome of one call; a failure is logged as a miss, not raised."""
        try:
            yield
        except self._errors as exc:
            self._failures += 1
            log.warning("%s %s failed, treated as a miss: %s", self._server, what, exc)
            if self._failures >= self._limit:
                self._closed_until = self._clock() + self._cooldown
                if self._failures == self._limit:
                    log.warning("%s failed %d times in a row: the cache skips it, probing "
                                "every %.0f s", self._server, self._limit, self._cooldown)
        else:
            if self._failures >= self._limit:
                log.warning("%s answers again: the cache uses it", self._server)
            self._failures = 0

    async def call(self, what: str, operation: Callable[[], Awaitable[T]], default: T) -> T:
        """``operation()``'s result; ``default`` when the server is skipped, when the operation
        fails, or when it has no answer within ``deadline`` seconds.

        The operation runs as its own task, and one that misses the deadline is cancelled
        without waiting for it: a driver may take seconds to cancel a query on a server that
        no longer answers (psycopg tries for up to ten), and the request must not wait for that.
        """
        if not self.allows():
            return default
        task: asyncio.Task[T] = asyncio.ensure_future(operation())
        try:
            await asyncio.wait((task,), timeout=self._deadline)
        except asyncio.CancelledError:
            task.cancel()
            raise
        with self.guard(what):
            if not task.done():
                self._abandon(task)
                raise TimeoutError(f"no answer within {self._deadline:g} s")
            return task.result()
        return default

    def _abandon(self, task: asyncio.Task[T]) -> None:
        task.cancel()
        self._abandoned.add(task)  # a reference until it ends, so it is not collected midway
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[object]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.debug("%s: an abandoned call ended with %r", self._server, exc)
