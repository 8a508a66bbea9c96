"""Spend report over ledger records: pure functions, no printing; and reading the records
through the storage layer (:func:`read_records`)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from skinflint.config import Settings
from skinflint.errors import ConfigError
from skinflint.models import (
    COMPRESS_CALL,
    RETRIED_ATTEMPT,
    SHADOW_CALL,
    LedgerRecord,
    is_attempt,
)
from skinflint.storage.opener import NotStoredError, Storage, open_storage

__all__ = ["GROUPINGS", "WEEK", "Group", "Report", "WeekChange", "build_report", "change_text",
           "each_record", "parse_since", "percentile", "read_records", "week_over_week"]

T = TypeVar("T")

GROUPINGS = ("feature", "model", "user", "strategy", "tenant")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
WEEK = 7 * 86400
#: How the strategy of a plain call to the provider (the ledger's "") is shown.
NO_STRATEGY = "none"
#: The strategy of a deferred request's row, written when its batch answered it.
BATCH = "batch"


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of ``values`` (0.0 when empty)."""
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * q), len(ordered) - 1)] if ordered else 0.0


def parse_since(text: str, now: float | None = None) -> float:
    """``7d``, ``12h``, ``30m`` -> a unix timestamp that long before ``now``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if m is None:
        raise ValueError(f"--since must look like 30m, 12h or 7d, not {text!r}")
    return (time.time() if now is None else now) - float(m.group(1)) * _UNITS[m.group(2)]


@dataclass
class Group:
    """Figures of one group. ``requests`` are client requests; ``cascade_attempts`` are the
    cascade tiers called on their behalf whose answer was not returned; ``retried_attempts``
    the failed calls that may have cost money and were retried; ``shadow_calls`` the calls the
    shadow-evaluation guard made, whose mean score is ``shadow_score`` (None: none scored);
    ``compress_calls`` the system-prompt rewrites and summaries the compress stage asked a
    cheap model for, which cost ``compress_cost_usd``.
    A deferred request answered through a provider's batch API (strategy ``batch``) is a
    client request answered later; each item of a ``batch_map`` call is a request (strategy
    ``batch_map``, its share of the packed call's cost).
    Cost and tokens count all; errors, cache hits, baseline, saving and latency are those of
    client requests, latency only of those answered in real time (a deferred request waits
    for its batch by design)."""

    key: str
    requests: int = 0
    cascade_attempts: int = 0
    retried_attempts: int = 0
    errors: int = 0
    cache_hits: int = 0
    truncated: int = 0  # answers cut at their output-token limit
    tokens_saved: int = 0  # prompt tokens the compress stage removed, or packing saved
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    baseline_cost_usd: float = 0.0
    saved_usd: float = 0.0
    unknown_cost: int = 0
    shadow_calls: int = 0
    shadow_cost_usd: float = 0.0
    compress_calls: int = 0
    compress_cost_usd: float = 0.0
    latency_ms: list[float] = field(default_factory=list, repr=False)
    shadow_scores: list[float] = field(default_factory=list, repr=False)

    def add(self, r: LedgerRecord) -> None:
        self.input_tokens += r.input_tokens
        self.output_tokens += r.output_tokens
        if r.cost_usd is None:
            self.unknown_cost += 1
        else:
            self.cost_usd += r.cost_usd
        if r.strategy == RETRIED_ATTEMPT:
            self.retried_attempts += 1
            return
        if r.strategy == SHADOW_CALL:
            self.shadow_calls += 1
            self.shadow_cost_usd += r.cost_usd or 0.0
            if r.similarity is not None:  # the uncompressed call's row holds the pair's score
                self.shadow_scores.append(r.similarity)
            return
        if r.strategy == COMPRESS_CALL:
            self.compress_calls += 1
            self.compress_cost_usd += r.cost_usd or 0.0
            return
        if is_attempt(r.strategy):
            self.cascade_attempts += 1
            return
        self.requests += 1
        self.errors += r.status >= 400
        self.cache_hits += r.cache_status.startswith("hit")
        self.truncated += r.truncated
        self.tokens_saved += r.tokens_saved
        self.baseline_cost_usd += r.baseline_cost_usd or 0.0
        self.saved_usd += r.saved_usd or 0.0
        if r.strategy != BATCH:
            self.latency_ms.append(r.latency_ms)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        lat = out.pop("latency_ms")
        scores = out.pop("shadow_scores")
        out["shadow_score"] = sum(scores) / len(scores) if scores else None
        out["p50_latency_ms"] = percentile(lat, 0.5)
        out["p95_latency_ms"] = percentile(lat, 0.95)
        out["cache_hit_rate"] = self.cache_hits / self.requests if self.requests else 0.0
        return out


@dataclass(frozen=True)
class WeekChange:
    """A feature's spend (cost of every row, attempts included) in the 7 days before the
    report and in the 7 days before those; ``change`` is the fraction gained (-0.03 is 3%
    less), None when the feature spent nothing the week before."""

    feature: str
    this_week_usd: float
    last_week_usd: float
    change: float | None


@dataclass
class Report:
    by: str
    since: float
    total: Group
    groups: list[Group]
    week_over_week: list[WeekChange] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "by": self.by,
            "since": self.since,
            "total": self.total.summary(),
            "groups": [g.summary() for g in self.groups],
            "week_over_week": [asdict(w) for w in self.week_over_week],
        }


def _key(record: LedgerRecord, by: str) -> str:
    if by == "strategy":
        return record.strategy or NO_STRATEGY
    return str(getattr(record, by)) or "(none)"


def week_over_week(records: Iterable[LedgerRecord], now: float) -> list[WeekChange]:
    """Each feature's spend in ``[now - 7d, now)`` against ``[now - 14d, now - 7d)``, the
    biggest spender this week first; features with no spend in either week are left out."""
    weeks: dict[str, list[float]] = {}
    for r in records:
        age = now - r.ts
        if 0 <= age <= 2 * WEEK and r.cost_usd:
            spent = weeks.setdefault(r.feature or "(none)", [0.0, 0.0])
            spent[age > WEEK] += r.cost_usd
    changes = [WeekChange(name, this, last, (this - last) / last if last else None)
               for name, (this, last) in weeks.items()]
    return sorted(changes, key=lambda w: (-w.this_week_usd, -w.last_week_usd, w.feature))


def change_text(change: WeekChange) -> str:
    """"up 18%", "down 3%", "flat" (under half a percent either way), or "new"."""
    if change.change is None:
        return "new"
    percent = round(change.change * 100)
    if percent == 0:
        return "flat"
    return f"{'up' if percent > 0 else 'down'} {abs(percent):,}%"


def build_report(
    records: Iterable[LedgerRecord], *, by: str = "feature", since: float = 0.0,
    now: float | None = None,
) -> Report:
    """The report of the records newer than ``since``; with ``now``, the week-over-week
    change of each feature too, from all the records given."""
    if by not in GROUPINGS:
        raise ValueError(f"--by must be one of {', '.join(GROUPINGS)}")
    records = list(records)
    total, groups = Group("total"), dict[str, Group]()
    for r in records:
        if r.ts < since:
            continue
        total.add(r)
        key = _key(r, by)
        groups.setdefault(key, Group(key)).add(r)
    ordered = sorted(groups.values(), key=lambda g: (-g.cost_usd, g.key))
    weeks = week_over_week(records, now) if now is not None else []
    return Report(by, since, total, ordered, weeks)


def read_records(
    settings: Settings, *, db: str | None = None, since: float = 0.0
) -> list[LedgerRecord]:
    """The records with ``ts >= since``, oldest first, from the ledger the settings name (or
    ``db``: a SQLite path or a ``postgresql://`` URL). Raises ConfigError when there is no
    ledger there; a SQLite file that does not exist is not created."""
    return each_record(settings, list, db=db, since=since)


def each_record(settings: Settings, use: Callable[[Iterable[LedgerRecord]], T], *,
                db: str | None = None, since: float = 0.0) -> T:
    """``use`` of the records :func:`read_records` reads, given them as they are read (so
    that an export of millions holds a few thousand at a time), off the event loop."""
    return asyncio.run(_read(open_storage(settings, db=db, existing=True), since, use))


async def _read(storage: Storage, since: float,
                use: Callable[[Iterable[LedgerRecord]], T]) -> T:
    try:
        ledger = await storage.ledger()
        return await asyncio.to_thread(lambda: use(ledger.query(since)))
    except (FileNotFoundError, NotStoredError):
        where = storage.location.ledger or storage.location.cache
        raise ConfigError(f"no ledger at {where}") from None
    finally:
        await storage.close()
