"""The audit's plain figures: each call priced, spend by group, and output length per feature."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from skinflint.analytics.audit_input import Call
from skinflint.analytics.report import percentile
from skinflint.messages import content_text
from skinflint.models import Usage
from skinflint.pricing import PriceCatalog
from skinflint.tokens import TokenCounter

JSONRow = dict[str, Any]

__all__ = ["GroupFigures", "by_group", "output_lengths", "price_calls", "spend_over_time",
           "system_prompt", "totals"]


def price_calls(calls: Iterable[Call], catalog: PriceCatalog, counter: TokenCounter) -> None:
    """Give every call its usage (the log's, else counted) and its cost: a ledger line's
    recorded cost, else the catalog's price for its tokens; None when the model is unpriced."""
    for call in calls:
        if call.usage is None:
            call.usage = _counted(call, counter)
        if call.body is None and call.ledger_cost is not None:
            call.cost = call.ledger_cost
        else:
            call.cost = catalog.cost(call.model, call.usage)


def _counted(call: Call, counter: TokenCounter) -> Usage:
    assert call.body is not None  # ledger lines always have their counts
    messages = [m for m in call.body["messages"] if isinstance(m, dict)]
    output = counter.count_completion(call.model, call.response) if call.response else 0
    return Usage(counter.count_messages(call.model, messages), output, counted=True)


def system_prompt(call: Call) -> str:
    """The text of a call's system (or developer) messages, joined; "" when it has none."""
    if call.body is None:
        return ""
    return "\n".join(
        content_text(m.get("content")) for m in call.body["messages"]
        if isinstance(m, dict) and m.get("role") in ("system", "developer")
    )


@dataclass
class GroupFigures:
    name: str
    requests: int = 0
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    unpriced: int = 0  # calls whose model has no known price: counted, never guessed

    def add(self, call: Call) -> None:
        self.requests += call.is_request
        if call.usage is not None:
            self.input_tokens += call.usage.input_tokens
            self.output_tokens += call.usage.output_tokens
        if call.cost is None:
            self.unpriced += 1
        else:
            self.cost_usd += call.cost

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "requests": self.requests, "cost_usd": round(self.cost_usd, 9),
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "unpriced": self.unpriced}


def totals(calls: Iterable[Call]) -> GroupFigures:
    whole = GroupFigures("all")
    for call in calls:
        whole.add(call)
    return whole


def by_group(calls: Iterable[Call], key: Callable[[Call], str]) -> list[dict[str, Any]]:
    """Figures per group, costliest first."""
    groups: dict[str, GroupFigures] = {}
    for call in calls:
        name = key(call)
        found = groups.get(name)
        if found is None:
            found = groups[name] = GroupFigures(name)
        found.add(call)
    ordered = sorted(groups.values(), key=lambda g: (-g.cost_usd, -g.requests, g.name))
    return [g.as_dict() for g in ordered]


def _max_tokens(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _finish_reasons(response: dict[str, Any]) -> list[str]:
    choices = response.get("choices")
    if not isinstance(choices, list):
        return []
    return [str(c.get("finish_reason") or "") for c in choices if isinstance(c, dict)]


def output_lengths(calls: Iterable[Call]) -> list[dict[str, Any]]:
    """Per feature, over calls with an answer: output tokens p50/p95/p99, the ``max_tokens``
    most often set and how many set one, and how many answers were cut (finish_reason
    ``length``)."""
    lengths: dict[str, list[float]] = defaultdict(list)
    limits: dict[str, Counter[int]] = defaultdict(Counter)
    cut: Counter[str] = Counter()
    for call in calls:
        if call.body is None or call.response is None or call.usage is None:
            continue
        lengths[call.feature].append(call.usage.output_tokens)
        limit = _max_tokens(call.body)
        if limit is not None:
            limits[call.feature][limit] += 1
        cut[call.feature] += "length" in _finish_reasons(call.response)
    return [_length_row(f, lengths[f], limits[f], cut[f]) for f in sorted(lengths)]


def _length_row(feature: str, values: list[float], limits: Counter[int], cut: int) -> JSONRow:
    n = len(values)
    common = limits.most_common(1)
    return {
        "feature": feature, "requests": n,
        "p50": percentile(values, 0.5), "p95": percentile(values, 0.95),
        "p99": percentile(values, 0.99),
        "max_tokens": common[0][0] if common else None,
        "with_max_tokens": sum(limits.values()),
        "cut": cut, "cut_share": cut / n if n else 0.0,
    }



def spend_over_time(calls: Iterable[Call]) -> tuple[str, list[tuple[float, int, float]]]:
    """``(bucket, [(start, requests, cost)])`` by hour when the timed calls span at most two
    days, else by day (UTC); calls without a time are left out."""
    timed = [c for c in calls if c.ts is not None]
    if not timed:
        return "day", []
    times = [c.ts for c in timed if c.ts is not None]
    bucket, size = ("hour", 3600) if max(times) - min(times) <= 2 * 86400 else ("day", 86400)
    found: dict[float, list[float]] = defaultdict(lambda: [0, 0.0])
    for c in timed:
        row = found[(c.ts or 0.0) // size * size]
        row[0] += c.is_request
        row[1] += c.cost or 0.0
    return bucket, [(start, int(r[0]), r[1]) for start, r in sorted(found.items())]
