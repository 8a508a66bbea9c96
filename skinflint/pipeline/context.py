"""Per-request state and the stage interface."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from skinflint.models import CacheBypass, StreamChunk, Usage

__all__ = ["Attempt", "Next", "Reply", "RequestContext", "Stage", "Target"]

JSON = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Target:
    """A concrete model on a concrete provider, as the route stage resolved it."""

    name: str  # the alias or model name the client (or router) chose
    provider: str
    provider_model: str


@dataclass(slots=True)
class Attempt:
    """A cascade tier that was called and did not answer the request (escalated or failed).
    Its cost counts: the account stage writes a ledger row for it."""

    tier: int
    target: Target
    usage: Usage | None
    upstream_ms: float
    status: int = 200
    error_type: str = ""
    reason: str = ""  # why the gate escalated


@dataclass(slots=True)
class Reply:
    """What a stage returns: a complete body, or a stream of chunks (exactly one is set)."""

    body: JSON | None = None
    raw: bytes | None = None
    chunks: AsyncIterator[StreamChunk] | None = None
    status: int = 200


@dataclass(slots=True)
class RequestContext:
    """Everything one request accumulates on its way through the pipeline."""

    request_id: str
    ts: float
    started: float  # perf_counter at arrival
    endpoint: str  # "chat" | "embeddings"
    raw_body: bytes
    headers: dict[str, str]
    body: JSON = field(default_factory=dict)
    stream: bool = False
    client_wants_usage: bool = False
    tenant: str = "default"
    feature: str = ""
    user: str = ""
    tags: tuple[str, ...] = ()
    cache_mode: str = "default"  # default | bypass | refresh
    task: str = ""
    requested_model: str = ""
    request_hash: str = ""
    cache_key: str = ""
    cache_status: str = "miss"
    cache_reason: CacheBypass | None = None  # why cache_status is "bypass"
    cache_writable: bool = False
    cache_ttl: float = 0.0
    cache_epoch: int = 0  # the exact cache's invalidation count when the request looked it up
    semantic: tuple[str, str, Any] | None = None  # (partition, question, embedding) once computed
    similarity: float | None = None
    targets: tuple[Target, ...] = ()
    route: str = ""
    attempts: list[Attempt] = field(default_factory=list)
    baseline_model: str = ""
    answered: Target | None = None  # the target whose provider answered
    model: str = ""
    provider: str = ""
    usage: Usage | None = None
    cost_usd: float | None = None
    baseline_cost_usd: float | None = None
    saved_usd: float | None = None
    upstream_ms: float = 0.0
    status: int = 200
    error_type: str = ""
    errors: list[Exception] = field(default_factory=list)


Next = Callable[[RequestContext], Awaitable[Reply]]


class Stage(Protocol):
    """One step of the pipeline. ``enabled`` False means the slot is empty and is skipped."""

    name: str
    enabled: bool

    async def __call__(self, ctx: RequestContext, next: Next) -> Reply: ...
