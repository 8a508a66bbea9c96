"""Per-request state and the stage interface.

What a stage decides is a small frozen fact that it sets once on the context (the cache
decision, the route decision, a cascade tier's gate verdict, the cost figures); later stages
read it as typed fields, never by parsing a string back. The mutable remainder is what really
changes while a request is served: timings, attempts, errors, status.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from skinflint.interfaces import Vector
from skinflint.models import (
    CASCADE_ATTEMPT,
    RETRIED_ATTEMPT,
    CacheBypass,
    LedgerRecord,
    StreamChunk,
    Usage,
)

__all__ = [
    "MISS",
    "Attempt",
    "BudgetDecision",
    "CacheDecision",
    "CachePlan",
    "Compression",
    "Costs",
    "Counting",
    "GateVerdict",
    "Next",
    "PackedItems",
    "Reply",
    "RequestContext",
    "RouteDecision",
    "RuleAnswer",
    "SemanticProbe",
    "Stage",
    "Target",
    "TokenCap",
]

JSON = dict[str, Any]
CacheStatus = Literal["miss", "bypass", "hit-exact", "hit-semantic"]


@dataclass(frozen=True, slots=True)
class Target:
    """A concrete model on a concrete provider, as the route stage resolved it."""

    name: str  # the alias or model name the client (or router) chose
    provider: str
    provider_model: str


@dataclass(frozen=True, slots=True)
class CacheDecision:
    """What the cache stages decided: the ``x-skinflint-cache`` header and why not cached."""

    status: CacheStatus = "miss"
    reason: CacheBypass | None = None  # set with status "bypass"
    similarity: float | None = None  # set with status "hit-semantic"

    @property
    def hit(self) -> bool:
        return self.status in ("hit-exact", "hit-semantic")


MISS = CacheDecision()


@dataclass(frozen=True, slots=True)
class CachePlan:
    """How the cache treats a request it may serve and store: set by the exact-cache stage."""

    key: str  # the exact entry's key, within the request's scope
    ttl_seconds: float
    epoch: int  # the cache's invalidation count when the request looked it up


@dataclass(frozen=True, slots=True)
class SemanticProbe:
    """The semantic cache's view of a request, kept to index its answer once stored."""

    partition: str
    question: str
    vector: Vector


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """How the route stage resolved the requested name: the ``x-skinflint-route`` header."""

    route: str  # the route's name, or the model or alias asked for
    task: str = ""  # with a route: the task chosen
    pin: str = ""  # with a route: the feature pinned to a model, when that decided
    tier: int = 0  # with a cascade: the tier (0-based) whose turn ended it
    tiers: int = 0  # with a cascade: how many tiers it has
    downgrade: str = ""  # the budget that sent the request to another model

    @property
    def routed(self) -> bool:
        """True when a route (not the client) chose the model."""
        return bool(self.task or self.pin)

    @property
    def label(self) -> str:
        """``auto;task=code;tier=1/3``, ``auto;pin=billing``, ``auto;task=faq`` or the name;
        ``;downgrade=<budget>`` follows when a budget chose the model."""
        if self.downgrade:
            return f"{self._label};downgrade={self.downgrade}"
        return self._label

    @property
    def _label(self) -> str:
        if self.pin:
            return f"{self.route};pin={self.pin}"
        if not self.task:
            return self.route
        if not self.tiers:
            return f"{self.route};task={self.task}"
        return f"{self.route};task={self.task};tier={self.tier + 1}/{self.tiers}"


@dataclass(frozen=True, slots=True)
class RuleAnswer:
    """The rule that answered the request itself (the rules stage): no provider was called."""

    name: str  # a configured rule's name

    @property
    def label(self) -> str:
        """The ``x-skinflint-route`` header: ``rule;name=<rule>``."""
        return f"rule;name={self.name}"


@dataclass(frozen=True, slots=True)
class TokenCap:
    """What the budget-tokens stage did: the configured cap, whether it lowered (or set) the
    request's output limit (False: the client's own limit was smaller and stands) and whether
    it appended the brevity instruction."""

    max_tokens: int
    capped: bool
    brevity: bool


