"""Pure data passed between layers. No I/O here.

Request and response bodies stay plain dicts in the OpenAI wire format: parsing them into
objects on every request costs more than the whole hot-path budget, and the gateway must pass
through fields it does not know.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, TypedDict

__all__ = [
    "ATTEMPT_STRATEGIES",
    "CASCADE_ATTEMPT",
    "CLIENT_LEFT",
    "COMPRESS_CALL",
    "RETRIED_ATTEMPT",
    "SHADOW_CALL",
    "BatchLine",
    "BatchOutcome",
    "BatchStatus",
    "CacheBypass",
    "Completion",
    "LedgerRecord",
    "StreamChunk",
    "TokenColumns",
    "UpstreamRequest",
    "Usage",
    "is_attempt",
]

JSON = dict[str, Any]


class CacheBypass(StrEnum):
    """Why a request was neither answered from the cache nor stored in it: the
    ``x-skinflint-cache-reason`` response header, the ledger's ``cache_reason`` column and the
    ``reason`` label of ``skinflint_cache_bypassed_total``."""

    CLIENT = "client-bypass"  # the request said x-skinflint-cache: bypass
    DISABLED = "cache-disabled"  # the configuration turns the cache off for its feature or route
    TEMPERATURE_UNSET = "temperature-unset"  # no temperature: providers then sample at 1
    TEMPERATURE_ABOVE_MAX = "temperature-above-max"  # above cache.exact.max_temperature


@dataclass(slots=True)
class Usage:
    """Tokens of one call, counted as OpenAI counts them: ``input_tokens`` is the whole prompt
    (cache reads, cache writes and audio included) and ``output_tokens`` the whole completion
    (reasoning and audio included); the other counts are parts of those two, which the price
    catalog may price at their own rates."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens read from the provider's prompt cache
    counted: bool = False  # True when we counted tokens ourselves because the provider gave none
    cache_write_tokens: int = 0  # prompt tokens written to the provider's prompt cache
    reasoning_tokens: int = 0  # completion tokens spent thinking, not shown
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0

    @classmethod
    def from_openai(cls, usage: JSON | None) -> Usage | None:
        """Usage from an OpenAI ``usage`` object, read as the price catalog reads one:
        ``prompt_tokens_details.{cached_tokens, cache_write_tokens, audio_tokens}`` and
        ``completion_tokens_details.{reasoning_tokens, audio_tokens}``."""
        if not usage:
            return None
        found = cls(
            input_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
        )
        prompt = usage.get("prompt_tokens_details")
        if isinstance(prompt, dict):
            found.cached_tokens = int(prompt.get("cached_tokens") or 0)
            found.cache_write_tokens = int(prompt.get("cache_write_tokens") or 0)
            found.input_audio_tokens = int(prompt.get("audio_tokens") or 0)
        completion = usage.get("completion_tokens_details")
        if isinstance(completion, dict):
            found.reasoning_tokens = int(completion.get("reasoning_tokens") or 0)
            found.output_audio_tokens = int(completion.get("audio_tokens") or 0)
        return found

    def columns(self) -> TokenColumns:
        """The ledger's token columns (:class:`LedgerRecord`'s fields of the same names)."""
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "input_audio_tokens": self.input_audio_tokens,
            "output_audio_tokens": self.output_audio_tokens,
        }


class TokenColumns(TypedDict):
    """A ledger row's token counts, by :class:`LedgerRecord`'s field names."""

    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    input_audio_tokens: int
    output_audio_tokens: int


@dataclass(slots=True)
class UpstreamRequest:
    """One call to one provider. ``body`` is an OpenAI request body whose ``model`` is already
    the provider's own model name."""

    provider_model: str
    body: JSON
    timeout: float = 600.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Completion:
    """A complete OpenAI-shaped response (``chat.completion`` or embeddings list).

    ``raw`` holds the provider's exact bytes when ``body`` is their unmodified parse, so the
    gateway can relay them without serialising again."""

    body: JSON
    raw: bytes | None = None


@dataclass(slots=True)
class StreamChunk:
    """One ``chat.completion.chunk``; ``raw`` as in :class:`Completion`."""

    data: JSON
    raw: bytes | None = None


