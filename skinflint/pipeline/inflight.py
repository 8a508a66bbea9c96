"""Requests in flight, so that identical requests arriving together cost one upstream call.

The first request to miss a key leads it: it goes upstream while identical requests that arrive
meanwhile wait for it, then read what it stored. Waiting is bounded: past the timeout (counted
from when the leader started) waiters go upstream themselves. When the leader fails in a way
that another try may fix, one waiter takes the lead and the others keep waiting for it, so a
failure does not turn into a stampede. Per process: other processes and replicas do not wait
for each other.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

__all__ = ["Flights"]

T = TypeVar("T")


@dataclass(slots=True)
class _Flight:
    leader: object
    expires: float  # monotonic time past which nobody waits for it
    done: asyncio.Event = field(default_factory=asyncio.Event)
    retry: bool = False  # set when it lands: one waiter should try again


class Flights:
    """Keys being answered, each with its leading request. ``timeout`` 0 turns waiting off."""

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self._clock = clock
        self._flights: dict[str, _Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def lead(self, key: str, leader: object) -> bool:
        """Make ``leader`` lead ``key`` unless another live request does; say whether it does."""
        if not self.timeout or self._live(key) is not None:
            return False
        self._flights[key] = _Flight(leader, self._clock() + self.timeout)
        return True

    async def join(
        self, key: str, leader: object, fetch: Callable[[], Awaitable[T | None]]
    ) -> T | None:
        """Wait for the request leading ``key``, then return what ``fetch`` finds. None: the
        caller goes upstream itself, leading ``key`` if nobody else does (nothing was in
        flight, or the leader failed), or alone (the leader's answer was not storable, or the
        wait timed out)."""
        if not self.timeout:
            return None
        deadline = self._clock() + self.timeout
        while (flight := self._live(key)) is not None:
            try:
                async with asyncio.timeout(min(deadline, flight.expires) - self._clock()):
                    await flight.done.wait()
            except TimeoutError:
                return None
            found = await fetch()
            if found is not None or not flight.retry:
                return found
        self._flights[key] = _Flight(leader, self._clock() + self.timeout)
        return None

    def land(self, key: str, leader: object, *, retry: bool) -> None:
        """``leader``'s answer for ``key`` is stored, or known never to be: wake its waiters.
        ``retry``: it failed in a way another try may not, so one waiter takes the lead. A
        request that does not lead ``key`` changes nothing."""
        flight = self._flights.get(key)
        if flight is None or flight.leader is not leader:
            return
        del self._flights[key]
        flight.retry = retry
        flight.done.set()

    def _live(self, key: str) -> _Flight | None:
        """The flight of ``key`` unless there is none or it is past waiting for (a leader
        lost without landing: the next request takes its place)."""
        flight = self._flights.get(key)
        return flight if flight is not None and flight.expires > self._clock() else None
