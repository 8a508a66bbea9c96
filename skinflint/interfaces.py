"""The narrow interfaces between the pipeline and everything that does I/O.

Each concern has one Protocol; implementations live in ``providers/`` and ``storage/`` and
never import each other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from skinflint.models import Completion, LedgerRecord, StreamChunk, UpstreamRequest

__all__ = ["CacheEntry", "CacheStore", "Ledger", "Provider"]


class Provider(Protocol):
    """An upstream LLM API. Raises :class:`skinflint.errors.UpstreamError` subclasses only."""

    name: str

    async def complete(self, request: UpstreamRequest) -> Completion:
        """One non-streaming chat completion, returned in the OpenAI format."""
        ...

    def stream(self, request: UpstreamRequest) -> AsyncIterator[StreamChunk]:
        """A streaming chat completion as OpenAI ``chat.completion.chunk`` objects.

        The last chunk carries ``usage`` whenever the provider reports it."""
        ...

    async def embed(self, request: UpstreamRequest) -> Completion:
        """An embeddings call, returned in the OpenAI format."""
        ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class CacheEntry:
    key: str
    value: bytes
    expires_at: float  # unix seconds; 0 = never
    tags: tuple[str, ...] = ()


class CacheStore(Protocol):
    """Key -> bytes with expiry and tags. Implementations: memory, sqlite (tiered), redis."""

    async def get(self, key: str, now: float) -> bytes | None: ...

    async def set(self, entry: CacheEntry) -> None: ...

    async def invalidate_tags(self, tags: Sequence[str]) -> int:
        """Drop every entry carrying any of ``tags``; returns how many were dropped."""
        ...

    async def stats(self) -> dict[str, int]: ...

    async def close(self) -> None: ...


class Ledger(Protocol):
    """Append-only request ledger. ``record`` never blocks and never raises."""

    def record(self, record: LedgerRecord) -> None: ...

    def flush(self) -> None:
        """Write everything recorded so far (blocking; call off the event loop or at exit)."""
        ...

    def query(self, since: float = 0.0) -> Iterable[LedgerRecord]: ...

    def close(self) -> None: ...
