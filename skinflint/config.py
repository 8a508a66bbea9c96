"""Configuration: parse YAML, interpolate ``${ENV}``, validate, freeze.

This is the one module that reads environment variables. Everything else receives a frozen
:class:`Settings`. Plain-text gateway keys are hashed here and never kept.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from skinflint.answers import AnswerRule
from skinflint.errors import ConfigError

__all__ = [
    "DEFAULT_ALERT_RULES",
    "AlertRule",
    "AnswerRule",
    "BatchingConfig",
    "BreakerConfig",
    "BudgetConfig",
    "BudgetLimit",
    "CachePolicy",
    "CompressionPolicy",
    "ContextPolicy",
    "DeferrablePolicy",
    "ExactCacheConfig",
    "FewShotPolicy",
    "GateConfig",
    "HistoryPolicy",
    "KeyConfig",
    "ModelConfig",
    "PriceOverride",
    "ProviderConfig",
    "RouteConfig",
    "RuleConfig",
    "Scoped",
    "SemanticCacheConfig",
    "Settings",
    "ShadowPolicy",
    "SystemPromptPolicy",
    "TaskConfig",
    "TierConfig",
    "TokenBudget",
    "TokenBudgets",
    "hash_key",
    "load_settings",
    "update_config_file",
]

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def hash_key(key: str) -> str:
    """The stored form of a gateway or admin key."""
    return hashlib.sha256(key.encode()).hexdigest()


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BreakerConfig(_Frozen):
    """A provider's circuit breaker: after ``failures`` failed calls in a row it is skipped
    for ``cooldown`` seconds, then probed; ``failures: 0`` turns it off."""

    failures: int = Field(default=5, ge=0)
    cooldown: float = Field(default=30.0, gt=0)


class ProviderConfig(_Frozen):
    kind: Literal["openai-compatible", "anthropic", "replay"] = "openai-compatible"
    base_url: str = ""
    api_key: str = Field(default="", repr=False)
    timeout: float = Field(default=600.0, gt=0)
    connect_timeout: float = Field(default=10.0, gt=0)
    max_retries: int = Field(default=2, ge=0, le=10)
    backoff_base: float = Field(default=0.25, ge=0)
    backoff_max: float = Field(default=8.0, ge=0)
    headers: dict[str, str] = Field(default_factory=dict, repr=False)
    breaker: BreakerConfig = BreakerConfig()
    latency_scale: float = Field(default=1.0, ge=0)  # replay only
    data_path: str | None = None  # replay only: RouterBench CSV(s) or extract; default shipped
    # the batch price as a fraction of the real-time price (0.5: half price; 1: no discount),
    # used for a model the catalog lists no batch price for
    batch_discount: float = Field(default=0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _needs_url(self) -> ProviderConfig:
        if self.kind != "replay" and not self.base_url:
            raise ValueError("base_url is required for this provider kind")
        return self


class PriceOverride(_Frozen):
    """USD per million tokens. Without ``output`` (an embedding model), a call that produces
    output tokens has an unknown cost. Without ``cached_input``, prompt tokens read from the
    provider's cache cost ``input``. Prompt tokens written to that cache and audio prompt tokens
    cost ``input``; reasoning and audio completion tokens cost ``output``."""

    input: float = Field(ge=0)
    output: float | None = Field(default=None, ge=0)
    cached_input: float | None = Field(default=None, ge=0)


PolicyT = TypeVar("PolicyT", bound=BaseModel)


class Scoped(_Frozen, Generic[PolicyT]):
    """A setting given per feature, per route (``routes:``, keyed by the route's name) or as a
    ``default:``, as the ``compression`` and ``token_budgets`` sections give theirs. A request
    takes its feature's, else its route's, else the default: the whole setting, not a merge."""

    default: PolicyT | None = None
    features: dict[str, PolicyT] = Field(default_factory=dict)
    routes: dict[str, PolicyT] = Field(default_factory=dict)

    def find(self, feature: str, route: str) -> PolicyT | None:
        """The setting of a request of ``feature`` asking for ``route`` (a model name when it
        asked for a model: no route of that name then)."""
        found = self.features.get(feature)
        if found is None:
            found = self.routes.get(route, self.default)
        return found

    @property
    def configured(self) -> bool:
        return self.default is not None or bool(self.features) or bool(self.routes)


class TokenBudget(_Frozen):
    """An output-token cap: ``max_tokens`` (a client's smaller limit stands) and an optional
    ``brevity`` instruction appended to the system prompt."""

    max_tokens: int = Field(gt=0)
    brevity: str | None = Field(default=None, min_length=1)


#: The cache-key scope of a request sent with no output cap (see
#: :meth:`TokenBudgets.cache_scope`).
UNCAPPED = "-"


class TokenBudgets(Scoped[TokenBudget]):
    """The ``token_budgets`` section: a :class:`Scoped` cap, plus ``tasks:`` keyed by the task
    a route chose. A request takes its task's, else its feature's, else its route's, else the
    default."""

    tasks: dict[str, TokenBudget] = Field(default_factory=dict)

    def resolve(self, feature: str, route: str, task: str = "") -> TokenBudget | None:
        """The cap of a request of ``feature`` asking for ``route`` whose route chose
        ``task`` (empty: no route chose one)."""
        found = self.tasks.get(task) if task else None
        return found if found is not None else self.find(feature, route)

    @property
    def configured(self) -> bool:
        return super().configured or bool(self.tasks)

    def cache_scope(self, feature: str, route: str, *, routed: bool) -> str:
        """What of this section decides the cap of such a request, as text for its cache key:
        an answer written under one cap is never served under another. Without a route the
        cap is known now; with one, it may depend on the task the route will choose, which
        the rest of the key determines, so every task cap takes part."""
        budget = self.find(feature, route)
        scope = UNCAPPED if budget is None else f"{budget.max_tokens}\0{budget.brevity or ''}"
        if routed and self.tasks:
            scope += "".join(f"\0{t}\0{b.max_tokens}\0{b.brevity or ''}"
                             for t, b in sorted(self.tasks.items()))
        return scope


class ModelConfig(_Frozen):
    provider: str
    model: str = ""  # the provider's name for it; defaults to the alias
    fallbacks: tuple[str, ...] = ()
    price: PriceOverride | None = None
    # the most one answer may hold: what a budget reserves when the client sets no max_tokens
    max_output_tokens: int | None = Field(default=None, gt=0)


class CachePolicy(_Frozen):
    """Exact-cache policy; per-feature and per-route entries override the defaults."""

    enabled: bool | None = None
    ttl_seconds: float | None = Field(default=None, ge=0)
    normalization: Literal["conservative", "loose"] | None = None
    max_temperature: float | None = Field(default=None, ge=0)
    cache_any_temperature: bool | None = None


class ExactCacheConfig(_Frozen):
    enabled: bool = True
    ttl_seconds: float = Field(default=7 * 86400, ge=0)
    scope: Literal["tenant", "user", "shared"] = "tenant"
    normalization: Literal["conservative", "loose"] = "conservative"
    max_temperature: float = Field(default=0.7, ge=0)
    memory_entries: int = Field(default=10_000, ge=0)
    memory_bytes: int = Field(default=64 << 20, ge=0)
    max_entries: int = Field(default=200_000, ge=1)
    max_entry_bytes: int = Field(default=1 << 20, ge=1)
    # how long a request waits for an identical one already on its way upstream; 0: never
    coalesce_timeout_seconds: float = Field(default=30.0, ge=0)
    features: dict[str, CachePolicy] = Field(default_factory=dict)
    routes: dict[str, CachePolicy] = Field(default_factory=dict)


class SemanticPolicy(_Frozen):
    enabled: bool | None = None
    threshold: float | None = Field(default=None, ge=0, le=1)


class SemanticCacheConfig(_Frozen):
    """Answers for similar earlier questions. Off unless enabled here or by
    ``SKINFLINT_SEMANTIC_CACHE=1``; only requests the exact cache may store are considered, and
    an entry lives as long as its exact-cache entry (same TTL, tags, invalidation)."""

    enabled: bool = False
    embedder: str = "local"  # or "openai-compatible": a provider's /embeddings endpoint
    embedder_provider: str | None = None  # for openai-compatible: which provider
    embedder_model: str = "text-embedding-3-small"
    embedder_dim: int = Field(default=1536, ge=1)
    threshold: float | None = Field(default=None, ge=0, le=1)  # None: the calibrated default
    verifier: bool | None = None  # None: as calibrated
    top_k: int = Field(default=4, ge=1, le=64)
    # the local embedder reads 256 tokens: a longer message is compared by its last paragraph,
    # the rest must match exactly
    max_question_chars: int = Field(default=1000, ge=1)
    max_entries: int = Field(default=100_000, ge=1)
    features: dict[str, SemanticPolicy] = Field(default_factory=dict)
    routes: dict[str, SemanticPolicy] = Field(default_factory=dict)


class CacheConfig(_Frozen):
    exact: ExactCacheConfig = Field(default_factory=ExactCacheConfig)
    semantic: SemanticCacheConfig = Field(default_factory=SemanticCacheConfig)


class GateConfig(_Frozen):
    """When a cascade tier's answer is accepted. Structural checks (empty, refusal, cut off,
    ``format``) always apply; the other conditions apply when given.

    Every valid answer so far, from this tier and earlier ones, is a vote for its normalised
    form (the option picked, for ``format: choice``). With ``min_votes``, the most voted answer
    is accepted once it has that many votes (``min_votes_for`` sets the count per answer).
    ``accept`` limits which answers this tier may accept at all; ``accept_alone`` lists answers
    the tier's own answer is accepted with, votes or not."""

    format: Literal["choice", "json", "json_schema", "code"] | None = None
    choices: str = "ABCD"  # or "prompt": the options the prompt's instruction allows
    agree_with: tuple[int, ...] = ()  # earlier tiers (0-based) whose answer must match
    min_votes: int | None = Field(default=None, ge=1)
    min_votes_for: dict[str, int] = Field(default_factory=dict)
    accept: tuple[str, ...] = ()
    accept_alone: tuple[str, ...] = ()
    continue_only_if: tuple[str, ...] = ()  # else an escalation skips to the last tier
    min_logprob: float | None = Field(default=None, le=0)  # mean token logprob, when returned
    scorer: float | None = Field(default=None, ge=0, le=1)  # min learned P(correct)


class TierConfig(_Frozen):
    """One model, or several called at once (``models``) whose answers vote together."""

    model: str | None = None
    models: tuple[str, ...] = ()
    answer_from: int = -1  # which of ``models`` speaks for the tier
    gate: GateConfig = Field(default_factory=GateConfig)

    @model_validator(mode="after")
    def _one_kind(self) -> TierConfig:
        if (self.model is None) == (not self.models):
            raise ValueError("give either model or models")
        if self.models and not -len(self.models) <= self.answer_from < len(self.models):
            raise ValueError("answer_from must index models")
        return self

    @property
    def names(self) -> tuple[str, ...]:
        return (self.model,) if self.model is not None else self.models


class TaskConfig(_Frozen):
    """A task is answered by one model, or by a cheap-first cascade of tiers."""

    model: str | None = None
    cascade: tuple[TierConfig, ...] = ()

    @model_validator(mode="after")
    def _one_plan(self) -> TaskConfig:
        if (self.model is None) == (not self.cascade):
            raise ValueError("give either model or cascade")
        return self


class RuleConfig(_Frozen):
    """A deterministic classification rule; every condition given must hold."""

    task: str
    keywords: tuple[str, ...] = ()  # any of them, case-insensitive
    regex: str | None = None
    min_chars: int | None = None
    max_chars: int | None = None
    feature: str | None = None

    @model_validator(mode="after")
    def _compiles(self) -> RuleConfig:
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex does not compile: {exc}") from None
        return self


class RouteConfig(_Frozen):
    baseline: str | None = None  # model savings are measured against
    rules: tuple[RuleConfig, ...] = ()
    classifier: str | None = None  # path to a trained router, or "default" for the shipped one
    scorer: str | None = None  # path to a trained correctness scorer, or "default"
    min_confidence: float = Field(default=0.0, ge=0, le=1)
    task_map: dict[str, str] = Field(default_factory=dict)  # classifier label -> task
    default_task: str = "default"
    tasks: dict[str, TaskConfig]
    pins: dict[str, str] = Field(default_factory=dict)  # feature -> model, always

    @model_validator(mode="after")
    def _tasks_exist(self) -> RouteConfig:
        named = {r.task for r in self.rules} | {self.default_task}
        missing = sorted(named - set(self.tasks))
        if missing:
            raise ValueError(f"tasks missing from tasks: {', '.join(missing)}")
        for name, task in self.tasks.items():
            for i, tier in enumerate(task.cascade):
                if any(j >= i for j in tier.gate.agree_with):
                    raise ValueError(
                        f"tasks.{name}.cascade[{i}].gate.agree_with must name earlier tiers"
                    )
        return self


class StorageConfig(_Frozen):
    """SQLite (one process) by default; with ``postgres_url``, the ledger, the cache and the
    semantic index (pgvector) live in PostgreSQL, shared by every replica; with ``redis_url``,
    the exact cache lives in Redis (under ``redis_prefix``), whatever holds the rest."""

    sqlite_path: str = "./skinflint.db"
    postgres_url: str | None = Field(default=None, pattern=r"^postgres(ql)?://", repr=False)
    redis_url: str | None = Field(default=None, pattern=r"^(rediss?|unix)://", repr=False)
    redis_prefix: str = Field(default="skinflint:", min_length=1)
    ledger_flush_interval: float = Field(default=0.2, gt=0)


class KeyConfig(_Frozen):
    """A gateway key. Give ``key`` (hashed at load) or its ``key_sha256``."""

    tenant: str
    key_sha256: str = Field(default="", repr=False)
    key: str = Field(default="", repr=False, exclude=True)

    @model_validator(mode="after")
    def _hash(self) -> KeyConfig:
        if self.key:
            object.__setattr__(self, "key_sha256", hash_key(self.key))
            object.__setattr__(self, "key", "")
        if not re.fullmatch(r"[0-9a-f]{64}", self.key_sha256):
            raise ValueError("give key or a 64-hex-char key_sha256")
        return self


class BudgetLimit(_Frozen):
    """What a budget allows per window; every amount given is a limit."""

    usd: float | None = Field(default=None, ge=0)
    requests: int | None = Field(default=None, ge=0)
    tokens: int | None = Field(default=None, ge=0)  # input + output

    @model_validator(mode="after")
    def _some(self) -> BudgetLimit:
        if self.usd is None and self.requests is None and self.tokens is None:
            raise ValueError("give at least one of usd, requests, tokens")
        return self


class BudgetConfig(_Frozen):
    """A budget or rate limit, counted per calendar window (UTC) for each subject ``per``
    names (only ``match`` when given)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    per: Literal["global", "tenant", "key", "feature", "user", "model"] = "global"
    match: str | None = None
    window: Literal["minute", "hour", "day", "month"] = "day"
    limit: BudgetLimit
    action: Literal["block", "downgrade", "alert"] = "block"
    downgrade_to: str | None = None
    alert_at: tuple[float, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> BudgetConfig:
        if self.action == "downgrade" and not self.downgrade_to:
            raise ValueError("downgrade_to is required with action: downgrade")
        if self.action != "downgrade" and self.downgrade_to:
            raise ValueError("downgrade_to is only read with action: downgrade")
        if any(not 0 < f <= 10 for f in self.alert_at):
            raise ValueError("alert_at fractions must be in (0, 10]")
        if self.per == "global" and self.match is not None:
            raise ValueError("match needs per other than global")
        return self


class AlertRule(_Frozen):
    """A cost alert with hysteresis (see :mod:`skinflint.alerts` for how it reads spend): it
    fires after ``for_windows`` windows in a row whose spend is above ``rise`` x the median of
    the ``baseline_windows`` windows before and at least ``min_usd`` above it, and resolves
    after ``for_windows`` windows in a row at most ``resolve_below`` x that median. Changes
    are also POSTed to ``webhook`` when one is given ("" gives none)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    per: Literal["global", "tenant", "feature", "model", "user"] = "global"
    window: Literal["minute", "hour", "day"] = "hour"
    baseline_windows: int = Field(default=24, ge=1, le=1000)
    rise: float = Field(default=2.0, gt=1)
    for_windows: int = Field(default=3, ge=1, le=1000)
    min_usd: float = Field(default=0.05, ge=0)
    resolve_below: float = Field(default=1.3, gt=0)
    webhook: str = Field(default="", repr=False)

    @field_validator("webhook")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and not re.fullmatch(r"https?://[^\s/]+\S*", value):
            raise ValueError("must be an http:// or https:// URL")
        return value


#: The rule that applies when the configuration has no ``alerts`` section: a feature whose
#: hourly spend is over 3x its median hour of the last day, by at least $1, two hours running.
DEFAULT_ALERT_RULES = (
    AlertRule(name="feature-spend", per="feature", window="hour", baseline_windows=24,
              rise=3.0, for_windows=2, min_usd=1.0, resolve_below=1.5),
)


class SystemPromptPolicy(_Frozen):
    """System-prompt compaction: whitespace and repeated paragraphs normalised (``normalize``),
    and, for a prompt of at least ``min_tokens`` tokens, a one-time rewrite by the model
    ``rewrite_with`` (cached by the prompt's content hash)."""

    normalize: bool = True
    rewrite_with: str | None = Field(default=None, min_length=1)
    min_tokens: int = Field(default=500, ge=0)


class FewShotPolicy(_Frozen):
    """Few-shot pruning: keep the ``keep`` worked examples most similar to the question.
    Examples are the blocks of the last user message that repeat one template line, and every
    plain user/assistant pair before the last user message: set it only for features whose
    earlier turns are examples, not a conversation."""

    keep: int = Field(ge=0)


class _Summarized(_Frozen):
    """What trimming leaves out may be summarised by the model ``summarize_with`` (in at most
    ``summary_max_tokens`` tokens, within ``summary_timeout`` seconds, else plain trimming)."""

    summarize_with: str | None = Field(default=None, min_length=1)
    summary_max_tokens: int = Field(default=256, gt=0)
    summary_timeout: float = Field(default=10.0, gt=0)


class _Trimmed(_Summarized):
    max_tokens: int = Field(gt=0)

    @model_validator(mode="after")
    def _room_for_the_summary(self) -> _Trimmed:
        if self.summarize_with and self.summary_max_tokens >= self.max_tokens:
            raise ValueError(
                f"summary_max_tokens ({self.summary_max_tokens}) must be less than max_tokens "
                f"({self.max_tokens}): the summary takes its place within max_tokens")
        return self


class ContextPolicy(_Trimmed):
    """Context trimming: the last user message is cut to ``max_tokens``, keeping the chunks
    most relevant to its question; with ``summarize_with``, it is cut to leave room for a
    summary of the chunks left out, which takes the place of the first of them."""


class HistoryPolicy(_Trimmed):
    """Conversation trimming: the oldest turns go until the prompt fits ``max_tokens``; with
    ``summarize_with``, until it fits beside one system message summarising them, which takes
    their place."""


class ShadowPolicy(_Frozen):
    """Sampled shadow evaluation of a compressed feature (``compression.<scope>.shadow``): a
    ``sample`` fraction of its compressed requests is also sent uncompressed, the two answers
    are scored by ``judge`` (``exact``, ``similarity``, or a model or alias asked whether they
    agree), and a strategy whose mean score is confidently below ``floor`` is switched off for
    the feature: checked first at ``min_samples`` samples (the earliest the guard decides), then
    at every sample by a sequential test (:mod:`skinflint.pipeline.shadow_score`)."""

    sample: float = Field(default=0.05, ge=0, le=1)
    floor: float = Field(default=0.9, ge=0, le=1)
    judge: str = Field(default="similarity", min_length=1)
    min_samples: int = Field(default=20, ge=1)


class CompressionPolicy(_Frozen):
    """The ``compression`` setting of a feature or route: the strategies it uses (the system
    prompt is normalised unless ``system_prompt: {normalize: false}``)."""

    system_prompt: SystemPromptPolicy = SystemPromptPolicy()
    few_shot: FewShotPolicy | None = None
    context: ContextPolicy | None = None
    history: HistoryPolicy | None = None
    shadow: ShadowPolicy | None = None

    def models(self) -> list[tuple[str, str]]:
        """(key, model) of every model this setting names."""
        named: list[tuple[str, str | None]]
        named = [("system_prompt.rewrite_with", self.system_prompt.rewrite_with)]
        for key, trimmed in (("context", self.context), ("history", self.history)):
            if trimmed is not None:
                named.append((f"{key}.summarize_with", trimmed.summarize_with))
        if self.shadow is not None and self.shadow.judge not in ("exact", "similarity"):
            named.append(("shadow.judge", self.shadow.judge))
        return [(key, model) for key, model in named if model]


class DeferrablePolicy(_Frozen):
    """A feature's batching policy: ``deferrable`` requests are deferred as if they had asked
    with ``x-skinflint-priority: batch``."""

    deferrable: bool = False


class BatchingConfig(_Frozen):
    """Deferred requests (``x-skinflint-priority: batch`` or a ``deferrable`` feature): gathered
    ``window_seconds`` per provider and model (or until ``max_lines``), sent as one provider
    batch, polled every ``poll_seconds``. A line that expired or failed is retried once in real
    time (``realtime``) or reported failed (``fail``). ``webhook`` is POSTed
    ``{"id", "status"}`` when a deferred job finishes. Finished jobs, and the uploaded files
    and passed-through batches no job waits on any more, are deleted ``keep_days`` after
    they ended."""

    window_seconds: float = Field(default=60.0, ge=0)
    max_lines: int = Field(default=50_000, ge=1, le=50_000)
    poll_seconds: float = Field(default=30.0, gt=0)
    on_failure: Literal["realtime", "fail"] = "realtime"
    webhook: str | None = Field(default=None, repr=False)
    keep_days: float = Field(default=7.0, gt=0)
    features: dict[str, DeferrablePolicy] = Field(default_factory=dict)

    @field_validator("webhook")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^\s/]+\S*", value):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("features", mode="before")
    @classmethod
    def _empty(cls, value: Any) -> Any:
        return {} if value is None else value

    def deferrable(self, feature: str) -> bool:
        """Whether ``feature``'s requests are deferred without asking."""
        policy = self.features.get(feature) if feature else None
        return policy is not None and policy.deferrable


class ServerConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8787, ge=0, le=65535)
    max_body_bytes: int = Field(default=8 << 20, ge=1024)
    workers: int = Field(default=1, ge=1)


class Settings(_Frozen):
    server: ServerConfig = Field(default_factory=ServerConfig)
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    default_provider: str | None = None
    baseline_model: str | None = None
    routes: dict[str, RouteConfig] = Field(default_factory=dict)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    keys: tuple[KeyConfig, ...] = ()
    budgets: tuple[BudgetConfig, ...] = ()
    rules: tuple[AnswerRule, ...] = ()  # deterministic answers, tried in order
    token_budgets: TokenBudgets = Field(default_factory=TokenBudgets)
    # absent: the default rule; an empty list (or an empty section): no alerts
    alerts: tuple[AlertRule, ...] = DEFAULT_ALERT_RULES
    compression: Scoped[CompressionPolicy] = Field(default_factory=Scoped[CompressionPolicy])
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    admin_key_sha256: str = Field(default="", repr=False)
    admin_key: str = Field(default="", repr=False, exclude=True)

    @model_validator(mode="after")
    def _check_references(self) -> Settings:
        if self.admin_key:
            object.__setattr__(self, "admin_key_sha256", hash_key(self.admin_key))
            object.__setattr__(self, "admin_key", "")
        for alias, model in self.models.items():
            if model.provider not in self.providers:
                raise ValueError(f"models.{alias}.provider: unknown provider {model.provider!r}")
            for fb in model.fallbacks:
                if fb not in self.models:
                    raise ValueError(f"models.{alias}.fallbacks: unknown model {fb!r}")
        emb = self.cache.semantic
        if emb.embedder == "openai-compatible" and emb.embedder_provider not in self.providers:
            raise ValueError("cache.semantic.embedder_provider: name a configured provider")
        clash = sorted(set(self.routes) & set(self.models))
        if clash:
            raise ValueError(f"routes: {', '.join(clash)} is also a model alias")
        if self.default_provider and self.default_provider not in self.providers:
            raise ValueError(f"default_provider: unknown provider {self.default_provider!r}")
        self._check_budgets()
        self._check_alerts()
        self._check_rules()
        self._check_compression()
        return self

    def _check_rules(self) -> None:
        seen: set[str] = set()
        for i, rule in enumerate(self.rules):
            if rule.name in seen:
                raise ValueError(f"rules[{i}].name: {rule.name!r} is used twice")
            seen.add(rule.name)

    def _check_compression(self) -> None:
        scoped = self.compression
        settings = [("default", scoped.default)] if scoped.default is not None else []
        settings += [(f"features.{n}", p) for n, p in scoped.features.items()]
        settings += [(f"routes.{n}", p) for n, p in scoped.routes.items()]
        for where, policy in settings:
            for key, model in policy.models():
                if not (self.default_provider or model in self.models or model in self.routes):
                    raise ValueError(f"compression.{where}.{key}: unknown model {model!r}")

    @field_validator("alerts", "rules", mode="before")
    @classmethod
    def _empty_section(cls, value: Any) -> Any:
        return () if value is None else value

    def _check_alerts(self) -> None:
        seen: set[str] = set()
        for i, rule in enumerate(self.alerts):
            if rule.name in seen:
                raise ValueError(f"alerts[{i}].name: {rule.name!r} is used twice")
            seen.add(rule.name)
            if rule.resolve_below > rule.rise:
                raise ValueError(f"alerts[{i}].resolve_below: must be <= rise ({rule.rise:g})")

    def _check_budgets(self) -> None:
        seen: set[str] = set()
        for i, budget in enumerate(self.budgets):
            if budget.name in seen:
                raise ValueError(f"budgets[{i}].name: {budget.name!r} is used twice")
            seen.add(budget.name)
            target = budget.downgrade_to
            known = self.default_provider or target in self.models or target in self.routes
            if target is not None and not known:
                raise ValueError(f"budgets[{i}].downgrade_to: unknown model {target!r}")

    def feature_names(self) -> frozenset[str]:
        """Every feature the configuration names: in token budgets, cache policies, route pins
        and feature budgets."""
        names = {*self.token_budgets.features, *self.cache.exact.features,
                 *self.cache.semantic.features}
        names.update(f for route in self.routes.values() for f in route.pins)
        names.update(b.match for b in self.budgets if b.per == "feature" and b.match)
        names.update(self.batching.features)
        return frozenset(names)

    def model_names(self) -> frozenset[str]:
        """Every model name the configuration mentions: aliases and the provider models they
        stand for, routes and the models their tasks, cascade tiers, pins and baselines name,
        and the baseline model."""
        names = {*self.models, *self.routes}
        names.update(m.model for m in self.models.values() if m.model)
        if self.baseline_model:
            names.add(self.baseline_model)
        names.update(b.downgrade_to for b in self.budgets if b.downgrade_to)
        for route in self.routes.values():
            names.update(route.pins.values())
            if route.baseline:
                names.add(route.baseline)
            for task in route.tasks.values():
                names.update([task.model] if task.model else ())
                names.update(name for tier in task.cascade for name in tier.names)
        return frozenset(names)


