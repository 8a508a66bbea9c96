"""A circuit breaker for the shared stores' reads and writes.

A shared cache (Redis, PostgreSQL) saves money; it must not slow every request when it fails.
Each store bounds one operation by a timeout, and :class:`Breaker` bounds how often that timeout
is paid: after ``limit`` failures in a row the store stops calling the server for ``cooldown``
seconds, then lets one call through to probe it, and a success resumes normal service.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

__all__ = ["Breaker"]

log = logging.getLogger("skinflint.storage")


class Breaker:
    """Counts failures in a row of calls to one server named ``server``; ``errors`` are the
    exceptions that count (and that :meth:`guard` logs instead of raising)."""

    def __init__(
        self, server: str, errors: tuple[type[Exception], ...], *, limit: int = 3,
        cooldown: float = 5.0, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._server, self._errors = server, errors
        self._limit, self._cooldown, self._clock = limit, cooldown, clock
        self._failures = 0
        self._closed_until = 0.0  # clock time before which no call is let through

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