class Counting(Protocol):
    """A token count under way off the event loop; ``result`` waits for it (or does it)."""

    def result(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Compression:
    """What the compress stage removed from a request's prompt: the strategies that changed it
    (among ``system_prompt``, ``few_shot``, ``context``, ``history``, in that order), the
    prompt tokens removed (exact; a count under way when the stage left it to a thread), and
    the request body as the client sent it (for a shadow call)."""

    strategies: tuple[str, ...]
    removed: int | Counting
    original_body: JSON

    @property
    def tokens_removed(self) -> int:
        """The exact count (read when the ledger row is written: by then it is done)."""
        return self.removed if isinstance(self.removed, int) else self.removed.result()

    @property
    def label(self) -> str:
        """``few_shot+context``: what ``;compressed=`` names in ``x-skinflint-route``."""
        return "+".join(self.strategies)


@dataclass(frozen=True, slots=True)
class BudgetDecision:
    """What the guard decided for an admitted request: the budgets that count it, the model a
    downgrade budget sends it to (and that budget), the alert thresholds it crossed."""

    budgets: tuple[str, ...]
    downgrade_to: str = ""
    downgraded_by: str = ""
    alerts: tuple[tuple[str, float], ...] = ()  # (budget, fraction)


@dataclass(frozen=True, slots=True)
class GateVerdict:
    """Why a cascade tier's call was not the answer returned: a fixed reason (``format``,
    ``votes``, ``disagree``, ``score``, an upstream error type, ...) and, for ``score``, the
    estimated probability that the answer was correct."""

    reason: str
    score: float | None = None

    def __str__(self) -> str:
        return self.reason if self.score is None else f"{self.reason} {self.score:.2f}"


@dataclass(frozen=True, slots=True)
class Attempt:
    """An upstream call whose answer was not returned but whose cost counts: a cascade tier
    that was called and escalated or failed, or (``retry`` > 0, the request's n-th such call)
    a call that failed after the provider may have done the work, and was retried or fell
    back. The account stage writes a ledger row for each; ``usage`` None: tokens unknown."""

    tier: int
    target: Target
    usage: Usage | None
    upstream_ms: float
    status: int = 200
    error_type: str = ""
    verdict: GateVerdict = GateVerdict("not chosen")
    retry: int = 0

    @property
    def strategy(self) -> str:
        return RETRIED_ATTEMPT if self.retry else CASCADE_ATTEMPT

    @property
    def suffix(self) -> str:
        """What follows the request id in the attempt's ledger row."""
        return f".{self.tier + 1}.r{self.retry}" if self.retry else f".{self.tier + 1}"


@dataclass(frozen=True, slots=True)
class Costs:
    """The request's price, set once by the account stage."""

    cost_usd: float | None  # every call it made, cascade tiers included; None if unpriced
    own_usd: float | None  # the call whose answer was returned
    baseline_model: str
    baseline_cost_usd: float | None
    saved_usd: float | None


NO_COSTS = Costs(None, None, "", None, None)


@dataclass(frozen=True, slots=True)
class PackedItems:
    """The request is one packed call of a batch_map request (set by whoever packed it): the
    items it carries, by their position in the batch_map request, each one's weight (its
    input tokens), the prompt tokens each would have taken asked alone, and whether the call
    retries items. The account stage writes a ledger row per item, each with its share of the
    call's tokens and cost, instead of one row for the call; its baseline is the item asked
    alone (a retry's rows have none: their cost is what batching lost)."""

    positions: tuple[int, ...]
    weights: tuple[int, ...]
    solo_tokens: tuple[int, ...] = ()  # empty: no baseline of its own (the call's is shared)
    retry: bool = False

    def shares(self, total: int) -> list[int]:
        """``total`` split by weight into whole parts that sum to it (largest remainders)."""
        weight = sum(self.weights)
        if weight <= 0:
            weights, weight = [1] * len(self.weights), len(self.weights)
        else:
            weights = list(self.weights)
        exact = [total * w / weight for w in weights]
        parts = [int(x) for x in exact]
        left = total - sum(parts)
        order = sorted(range(len(parts)), key=lambda i: parts[i] - exact[i])
        for i in order[:left]:
            parts[i] += 1
        return parts

    def fractions(self) -> list[float]:
        """Each item's share of the call, by weight (they sum to 1)."""
        weight = sum(self.weights)
        if weight <= 0:
            return [1 / len(self.weights)] * len(self.weights)
        return [w / weight for w in self.weights]


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

    # arrival (the gateway)
    request_id: str
    ts: float
    started: float  # perf_counter at arrival
    endpoint: str  # "chat" | "embeddings"
    raw_body: bytes
    headers: dict[str, str]
    # the request's facts (attribute)
    body: JSON = field(default_factory=dict)
    stream: bool = False  # the upstream call streams (a cascade tier's copy does not)
    client_wants_usage: bool = False
    tenant: str = "default"
    feature: str = ""
    user: str = ""
    tags: tuple[str, ...] = ()
    cache_mode: str = "default"  # default | bypass | refresh
    task: str = ""
    requested_model: str = ""
    request_hash: str = ""
    # decisions (each set by the stage that makes it)
    budget: BudgetDecision | None = None  # None: no budget applies
    deferred: str = ""  # the job id, when the defer stage answered 202 (deferred)
    rule: RuleAnswer | None = None  # set when a rule answered
    cache: CacheDecision = MISS
    cache_plan: CachePlan | None = None  # None: the cache neither serves nor stores it
    semantic: SemanticProbe | None = None
    compression: Compression | None = None  # None: the prompt was sent as the client sent it
    targets: tuple[Target, ...] = ()
    route: RouteDecision | None = None
    token_cap: TokenCap | None = None  # None: no token budget applies
    packed: PackedItems | None = None  # set when the request is a batch_map packed call
    answered: Target | None = None  # the target whose provider answered
    usage: Usage | None = None
    model: str = ""  # the model the answer names (a cache hit's, or account's), else unknown
    costs: Costs = NO_COSTS
    # what changes while it is served
    attempts: list[Attempt] = field(default_factory=list)
    upstream_ms: float = 0.0
    status: int = 200
    error_type: str = ""
    truncated: bool = False  # the answer was cut at its output limit (finish_reason length)
    errors: list[Exception] = field(default_factory=list)
    # told by the account stage once the request's cost is known, however it ended
    on_accounted: Callable[[RequestContext], None] | None = None
    # told of each call made for the request beside its own (a cheap model's rewrite or
    # summary, a shadow call, its judge) once the call is over, with its ledger row
    on_side_call: Callable[[LedgerRecord], None] | None = None

    @property
    def answered_model(self) -> str:
        """The model that answered, as far as known now (a stream's headers go out before
        its end)."""
        if self.model:
            return self.model
        return self.answered.provider_model if self.answered else self.requested_model

    @property
    def substituted(self) -> bool:
        """True when another model than the one chosen for the request answered it: a
        fallback, after the chosen target failed, or a budget's downgrade."""
        downgraded = self.route is not None and bool(self.route.downgrade)
        fell_back = bool(self.targets) and self.answered is not None and (
            self.answered is not self.targets[0])
        return downgraded or fell_back

    @property
    def served_locally(self) -> bool:
        """True when the gateway answered by itself (a cache hit or a rule): no provider was
        called for the answer, which costs nothing and counts only as a request."""
        return self.cache.hit or self.rule is not None

    @property
    def route_label(self) -> str:
        """The rule's label for a rule answer, else the route's (see :class:`RouteDecision`),
        then ``;cap=<n>`` when a token budget lowered the request's output limit."""
        if self.rule is not None:
            return self.rule.label
        label = self.route.label if self.route is not None else self.requested_model
        cap = self.token_cap
        return f"{label};cap={cap.max_tokens}" if cap is not None and cap.capped else label

    @property
    def route_header(self) -> str:
        """The ``x-skinflint-route`` header: the route's label, then ``;compressed=`` and the
        strategies that shrank the prompt, if any did."""
        if self.compression is None:
            return self.route_label
        return f"{self.route_label};compressed={self.compression.label}"


Next = Callable[[RequestContext], Awaitable[Reply]]


class Stage(Protocol):
    """One step of the pipeline. ``enabled`` False means the slot is empty and is skipped."""

    name: str
    enabled: bool

    async def __call__(self, ctx: RequestContext, next: Next) -> Reply: ...
