"""Prometheus metrics, in a registry of the gateway's own (no global state)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

__all__ = ["Metrics"]

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
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.requests = Counter(
            "skinflint_requests",
            "Requests handled",
            ["endpoint", "model", "cache", "status"],
            registry=r,
        )
        self.cost = Counter("skinflint_cost_usd", "Spend in USD", ["model"], registry=r)
        self.saved = Counter(
            "skinflint_saved_usd", "Saving against the baseline in USD", ["cache"], registry=r
        )
        self.tokens = Counter("skinflint_tokens", "Tokens", ["model", "kind"], registry=r)
        self.unknown_price = Counter(
            "skinflint_unknown_price", "Requests whose price is unknown", ["model"], registry=r
        )
        self.counted_usage = Counter(
            "skinflint_counted_usage",
            "Responses without provider usage, counted offline",
            ["model"],
            registry=r,
        )
        self.retries = Counter(
            "skinflint_upstream_retries", "Upstream retries", ["provider"], registry=r
        )
        self.upstream_errors = Counter(
            "skinflint_upstream_errors",
            "Failed upstream attempts",
            ["provider", "type"],
            registry=r,
        )
        self.route_decisions = Counter("skinflint_route_decisions", "Tasks chosen by routes",
                                       ["route", "task", "how"], registry=r)
        self.cascade_escalations = Counter("skinflint_cascade_escalations",
                                           "Cascade tiers whose answer was not accepted",
                                           ["model", "reason"], registry=r)
        self.semantic_rejected = Counter("skinflint_semantic_rejected",
                                         "Similar entries the verifier refused to serve",
                                         ["reason"], registry=r)
        self.semantic_skipped = Counter("skinflint_semantic_skipped",
                                        "Requests the semantic cache let pass without a lookup",
                                        ["reason"], registry=r)
        self.cache_bypassed = Counter("skinflint_cache_bypassed",
                                      "Requests neither served from nor stored in the cache",
                                      ["reason"], registry=r)
        self.latency = Histogram(
            "skinflint_request_seconds",
            "Total request latency",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """``metric.labels(*labels)``, memoised: resolving labels costs microseconds per call."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)
