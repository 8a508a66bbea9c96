"""Prometheus metrics, in a registry of the gateway's own (no global state).

Every label set is bounded, so that clients cannot grow the registry (and the memory of every
scraper) without limit. The only label whose values come from clients is ``model``: a name
the gateway knows (configured, or listed by the price catalog; see :class:`Metrics`) is kept,
any other is counted as :data:`OTHER`. The other labels take values the gateway chooses
(endpoints, cache statuses, reasons, configured providers, routes, tasks, alert rules,
answer rules, and job sources, states and outcomes).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["JOB_OUTCOMES", "JOB_SOURCES", "OTHER", "PURGED_KINDS", "Metrics"]

#: The ``model`` label of every model name the gateway does not know.
OTHER = "other"
#: The label values of the job metrics.
JOB_SOURCES = ("deferred", "batch")
JOB_OUTCOMES = ("completed", "failed", "expired", "cancelled")
PURGED_KINDS = ("job", "file", "batch", "provider_batch")

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)


class Metrics:
    """The gateway's metrics. ``known_models``: the model names kept as ``model`` labels (the
    empty name too); any other name is labelled :data:`OTHER`. None keeps every name, for
    callers whose names are their own."""

    def __init__(
        self, known_models: Iterable[str] | None = None, *,
        known_features: Iterable[str] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._known = None if known_models is None else frozenset(["", *known_models])
        self._model_at: dict[int, int] = {}  # id(metric) -> index of its ``model`` label
        self._features = None if known_features is None else frozenset(["", *known_features])
        counter = self._counter
        self.requests = counter("skinflint_requests", "Requests handled",
                                ["endpoint", "model", "cache", "status"])
        self.cost = counter("skinflint_cost_usd", "Spend in USD", ["model"])
        self.saved = counter("skinflint_saved_usd", "Saving against the baseline in USD",
                             ["cache"])
        self.tokens = counter("skinflint_tokens", "Tokens", ["model", "kind"])
        self.unknown_price = counter("skinflint_unknown_price",
                                     "Requests whose price is unknown", ["model"])
        self.counted_usage = counter("skinflint_counted_usage",
                                     "Responses without provider usage, counted offline",
                                     ["model"])
        self.retries = counter("skinflint_upstream_retries", "Upstream retries", ["provider"])
        self.upstream_errors = counter("skinflint_upstream_errors", "Failed upstream attempts",
                                       ["provider", "type"])
        self.route_decisions = counter("skinflint_route_decisions", "Tasks chosen by routes",
                                       ["route", "task", "how"])
        self.cascade_escalations = counter("skinflint_cascade_escalations",
                                           "Cascade tiers whose answer was not accepted",
                                           ["model", "reason"])
        self.semantic_rejected = counter("skinflint_semantic_rejected",
                                         "Similar entries the verifier refused to serve",
                                         ["reason"])
        self.semantic_skipped = counter("skinflint_semantic_skipped",
                                        "Requests the semantic cache let pass without a lookup",
                                        ["reason"])
        self.cache_bypassed = counter("skinflint_cache_bypassed",
                                      "Requests neither served from nor stored in the cache",
                                      ["reason"])
        self.truncated = counter("skinflint_truncated_answers",
                                 "Answers cut at their output-token limit (finish_reason length)",
                                 ["feature"])
        self.compression_saved = counter("skinflint_compression_tokens_saved",
                                         "Prompt tokens removed by the compress stage",
                                         ["strategy"])
        self.budget_alerts = counter("skinflint_budget_alerts",
                                     "Budget alert thresholds crossed", ["budget", "at"])
        self.budget_amount = Gauge(
            "skinflint_budget_amount",
            "Budgets in their current window, summed over subjects (usd, requests, tokens)",
            ["budget", "unit", "kind"], registry=self.registry)
        self.budget_used = Gauge(
            "skinflint_budget_used_ratio",
            "The largest share of a budget's limit spent or reserved by any one subject",
            ["budget"], registry=self.registry)
        self.breaker_state = Gauge(
            "skinflint_provider_circuit_state",
            "Each provider's circuit breaker: 0 closed, 1 open (skipped), 2 half-open (probing)",
            ["provider"], registry=self.registry)
        self.breaker_opened = counter("skinflint_provider_circuit_opened",
                                      "Times a provider's circuit opened", ["provider"])
        self.alerts_active = Gauge(
            "skinflint_alerts_active", "Cost alerts firing, as the alert table holds them",
            ["rule"], registry=self.registry)
        self.rule_answers = counter("skinflint_rule_answers",
                                    "Requests a configured rule answered without a provider",
                                    ["rule"])
        self.alert_events = counter("skinflint_alert_events",
                                    "Cost alert changes this process recorded and notified",
                                    ["rule", "state"])
        self.compress_calls = counter("skinflint_compress_calls",
                                      "Cheap-model calls of the compress stage, by kind "
                                      "(rewrite, summary.context, summary.history) and outcome "
                                      "(used, rejected, failed)", ["kind", "outcome"])
        self.shadow_calls = counter("skinflint_shadow_calls",
                                    "Sampled shadow evaluations: scored, failed or dropped",
                                    ["outcome"])
        self.shadow_off = Gauge(
            "skinflint_shadow_switched_off",
            "Feature and strategy pairs the shadow guard has switched off", registry=self.registry)
        self.jobs_accepted = counter("skinflint_jobs_accepted",
                                     "Jobs stored: deferred requests and lines of passed-through"
                                     " batches", ["source"])
        self.jobs_finished = counter("skinflint_jobs_finished",
                                     "Jobs this process finished, by outcome (completed,"
                                     " failed, expired, cancelled)", ["outcome"])
        self.jobs_purged = counter("skinflint_jobs_purged",
                                   "Rows the job store's retention deleted, by kind (job,"
                                   " file, batch, provider_batch)", ["kind"])
        self.jobs_waiting = Gauge(
            "skinflint_jobs_waiting",
            "Jobs not finished, by state (queued, submitted), as counted at each round of the"
            " process that sends batches (only that process shows it)", ["state"],
            registry=self.registry)
        for metric, values in ((self.jobs_accepted, JOB_SOURCES),
                               (self.jobs_finished, JOB_OUTCOMES),
                               (self.jobs_purged, PURGED_KINDS)):
            for value in values:  # at 0 from the start, so that rates see the first one
                metric.labels(value)
        self.latency = Histogram(
            "skinflint_request_seconds",
            "Total request latency",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def _counter(self, name: str, documentation: str, labels: list[str]) -> Counter:
        """A counter in this registry; its ``model`` label, if any, is folded by :meth:`child`."""
        found = Counter(name, documentation, labels, registry=self.registry)
        if "model" in labels:
            self._model_at[id(found)] = labels.index("model")
        return found

    def feature(self, name: str) -> str:
        """``name`` as a ``feature`` label: a feature the configuration names, else
        :data:`OTHER`."""
        if self._features is None or name in self._features:
            return name
        return OTHER

    def know(self, models: Iterable[str]) -> None:
        """Keep these model names as labels too (the price catalog's, once it has loaded).
        Safe from any thread: the set is replaced, never changed in place."""
        if self._known is not None:
            self._known = self._known | frozenset(models)

    def child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """``metric.labels(*labels)`` with an unknown model folded into :data:`OTHER`,
        memoised: resolving labels costs microseconds per call. The memo holds folded label
        sets only, so it is as bounded as the series."""
        found = self._children.get((id(metric), labels))
        if found is None:
            found = self._resolve(metric, labels)
        return found

    def _resolve(self, metric: Counter | Histogram, labels: tuple[str, ...]) -> Any:
        at = self._model_at.get(id(metric))
        if at is not None and self._known is not None and labels[at] not in self._known:
            labels = (*labels[:at], OTHER, *labels[at + 1:])
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def show_budgets(self, rows: Iterable[dict[str, Any]]) -> None:
        """Set the budget gauges from ``GET /api/budgets``-shaped rows."""
        totals: dict[tuple[str, str, str], float] = {}
        used: dict[str, float] = {}
        for row in rows:
            name = row["name"]
            used[name] = max(used.get(name, 0.0), row["used"])
            for kind in ("limit", "spent", "reserved"):
                for unit, value in row[kind].items():
                    key = (name, unit, kind)
                    totals[key] = value if kind == "limit" else totals.get(key, 0.0) + value
        for (name, unit, kind), value in totals.items():
            self.budget_amount.labels(name, unit, kind).set(value)
        for name, value in used.items():
            self.budget_used.labels(name).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
