"""What each strategy would have saved on the log, projected to a month, with its assumptions
in words, and their compound.

The compound applies the strategies in pipeline order (exact cache, semantic cache,
compression, routing, token budgets, batching), each taking its share of what the ones before
it left: ``1 - prod(1 - share)`` of the spend, never more than the spend. That assumes the
strategies' savings are independent of each other, which the words say.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from skinflint.analytics.audit_figures import system_prompt
from skinflint.analytics.audit_input import Call
from skinflint.analytics.report import percentile
from skinflint.pricing import PriceCatalog

__all__ = ["MONTH_SECONDS", "Strategy", "compound", "monthly_factor", "output_caps",
           "precision_at", "saving_by_batching", "saving_by_budgets", "saving_by_compression",
           "saving_of_marked"]

MONTH_SECONDS = 30 * 86400
BATCH_WINDOW_SECONDS = 60


@dataclass
class Strategy:
    name: str
    saving_usd: float  # on the log
    assumptions: str

    def as_dict(self, total: float, factor: float | None) -> dict[str, Any]:
        share = min(self.saving_usd / total, 1.0) if total > 0 else 0.0
        scale = factor if factor is not None else 1.0
        return {"name": self.name, "saving_usd": round(self.saving_usd * scale, 6),
                "log_saving_usd": round(self.saving_usd, 9), "saving_share": share,
                "assumptions": self.assumptions}


def monthly_factor(calls: Sequence[Call]) -> tuple[float | None, float]:
    """(30 days / the log's span, the span in seconds); None when calls lack a time or the
    span is zero, and then nothing is scaled."""
    times = [c.ts for c in calls if c.ts is not None]
    if not times or len(times) < len(calls):
        return None, 0.0
    span = max(times) - min(times)
    return (MONTH_SECONDS / span if span > 0 else None), span


def compound(shares: Sequence[float]) -> float:
    """The share of the spend left after every strategy took its share in turn."""
    remaining = 1.0
    for share in shares:
        remaining *= 1.0 - min(max(share, 0.0), 1.0)
    return 1.0 - remaining


def precision_at(defaults: dict[str, Any], threshold: float) -> float:
    """The calibrated precision at ``threshold``: the held-out curve's point at the highest
    threshold not above it (the calibration's own figure at the shipped threshold)."""
    if threshold == defaults["threshold"]:
        return float(defaults["precision"])
    points = [p for p in defaults["held_out_curve"] if p["threshold"] <= threshold]
    if not points:
        return min(float(p["precision"]) for p in defaults["held_out_curve"])
    return float(max(points, key=lambda p: p["threshold"])["precision"])


def saving_of_marked(calls: Sequence[Call], marks: Sequence[bool], factor: float = 1.0) -> float:
    return factor * sum(c.cost or 0.0 for c, m in zip(calls, marks, strict=True) if m)


def _cheaper(catalog: PriceCatalog, call: Call, less_in: int = 0, less_out: int = 0) -> float:
    """What ``call`` costs minus what it would with fewer input or output tokens."""
    if call.cost is None or call.usage is None or (less_in <= 0 and less_out <= 0):
        return 0.0
    u = call.usage
    inp, out = max(u.input_tokens - less_in, 0), max(u.output_tokens - less_out, 0)
    fewer = dataclasses.replace(u, input_tokens=inp, output_tokens=out,
                                cached_tokens=min(u.cached_tokens, inp),
                                reasoning_tokens=min(u.reasoning_tokens, out))
    cost = catalog.cost(call.model, fewer)
    return 0.0 if cost is None else max(call.cost - cost, 0.0)


def saving_by_compression(calls: Sequence[Call], trimmable: dict[int, int],
                          catalog: PriceCatalog) -> float:
    return sum(_cheaper(catalog, calls[i], less_in=n) for i, n in trimmable.items())


def output_caps(calls: Sequence[Call]) -> dict[str, float]:
    """Each feature's p95 output tokens, over calls with an answer."""
    lengths: dict[str, list[float]] = defaultdict(list)
    for c in calls:
        if c.body is not None and c.response is not None and c.usage is not None:
            lengths[c.feature].append(c.usage.output_tokens)
    return {f: percentile(v, 0.95) for f, v in lengths.items()}


def saving_by_budgets(calls: Sequence[Call], catalog: PriceCatalog) -> float:
    caps = output_caps(calls)
    return sum(
        _cheaper(catalog, c, less_out=int(c.usage.output_tokens - caps[c.feature]))
        for c in calls
        if c.body is not None and c.response is not None and c.usage is not None
    )


def saving_by_batching(calls: Sequence[Call], system_tokens: dict[int, int],
                       catalog: PriceCatalog) -> float:
    """Calls of one feature, model and system prompt within the same minute: all but the first
    send their system prompt for nothing."""
    firsts: set[tuple[str, str, str, int]] = set()
    saving = 0.0
    for i, c in enumerate(calls):
        if c.ts is None or i not in system_tokens:
            continue
        key = (c.feature, c.model, system_prompt(c), int(c.ts // BATCH_WINDOW_SECONDS))
        if key in firsts:
            saving += _cheaper(catalog, c, less_in=system_tokens[i])
        else:
            firsts.add(key)
    return saving
