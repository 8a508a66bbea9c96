"""The spend query of ``GET /api/spend``, answered from the ledger's rollups
(:mod:`skinflint.storage.rollup`) with the same SQL in SQLite and PostgreSQL.

Three reads of one rollups table (hours or days, as the bucket): each group's sums, the
``total`` dimension per bucket, and the series of the groups that cost most. ``series`` holds
at most :data:`SERIES_TOP` groups by name; the others are summed per bucket as
:data:`OTHER` (the total less the named groups), so a chart of 5,000 users stays a chart, and
an answer stays well under a megabyte. ``groups`` always lists every group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from skinflint.storage.rollup import BUCKETS, COUNTS, FIGURES, Dialect, by_name, table_for

__all__ = ["NO_STRATEGY", "OTHER", "SERIES_TOP", "Spend", "SpendQueries", "SpendSource",
           "window"]

#: How a row whose strategy is empty (a plain call to the provider) is named.
NO_STRATEGY = "none"
#: The most groups ``series`` names; the rest are summed under :data:`OTHER`.
SERIES_TOP = 20
OTHER = "(other)"

Fetch = Callable[[str, tuple[Any, ...]], Sequence[Sequence[Any]]]


@dataclass(frozen=True, slots=True)
class Spend:
    """The answer of a spend query, as ``GET /api/spend`` serves it (timestamps as unix
    seconds): ``groups`` by cost, highest first; ``series`` by bucket start, then name."""

    by: str
    bucket: str
    since: float
    until: float
    totals: dict[str, float | int]
    groups: list[dict[str, Any]]
    series: list[dict[str, Any]]


@runtime_checkable
class SpendSource(Protocol):
    """A ledger that answers the spend API (both blocking: call them from a worker thread)."""

    def spend(self, by: str, since: float, until: float, bucket: str) -> Spend:
        """Spend by ``by`` from ``since`` to ``until`` (unix seconds) per ``bucket``."""
        ...

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` rows, newest first, with the ``RECENT_COLUMNS``."""
        ...


def window(since: float, until: float, bucket: str) -> tuple[int, int]:
    """The buckets a query reads: from the one ``since`` falls in to the one ``until`` falls
    in, both included."""
    size = BUCKETS[bucket]
    return math.floor(since / size) * size, math.floor(until / size) * size + size


def _figures(values: Sequence[Any]) -> dict[str, float | int]:
    return {f: (int(v or 0) if f in COUNTS else float(v or 0.0))
            for f, v in zip(FIGURES, values, strict=True)}


