"""Output-token caps suggested from the ledger (``skinflint report --suggest-caps``): pure
functions over ledger records, no printing.

For each feature it takes the answers a provider gave to client chat requests (no cache hits,
errors or attempts), and of those the ones that were not cut at their output limit
(``truncated``): their output tokens' p50, p95 and p99 (nearest rank). The suggested cap is the
p99 rounded up to a multiple of :data:`ROUND_TO`; ``would_cut`` is the share of those answers
longer than it, that is the share the cap would have cut short.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from skinflint.analytics.report import percentile
from skinflint.config import TokenBudgets
from skinflint.models import LedgerRecord, is_attempt

__all__ = ["ROUND_TO", "CapSuggestion", "suggest_caps"]

#: Suggested caps are multiples of this many tokens.
ROUND_TO = 16


@dataclass(frozen=True)
class CapSuggestion:
    """One feature's observed output lengths and the cap they suggest. ``answers``: answers
    not cut short (the percentiles are theirs); ``truncated``: answers cut at their limit;
    ``current``: the feature's configured cap (its own, else the default), None without one."""

    feature: str
    answers: int
    truncated: int
    p50: int | None  # None (with ``suggested`` and ``would_cut``): every answer was cut
    p95: int | None
    p99: int | None
    suggested: int | None
    current: int | None
    would_cut: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _rounded_up(tokens: float) -> int:
    return max(ROUND_TO, -(-int(tokens) // ROUND_TO) * ROUND_TO)


def _answered(r: LedgerRecord) -> bool:
    return (r.endpoint == "chat" and r.status == 200 and not is_attempt(r.strategy)
            and not r.cache_status.startswith("hit"))


def _current(budgets: TokenBudgets | None, feature: str) -> int | None:
    if budgets is None:
        return None
    found = budgets.features.get(feature, budgets.default)
    return found.max_tokens if found is not None else None


def suggest_caps(
    records: Iterable[LedgerRecord], *, since: float = 0.0, budgets: TokenBudgets | None = None
) -> list[CapSuggestion]:
    """A suggestion per feature with answers newer than ``since``, by feature name; a feature
    whose every answer was cut is listed with no suggestion (how long its answers would
    have been is unknown)."""
    lengths: dict[str, list[float]] = {}
    cut: dict[str, int] = {}
    for r in records:
        if r.ts < since or not _answered(r):
            continue
        lengths.setdefault(r.feature, [])
        if r.truncated:
            cut[r.feature] = cut.get(r.feature, 0) + 1
        else:
            lengths[r.feature].append(r.output_tokens)
    return [_suggestion(feature, values, cut.get(feature, 0), _current(budgets, feature))
            for feature, values in sorted(lengths.items())]


def _suggestion(
    feature: str, values: list[float], truncated: int, current: int | None
) -> CapSuggestion:
    name = feature or "(none)"
    if not values:
        return CapSuggestion(name, 0, truncated, None, None, None, None, current, None)
    p99 = percentile(values, 0.99)
    suggested = _rounded_up(p99)
    return CapSuggestion(
        feature=name,
        answers=len(values),
        truncated=truncated,
        p50=int(percentile(values, 0.5)),
        p95=int(percentile(values, 0.95)),
        p99=int(p99),
        suggested=suggested,
        current=current,
        would_cut=sum(v > suggested for v in values) / len(values),
    )
