"""Spend rollups of the ledger, per hour and per day, shared by its SQLite and PostgreSQL
tables.

Beside the ledger's rows, two tables (``<ledger>_rollup`` per hour, ``<ledger>_rollup_day``
per UTC day; ``start`` is the bucket's first second, unix time) hold per dimension
(``tenant``, ``feature``, ``model``, ``user``, ``strategy``, and ``total``) and per name in
it the sums the spend API answers from: client ``requests`` (attempt rows, see
:func:`skinflint.models.is_attempt`, count cost and tokens but are not requests), cost,
baseline, saving, tokens, cache hits and errors (those three of client requests only, as the
report counts them). A day row is the sum of its 24 hour rows: kept apart so that a month of
5,000 users reads 150,000 rows, not 700,000; an index of the day table in name order (figures
included) lets a window of most of the history sum each name without a sort.

The ledger keeps them in the transaction that writes its rows: SQLite adds what
:func:`aggregate` sums in Python (:func:`insert_sql`), which costs a third of what grouping
the new rows in SQL does; PostgreSQL groups the batch it COPYed with :func:`upsert_sql`. That
statement, over a whole table, builds the rollups of a ledger made before them, once
(:func:`create_statements`). The tests hold both ways to the report's own count of the rows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Literal

from skinflint.models import ATTEMPT_STRATEGIES, LedgerRecord

__all__ = [
    "BUCKETS",
    "DAY",
    "DIMENSIONS",
    "FIGURES",
    "HOUR",
    "RECENT_COLUMNS",
    "aggregate",
    "by_day",
    "by_name",
    "create_statements",
    "insert_sql",
    "table_for",
    "upsert_sql",
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
COUNTS = frozenset({"requests", "input_tokens", "output_tokens", "cache_hits", "errors"})
#: The ledger columns of ``GET /api/requests``, in its order.
RECENT_COLUMNS = ("request_id", "ts", "tenant", "feature", "user", "model", "route",
                  "cache_status", "strategy", "cost_usd", "saved_usd", "status", "latency_ms")

Row = tuple[Any, ...]  # dim, start, name, then the FIGURES


def by_name(table: str) -> str:
    """The index of a day rollups table in name order (its groups' figures included)."""
    return f"{table}_by_name"


def table_for(ledger: str, bucket: str) -> str:
    """The rollups table of ``ledger`` (its table's name) for ``bucket``."""
    return f"{ledger}_rollup" if bucket == "hour" else f"{ledger}_rollup_day"


def _sql_types(dialect: Dialect) -> tuple[str, str]:
    return ("INTEGER", "REAL") if dialect == "sqlite" else ("BIGINT", "DOUBLE PRECISION")


def _schema(table: str, dialect: Dialect) -> str:
    integer, real = _sql_types(dialect)
    columns = ", ".join(
        f"{f} {integer if f in COUNTS else real} NOT NULL DEFAULT 0" for f in FIGURES)
    tail = " WITHOUT ROWID" if dialect == "sqlite" else ""
    return (f"CREATE TABLE IF NOT EXISTS {table} (dim TEXT NOT NULL, start {integer} NOT NULL,"
            f" name TEXT NOT NULL, {columns}, PRIMARY KEY (dim, start, name)){tail}")


def create_statements(ledger: str, dialect: Dialect, have: set[str]) -> list[str]:
    """What creates the rollups tables of ``ledger`` missing from ``have`` (the tables there
    are) and fills them from the ledger's rows: the hours from the rows, the days from the
    hours. Run in the transaction that creates the ledger's table."""
    hourly, daily = table_for(ledger, "hour"), table_for(ledger, "day")
    statements = []
    if hourly not in have:
        statements += [_schema(hourly, dialect), upsert_sql(hourly, ledger, dialect, HOUR)]
    if daily not in have:
        sums = ", ".join(f"SUM({f})" for f in FIGURES)
        statements += [_schema(daily, dialect),
                       f"INSERT INTO {daily} (dim, start, name, {', '.join(FIGURES)})"
                       f" SELECT dim, (start / {DAY}) * {DAY}, name, {sums} FROM {hourly}"
                       " GROUP BY 1, 2, 3"]
    # each name's days in a row: a month of 5,000 users summed without a sort
    return [*statements, f"CREATE INDEX IF NOT EXISTS {by_name(daily)} ON {daily}"
            " (dim, name, start, requests, cost_usd, saved_usd, cache_hits)"]


def aggregate(records: Iterable[LedgerRecord]) -> list[Row]:
    """The hourly rollup rows of ``records``, as :func:`upsert_sql` sums them."""
    parts: defaultdict[tuple[str, int, str], list[Row]] = defaultdict(list)
    for r in records:
        hour = int(r.ts // HOUR) * HOUR
        cost = r.cost_usd or 0.0
        if r.strategy in ATTEMPT_STRATEGIES:
            figures: Row = (0, cost, 0.0, 0.0, r.input_tokens, r.output_tokens, 0, 0)
        else:
            figures = (1, cost, r.baseline_cost_usd or 0.0, r.saved_usd or 0.0, r.input_tokens,
                       r.output_tokens, int(r.cache_status[:3] == "hit"), int(r.status >= 400))
        parts["total", hour, ""].append(figures)
        parts["feature", hour, r.feature].append(figures)
        parts["model", hour, r.model].append(figures)
        parts["user", hour, r.user].append(figures)
        parts["tenant", hour, r.tenant].append(figures)
        parts["strategy", hour, r.strategy].append(figures)
    return [(*key, *rows[0]) if len(rows) == 1 else
            (*key, *(sum(column) for column in zip(*rows, strict=True)))
            for key, rows in parts.items()]


def by_day(hours: list[Row]) -> list[Row]:
    """Hourly rollup rows summed per UTC day."""
    days: dict[tuple[str, int, str], list[Any]] = {}
    for dim, start, name, *figures in hours:
        key = (dim, start // DAY * DAY, name)
        total = days.get(key)
        if total is None:
            days[key] = figures
        else:
            for i, value in enumerate(figures):
                total[i] += value
    return [(*key, *figures) for key, figures in days.items()]


def insert_sql(table: str) -> str:
    """Adds one row of :func:`aggregate` or :func:`by_day` to ``table`` (SQLite)."""
    values = ", ".join("?" for _ in range(3 + len(FIGURES)))
    update = ", ".join(f"{f} = {table}.{f} + excluded.{f}" for f in FIGURES)
    return (f"INSERT INTO {table} (dim, start, name, {', '.join(FIGURES)}) VALUES ({values})"
            f" ON CONFLICT (dim, start, name) DO UPDATE SET {update}")


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


def upsert_sql(table: str, source: str, dialect: Dialect, size: int) -> str:
    """The statement that adds the ledger rows of ``source`` (a table) to the rollups in
    ``table``, of buckets of ``size`` seconds. Groups are written in key order, so two writers
    sharing the table never wait for each other in a cycle."""
    start = (f"(CAST(ts AS INTEGER) / {size}) * {size}" if dialect == "sqlite"
             else f"CAST(floor(ts / {size}) AS BIGINT) * {size}")
    selects = [f"SELECT 'total' AS dim, {start} AS start, '' AS name, {_sums()}"
               f" FROM {source} GROUP BY 2"]
    for dim in DIMENSIONS:
        selects.append(f"SELECT '{dim}', {start}, COALESCE(\"{dim}\", ''), {_sums()}"
                       f" FROM {source} GROUP BY 2, 3")
    update = ", ".join(f"{f} = {table}.{f} + excluded.{f}" for f in FIGURES)
    return (f"INSERT INTO {table} (dim, start, name, {', '.join(FIGURES)})"
            f" SELECT * FROM ({' UNION ALL '.join(selects)}) AS batch WHERE true"
            f" ORDER BY 1, 2, 3 ON CONFLICT (dim, start, name) DO UPDATE SET {update}")