class SpendQueries:
    """The spend query's SQL for one ledger table (its name) in one dialect."""

    def __init__(self, ledger: str, dialect: Dialect) -> None:
        self._p = "?" if dialect == "sqlite" else "%s"
        p, sums = self._p, ", ".join(f"SUM({f})" for f in FIGURES)
        span = f"start >= {p} AND start < {p}"
        self._groups, self._totals, self._series = {}, {}, {}
        groups = ("SELECT name, SUM(requests), SUM(cost_usd), SUM(saved_usd), SUM(cache_hits)"
                  f" FROM {{}} WHERE dim = {p} AND {span} GROUP BY {{}}")
        for bucket in BUCKETS:
            t = table_for(ledger, bucket)
            self._groups[bucket] = groups.format(t, "name")
            self._totals[bucket] = (f"SELECT start, {sums} FROM {t} WHERE dim = 'total'"
                                    f" AND {span} GROUP BY start ORDER BY start")
            self._series[bucket] = (f"SELECT start, name, requests, cost_usd, saved_usd"
                                    f" FROM {t} WHERE dim = {p} AND {span}")
        daily = table_for(ledger, "day")
        self._first_day = f"SELECT MIN(start) FROM {daily} WHERE dim = 'total'"
        # SQLite has no statistics to choose between the day table's two orders: a window of
        # at least a quarter of the history reads its names' days in name order (no sort),
        # a shorter one its days in time order. PostgreSQL's planner chooses for itself.
        self._narrow_days = (groups.format(daily, "+name") if dialect == "sqlite"
                             else self._groups["day"])
        self._series_top = dict(self._series)  # of a few names: sought by name
        if dialect == "sqlite":
            indexed = f"{daily} INDEXED BY {by_name(daily)}"
            self._groups["day"] = groups.format(indexed, "name")
            self._series_top["day"] = self._series["day"].replace(f"FROM {daily}",
                                                                  f"FROM {indexed}")

    def run(self, fetch: Fetch, by: str, since: float, until: float, bucket: str) -> Spend:
        """The answer, read with ``fetch(sql, params) -> rows`` (blocking)."""
        lo, hi = window(since, until, bucket)
        show: Callable[[str], str] = (
            (lambda n: n or NO_STRATEGY) if by == "strategy" else (lambda n: n))
        rows = fetch(self._groups_sql(fetch, bucket, lo, hi), (by, lo, hi))
        named = sorted(((show(r[0]), r[0], r) for r in rows),
                       key=lambda g: (-float(g[2][2] or 0), g[0]))
        groups = [{"name": name, "requests": int(r[1] or 0), "cost_usd": float(r[2] or 0),
                   "saved_usd": float(r[3] or 0), "cache_hits": int(r[4] or 0)}
                  for name, _, r in named]
        per_start = {int(r[0]): _figures(r[1:]) for r in fetch(self._totals[bucket], (lo, hi))}
        totals = _figures([0] * len(FIGURES))
        for figures in per_start.values():
            for f in FIGURES:
                totals[f] += figures[f]
        sql, params = self._series[bucket], (by, lo, hi)
        if len(named) > SERIES_TOP:
            top = tuple(raw for _, raw, _ in named[:SERIES_TOP])
            sql = self._series_top[bucket] + f" AND name IN ({', '.join(self._p for _ in top)})"
            params += top
        series = [{"start": float(r[0]), "name": show(r[1]), "requests": int(r[2]),
                   "cost_usd": float(r[3]), "saved_usd": float(r[4])}
                  for r in fetch(sql + " ORDER BY start, name", params)]
        if len(named) > SERIES_TOP:
            series = _with_other(series, per_start)
        elif by == "strategy":  # renamed: "none" sorts elsewhere than ""
            series.sort(key=lambda s: (s["start"], s["name"]))
        return Spend(by, bucket, float(lo), until, totals, groups, series)

    def _groups_sql(self, fetch: Fetch, bucket: str, lo: int, hi: int) -> str:
        if bucket != "day":
            return self._groups[bucket]
        first = fetch(self._first_day, ())[0][0]
        wide = first is None or (hi - lo) * 4 >= hi - int(first)
        return self._groups["day"] if wide else self._narrow_days


def _with_other(
    series: list[dict[str, Any]], per_start: dict[int, dict[str, float | int]]
) -> list[dict[str, Any]]:
    """``series`` of the top groups, and per bucket what the others add up to."""
    rest = {start: [f["requests"], f["cost_usd"], f["saved_usd"]]
            for start, f in per_start.items()}
    for s in series:
        left = rest[int(s["start"])]
        left[0] -= s["requests"]
        left[1] -= s["cost_usd"]
        left[2] -= s["saved_usd"]
    for start, (requests, cost, saved) in rest.items():
        cost, saved = _clean(cost), _clean(saved)
        if requests or cost or saved:
            series.append({"start": float(start), "name": OTHER, "requests": int(requests),
                           "cost_usd": cost, "saved_usd": saved})
    return sorted(series, key=lambda s: (s["start"], s["name"]))


def _clean(value: float) -> float:
    """A difference of sums, its float noise (under a millionth of a cent) dropped."""
    return 0.0 if abs(value) < 1e-8 else float(value)