#: The ``strategy`` of a ledger row for a cascade tier that was called but whose answer was
#: not returned (escalated or failed): its cost counts, but it is not a client request.
CASCADE_ATTEMPT = "cascade_escalated"

#: The ``strategy`` of a ledger row for an upstream call that failed in a way that may have
#: cost money (a timeout, an answer cut short or unreadable) and was retried or fell back.
RETRIED_ATTEMPT = "retried_attempt"

#: The ``strategy`` of a ledger row for a call the shadow-evaluation guard made after the
#: request was answered (the uncompressed request, or its judge model): its cost counts.
SHADOW_CALL = "shadow"

#: The ``strategy`` of a ledger row for a call the compress stage made to a cheap model: the
#: one-time rewrite of a long system prompt (``request_id`` ``<request>.rewrite``, of the
#: request that first sent it) or the summary of what trimming left out of a request
#: (``<request>.summary.context`` or ``<request>.summary.history``): its cost counts.
COMPRESS_CALL = "compress_call"

#: Every ``strategy`` of a ledger row for an upstream call made on behalf of a request whose
#: answer was not the one returned (a cascade tier escalated from, a call retried): such a
#: row counts cost and tokens, never a client request. A new kind of attempt row joins here,
#: and reports, rollups and the spend API follow.
ATTEMPT_STRATEGIES: tuple[str, ...] = (CASCADE_ATTEMPT, RETRIED_ATTEMPT, SHADOW_CALL,
                                       COMPRESS_CALL)


def is_attempt(strategy: str) -> bool:
    """Whether a ledger row of this ``strategy`` is an attempt, not a client request."""
    return strategy in ATTEMPT_STRATEGIES

#: The message a request is cancelled with when its client disconnects. A request cancelled
#: with no message was cancelled by the server shutting down.
CLIENT_LEFT = "client disconnected"


@dataclass(slots=True)
class LedgerRecord:
    """One row of the ledger: one request through the gateway, or one call within a request:
    a cascade attempt (``strategy`` :data:`CASCADE_ATTEMPT`, ``request_id``
    ``<request>.<tier>``) or a retried attempt (:data:`RETRIED_ATTEMPT`,
    ``<request>.<tier>.r<n>``)."""

    request_id: str
    ts: float
    request_hash: str = ""
    tenant: str = "default"
    feature: str = ""
    user: str = ""
    requested_model: str = ""
    model: str = ""
    provider: str = ""
    endpoint: str = "chat"
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0
    cost_usd: float | None = 0.0
    baseline_cost_usd: float | None = 0.0
    saved_usd: float | None = 0.0
    cache_status: str = "miss"
    strategy: str = ""
    latency_ms: float = 0.0
    upstream_latency_ms: float = 0.0
    status: int = 200
    error_type: str = ""
    route: str = ""
    similarity: float | None = None
    cache_reason: str = ""  # a CacheBypass value when cache_status is "bypass"
    truncated: int = 0  # 1 when the answer was cut at its output limit (finish_reason length)
    # prompt tokens the compress stage removed before the call; on a batch_map item's row, also
    # those packing saved against the item asked alone (below zero when packing cost more)
    tokens_saved: int = 0


@dataclass(frozen=True, slots=True)
class BatchLine:
    """One request of a provider batch: an OpenAI chat-completions body whose ``model`` is the
    provider's own name, and the id its result comes back under."""

    custom_id: str
    body: JSON


@dataclass(frozen=True, slots=True)
class BatchStatus:
    """A provider batch's progress. ``state`` is ``running`` until its results can be read,
    then ``ended`` (completed, expired or cancelled: :class:`BatchOutcome` says per line) or
    ``failed`` (the batch as a whole was refused: no line ran). ``detail`` is the provider's
    own word for it (``in_progress``, ``finalizing``, ``expired``...)."""

    id: str
    state: Literal["running", "ended", "failed"]
    detail: str
    total: int = 0
    succeeded: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """One line's result: ``completion`` (an OpenAI ``chat.completion``) when it ran, else
    ``error``: ``expired`` or ``cancelled`` (the line never ran and was not billed) or
    ``failed`` (it ran and the provider answered an error), with the provider's ``message``."""

    custom_id: str
    completion: Completion | None = None
    error: Literal["expired", "cancelled", "failed"] | None = None
    message: str = ""