def _interpolate(value: Any, env: Mapping[str, str], path: str) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(f"config: {path}: environment variable {name} is not set")

        return _ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {
            k: _interpolate(v, env, f"{path}.{k}" if path else str(k)) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_interpolate(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _zero_config(env: Mapping[str, str]) -> dict[str, Any]:
    """One upstream from ``OPENAI_BASE_URL``/``OPENAI_API_KEY``; every model passes through."""
    return {
        "providers": {
            "openai": {
                "kind": "openai-compatible",
                "base_url": env.get("OPENAI_BASE_URL") or "https://api.openai.com/v1",
                "api_key": env.get("OPENAI_API_KEY", ""),
            }
        },
        "default_provider": "openai",
    }


#: How a validation error of each pydantic type reads after the key it names.
_MESSAGES = {
    "greater_than": "must be > {gt:g}",
    "greater_than_equal": "must be >= {ge:g}",
    "less_than": "must be < {lt:g}",
    "less_than_equal": "must be <= {le:g}",
    "literal_error": "must be {expected}",
    "extra_forbidden": "unknown key",
    "missing": "is required",
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
    "string_pattern_mismatch": "must match {pattern}",
    "string_too_short": "must be at least {min_length} characters long",
    "value_error": "{error}",
}


def _format_validation(exc: ValidationError) -> str:
    """``config: cache.exact.ttl_seconds: must be >= 0``: the first error, naming its key."""
    first = exc.errors()[0]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
    template = _MESSAGES.get(first["type"])
    try:
        text = template.format(**first.get("ctx", {})) if template else first["msg"]
    except (KeyError, ValueError):
        text = first["msg"]
    return f"config: {where.lstrip('.')}: {text}" if where else f"config: {text}"


def _format_yaml_error(path: str | Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or not problem:
        return f"config: {path} is not valid YAML: {exc}"
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    return f"config: {path} is not valid YAML ({where}): {problem}"


def settings_from_dict(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Settings:
    """Validate an already-parsed configuration mapping."""
    env = os.environ if env is None else env
    data = _interpolate(dict(raw), env, "")
    if env.get("SKINFLINT_SEMANTIC_CACHE", "").lower() in ("1", "true", "yes", "on"):
        cache = dict(data.get("cache") or {})
        cache["semantic"] = {**(cache.get("semantic") or {}), "enabled": True}
        data["cache"] = cache
    if not data.get("providers"):
        data = {**_zero_config(env), **{k: v for k, v in data.items() if k != "providers"}}
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc)) from None


class _AnyEnv(dict[str, str]):
    """An environment in which every variable is set (to check a file's shape offline)."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str) -> str:
        return "placeholder"


def update_config_file(path: str | Path, updates: dict[str, Any]) -> None:
    """Set dotted keys (``cache.semantic.threshold``) in a YAML file, creating it if needed;
    the result is validated before it is written. Comments in the file are not kept."""
    path = Path(path)
    raw: dict[str, Any] = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    for dotted, value in updates.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    settings_from_dict(raw, env=_AnyEnv())  # validate; ${VARS} need not be set to edit
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Load ``path``, else ``$SKINFLINT_CONFIG``, else the zero configuration."""
    env = os.environ if env is None else env
    path = path or env.get("SKINFLINT_CONFIG") or None
    if path is None:
        return settings_from_dict({}, env)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(_format_yaml_error(path, exc)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {path} must hold a mapping at the top level")
    return settings_from_dict(raw, env)
