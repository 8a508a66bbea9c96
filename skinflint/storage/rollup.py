"""Hourly spend rollups of the ledger, shared by its SQLite and PostgreSQL tables.

Beside the ledger's rows, one table holds, per hour (UTC, unix seconds of its start), per
dimension (``tenant``, ``feature``, ``model``, ``user``, ``strategy``, and ``total``) and per
name in it, the sums the spend API answers from: client ``requests`` (attempt rows, see
:func:`skinflint.models.is_attempt`, count cost and tokens but are not requests), cost,
baseline, saving, tokens, cache hits and errors (those three of client requests only, as the
report counts them). A day is the sum of its 24 hours.

The ledger keeps them in the transaction that writes its rows: SQLite adds what
:func:`aggregate` sums in Python (:func:`insert_sql`), which costs a third of what grouping
the new rows in SQL does; PostgreSQL groups the batch it COPYed with :func:`upsert_sql`. That
statement, over a whole table, builds the rollups of a ledger made before them, once. The
tests hold both ways to the report's own count of the rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from skinflint.models import ATTEMPT_STRATEGIES, LedgerRecord

__all__ = [
    "BUCKETS",
    "DIMENSIONS",
    "FIGURES",
    "HOUR",
    "RECENT_COLUMNS",
    "Spend",
    "SpendSource",
    "aggregate",
    "insert_sql",
    "rollup_schema",
    "spend_from_rows",
    "spend_params",
    "spend_sql",
    "upsert_sql",
    "window",
]

Dialect = Literal["sqlite", "postgres"]

HOUR = 3600
DAY = 86400
#: The ``by`` values of the spend query; ``total`` is kept too, for the whole.
DIMENSIONS = ("feature", "model", "user", "tenant", "strategy")
#: The ``bucket`` values, in seconds.
BUCKETS = {"hour": HOUR, "day": DAY}
FIGURES = ("requests", "cost_usd", "baseline_cost_usd", "saved_usd", "input_tokens",
           "output_tokens", "cache_hits", "errors")
_COUNTS = frozenset({"requests", "input_tokens", "output_tokens", "cache_hits", "errors"})
#: The ledger columns of ``GET /api/requests``, in its order.
RECENT_COLUMNS = ("request_id", "ts", "tenant", "feature", "user", "model", "route",
                  "cache_status", "strategy", "cost_usd", "saved_usd", "status", "latency_ms")
#: How a row whose strategy is empty (a plain call to the provider) is named.
NO_STRATEGY = "none"


def _sql_types(dialect: Dialect) -> tuple[str, str]:
    return ("INTEGER", "REAL") if dialect == "sqlite" else ("BIGINT", "DOUBLE PRECISION")


def rollup_schema(table: str, dialect: Dialect) -> str:
    integer, real = _sql_types(dialect)
    columns = ", ".join(
        f"{f} {integer if f in _COUNTS else real} NOT NULL DEFAULT 0" for f in FIGURES)
    tail = " WITHOUT ROWID" if dialect == "sqlite" else ""
    return (f"CREATE TABLE IF NOT EXISTS {table} (dim TEXT NOT NULL, hour {integer} NOT NULL,"
            f" name TEXT NOT NULL, {columns}, PRIMARY KEY (dim, hour, name)){tail}")


def _sums() -> str:
    """The figures of a group of ledger rows, as SQL both databases read alike."""
    attempts = ", ".join("'{}'".format(s.replace("'", "''")) for s in sorted(ATTEMPT_STRATEGIES))
    client = f"COALESCE(strategy, '') NOT IN ({attempts})"

    def of_clients(expr: str) -> str:
        return f"SUM(CASE WHEN {client} THEN {expr} ELSE 0 END)"

    return ", ".join([
        of_clients("1"),
        "SUM(COALESCE(cost_usd, 0))",
        of_clients("COALESCE(baseline_cost_usd, 0)"),
        of_clients("COALESCE(saved_usd, 0)"),
        "SUM(COALESCE(input_tokens, 0))",
        "SUM(COALESCE(output_tokens, 0))",
        of_clients("CASE WHEN substr(cache_status, 1, 3) = 'hit' THEN 1 ELSE 0 END"),
        of_clients("CASE WHEN status >= 400 THEN 1 ELSE 0 END"),
    ])


Key = tuple[str, int, str]


def aggregate(records: Iterable[LedgerRecord]) -> list[tuple[Any, ...]]:
    """The rollup rows of ``records`` (dimension, hour, name, then the :data:`FIGURES`), in
    key order, as :func:`upsert_sql` would sum them."""
    parts: dict[Key, list[tuple[Any, ...]]] = {}
    for r in records:
        hour = int(r.ts // HOUR) * HOUR
        cost = r.cost_usd or 0.0
        if r.strategy in ATTEMPT_STRATEGIES:
            figures: tuple[Any, ...] = (0, cost, 0.0, 0.0, r.input_tokens, r.output_tokens, 0, 0)
        else:
            figures = (1, cost, r.baseline_cost_usd or 0.0, r.saved_usd or 0.0, r.input_tokens,
                       r.output_tokens, int(r.cache_status[:3] == "hit"), int(r.status >= 400))
        for key in (("total", hour, ""), ("feature", hour, r.feature), ("model", hour, r.model),
                    ("user", hour, r.user), ("tenant", hour, r.tenant),
                    ("strategy", hour, r.strategy)):
            parts.setdefault(key, []).append(figures)
    return [(*key, *(sum(column) for column in zip(*rows, strict=True)))
            for key, rows in sorted(parts.items())]


def insert_sql(table: str) -> str:
    """Adds one row of :func:`aggregate` to the rollups (SQLite and PostgreSQL alike)."""
    values = ", ".join("?" for _ in range(3 + len(FIGURES)))
    update = ", ".join(f"{f} = {table}.{f} + excluded.{f}" for f in FIGURES)
    return (f"INSERT INTO {table} (dim, hour, name, {', '.join(FIGURES)}) VALUES ({values})"
            f" ON CONFLICT (dim, hour, name) DO UPDATE SET {update}")


def upsert_sql(table: str, source: str, dialect: Dialect) -> str:
    """The statement that adds the ledger rows of ``source`` (a table, or a parenthesised
    query with an alias) to the rollups in ``table``. Groups are written in key order, so two
    writers sharing the table never wait for each other in a cycle."""
    hour = ("(CAST(ts AS INTEGER) / 3600) * 3600" if dialect == "sqlite"
            else "CAST(floor(ts / 3600) AS BIGINT) * 3600")
    selects = [f"SELECT 'total' AS dim, {hour} AS hour, '' AS name, {_sums()}"
               f" FROM {source} GROUP BY 2"]
    for dim in DIMENSIONS:
        selects.append(f"SELECT '{dim}', {hour}, COALESCE(\"{dim}\", ''), {_sums()}"
                       f" FROM {source} GROUP BY 2, 3")
    update = ", ".join(f"{f} = {table}.{f} + excluded.{f}" for f in FIGURES)
    return (f"INSERT INTO {table} (dim, hour, name, {', '.join(FIGURES)})"
            f" SELECT * FROM ({' UNION ALL '.join(selects)}) AS batch WHERE true"
            f" ORDER BY 1, 2, 3 ON CONFLICT (dim, hour, name) DO UPDATE SET {update}")


def spend_sql(table: str, dialect: Dialect) -> str:
    """Per bucket start and name, the sums of one dimension's hours in ``[since, until)``;
    parameters: bucket seconds (twice), dimension, since, until."""
    p = "?" if dialect == "sqlite" else "%s"
    size = f"CAST({p} AS {_sql_types(dialect)[0]})"  # an integer division
    sums = ", ".join(f"SUM({f})" for f in FIGURES)
    return (f"SELECT (hour / {size}) * {size} AS start, name, {sums} FROM {table}"
            f" WHERE dim = {p} AND hour >= {p} AND hour < {p} GROUP BY 1, 2 ORDER BY 1, 2")


def window(since: float, until: float, bucket: str) -> tuple[int, int]:
    """The hours a spend query reads: from the start of the bucket ``since`` falls in to the
    end of the hour ``until`` falls in."""
    size = BUCKETS[bucket]
    return math.floor(since / size) * size, math.floor(until / HOUR) * HOUR + HOUR


def spend_params(by: str, since: float, until: float, bucket: str) -> tuple[Any, ...]:
    """The parameters of :func:`spend_sql` (see :func:`window`)."""
    size = BUCKETS[bucket]
    return (size, size, by, *window(since, until, bucket))


@dataclass(frozen=True, slots=True)
class Spend:
    """The answer of a spend query, as ``GET /api/spend`` serves it (timestamps as unix
    seconds): ``series`` per bucket start then name, ``groups`` by cost, highest first."""

    by: str
    bucket: str
    since: float
    until: float
    totals: dict[str, float | int]
    groups: list[dict[str, Any]]
    series: list[dict[str, Any]]


def _figures(row: Sequence[Any]) -> dict[str, float | int]:
    return {f: (int(v or 0) if f in _COUNTS else float(v or 0.0))
            for f, v in zip(FIGURES, row, strict=True)}


def spend_from_rows(
    rows: Iterable[Sequence[Any]], *, by: str, bucket: str, since: float, until: float,
) -> Spend:
    """:class:`Spend` from the rows of :func:`spend_sql`."""
    totals = _figures([0] * len(FIGURES))
    groups: dict[str, dict[str, Any]] = {}
    series = []
    for start, raw_name, *values in rows:
        name = (raw_name or NO_STRATEGY) if by == "strategy" else raw_name
        figures = _figures(values)
        for f in FIGURES:
            totals[f] += figures[f]
        group = groups.setdefault(name, {"name": name, "requests": 0, "cost_usd": 0.0,
                                         "saved_usd": 0.0, "cache_hits": 0})
        for f in ("requests", "cost_usd", "saved_usd", "cache_hits"):
            group[f] += figures[f]
        series.append({"start": float(start), "name": name, "requests": figures["requests"],
                       "cost_usd": figures["cost_usd"], "saved_usd": figures["saved_usd"]})
    ordered = sorted(groups.values(), key=lambda g: (-g["cost_usd"], g["name"]))
    if by == "strategy":  # renamed: "none" sorts elsewhere than ""
        series.sort(key=lambda s: (s["start"], s["name"]))
    start, _ = window(since, until, bucket)
    return Spend(by, bucket, float(start), until, totals, ordered, series)


@runtime_checkable
class SpendSource(Protocol):
    """A ledger that answers the spend API (both blocking: call them from a worker thread)."""

    def spend(self, by: str, since: float, until: float, bucket: str) -> Spend:
        """Spend by ``by`` from ``since`` to ``until`` (unix seconds) per ``bucket``."""
        ...

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` rows, newest first, with the :data:`RECENT_COLUMNS`."""
        ...
