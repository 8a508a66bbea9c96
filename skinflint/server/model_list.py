"""``GET /v1/models``: the names the gateway answers to.

Those are the configured aliases and routes, then, when unknown names pass through to a
default provider, the models that provider offers. Its list is fetched with the provider's
pooled client at most once a minute per process, by one request however many clients ask at
once. When it cannot be fetched, the last list fetched is served, else the configured names
alone; with neither, the client gets a 502: an empty list would say the upstream offers
nothing, and the upstream's own status (a 401 for the gateway's upstream key, say) would read
as a fault of the client's request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from skinflint.config import Settings
from skinflint.errors import UpstreamError
from skinflint.interfaces import Provider

__all__ = ["ModelList"]

log = logging.getLogger("skinflint.server")

JSON = dict[str, Any]
TTL_SECONDS = 60.0
RETRY_SECONDS = 5.0  # after a failure, the fallback is served this long before asking again
TIMEOUT_SECONDS = 10.0  # a list is small: a provider slower than this is treated as down


def _configured(settings: Settings) -> list[JSON]:
    owners = {n: m.provider for n, m in settings.models.items()}
    owners.update({n: "skinflint-route" for n in settings.routes})
    return [{"id": n, "object": "model", "created": 0, "owned_by": p} for n, p in owners.items()]


def _retrieve(done: asyncio.Future[list[JSON]]) -> None:
    """Mark the outcome seen: the fetch's failure was logged, whether anyone awaited it."""
    if not done.cancelled():
        done.exception()


class ModelList:
    """The model list of one gateway process. ``clock`` is injectable for tests."""

    def __init__(
        self,
        settings: Settings,
        providers: Mapping[str, Provider],
        *,
        ttl: float = TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._configured = _configured(settings)
        self._names = frozenset(m["id"] for m in self._configured)
        name = settings.default_provider
        self._provider = providers.get(name) if name else None
        self._timeout = (
            min(settings.providers[name].timeout, TIMEOUT_SECONDS) if name else TIMEOUT_SECONDS
        )
        self._ttl, self._clock = ttl, clock
        self._fetched: list[JSON] | None = None
        self._fresh_until = self._retry_at = -math.inf
        self._error: UpstreamError | None = None
        self._fetching: asyncio.Future[list[JSON]] | None = None

    async def data(self) -> list[JSON]:
        """The configured names, then the upstream's others; raises :class:`UpstreamError`
        only when the upstream's list is unavailable and nothing else is known."""
        upstream = await self._upstream()
        return [*self._configured, *(m for m in upstream if m["id"] not in self._names)]

    async def _upstream(self) -> list[JSON]:
        if self._provider is None:
            return []
        now = self._clock()
        if self._fetched is not None and now < self._fresh_until:
            return self._fetched
        if now >= self._retry_at:
            if self._fetching is None:
                self._fetching = asyncio.ensure_future(self._fetch(self._provider))
                self._fetching.add_done_callback(_retrieve)
            try:  # shielded: a client that leaves does not cancel the others' answer
                return await asyncio.shield(self._fetching)
            except UpstreamError:
                pass
        return self._fallback()

    def _fallback(self) -> list[JSON]:
        if self._fetched is not None or self._configured:
            return self._fetched or []
        assert self._error is not None
        raise UpstreamError(
            f"cannot list the upstream's models: {self._error.message}",
            provider=self._error.provider,
            code="upstream_models_unavailable",
        )

    async def _fetch(self, provider: Provider) -> list[JSON]:
        try:
            found = await provider.list_models(self._timeout)
        except UpstreamError as exc:
            log.warning("model list from %s unavailable: %s", provider.name, exc.message)
            self._error, self._retry_at = exc, self._clock() + RETRY_SECONDS
            raise
        finally:
            self._fetching = None
        self._fetched, self._fresh_until = found, self._clock() + self._ttl
        return found
