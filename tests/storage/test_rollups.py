"""The ledger's spend rollups per hour and per day, in SQLite and PostgreSQL: written with the
rows (spilled rows too), built once for a ledger made before them, and always equal to the
report's own count of the raw rows, attempt rows included; the spend query's day is the sum of
its hours, and its series names the costliest groups and sums the others."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from skinflint.analytics.report import Group
from skinflint.models import CASCADE_ATTEMPT, LedgerRecord
from skinflint.storage.ledger import SQLiteLedger
from skinflint.storage.rollup import DIMENSIONS, FIGURES
from skinflint.storage.spend import OTHER, SERIES_TOP
from skinflint.storage.spill import LedgerSpill
from tests import pg

NOW = 1_790_000_000.0  # a fixed instant, so the hours are the same at every run
Key = tuple[str, int, str]


def random_rows(n: int, seed: int, *, prefix: str = "r") -> list[LedgerRecord]:
    """Rows over three days: cache hits, errors, unknown costs, and cascade attempts (a
    request id ``<id>.1``) beside the requests they were made for."""
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        attempt = rnd.random() < 0.2
        rows.append(LedgerRecord(
            f"{prefix}{i}.1" if attempt else f"{prefix}{i}",
            NOW - rnd.uniform(0, 3 * 86400),
            tenant=rnd.choice(["default", "acme"]),
            feature=rnd.choice(["", "chat", "search", "it's"]),
            user=rnd.choice(["", "u1", "u2", "u3"]),
            model=rnd.choice(["gpt-4o", "gpt-4o-mini"]),
            input_tokens=rnd.randrange(1000),
            output_tokens=rnd.randrange(500),
            cost_usd=None if rnd.random() < 0.05 else rnd.uniform(0, 0.01),
            baseline_cost_usd=0.0 if attempt else rnd.uniform(0, 0.02),
            saved_usd=0.0 if attempt else rnd.uniform(-0.001, 0.01),
            cache_status="miss" if attempt else rnd.choice(["miss", "hit-exact",
                                                            "hit-semantic", "bypass"]),
            strategy=CASCADE_ATTEMPT if attempt else rnd.choice(
                ["", "exact_cache", "route", "cascade"]),
            status=rnd.choice([200, 200, 200, 429, 502]),
        ))
    return rows


def recomputed(rows: list[LedgerRecord], size: int = 3600) -> dict[Key, tuple[Any, ...]]:
    """The rollups of buckets of ``size`` seconds as the report's :class:`Group` counts the
    raw rows."""
    groups: dict[Key, Group] = {}
    for r in rows:
        hour = int(r.ts // size) * size
        for dim in ("total", *DIMENSIONS):
            name = "" if dim == "total" else getattr(r, dim)
            groups.setdefault((dim, hour, name), Group(name)).add(r)
    return {k: tuple(getattr(g, f) for f in FIGURES) for k, g in groups.items()}


def assert_same(stored: dict[Key, tuple[Any, ...]], expected: dict[Key, tuple[Any, ...]]) -> None:
    assert stored.keys() == expected.keys()
    for key, figures in expected.items():
        assert stored[key] == pytest.approx(figures, abs=1e-9), key


def assert_rollups(db: Path, rows: list[LedgerRecord]) -> None:
    assert_same(sqlite_rollups(db, "ledger_rollup"), recomputed(rows))
    assert_same(sqlite_rollups(db, "ledger_rollup_day"), recomputed(rows, 86400))


def sqlite_rollups(db: Path, table: str) -> dict[Key, tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(f"SELECT dim, start, name, {', '.join(FIGURES)} FROM {table}")
        return {(d, h, n): tuple(rest) for d, h, n, *rest in rows}
    finally:
        conn.close()


@pytest.fixture
def sqlite_ledger(tmp_path: Path) -> Iterator[Callable[..., SQLiteLedger]]:
    opened: list[SQLiteLedger] = []

    def open_(**kw: Any) -> SQLiteLedger:
        opened.append(SQLiteLedger(str(tmp_path / "l.db"), flush_interval=60, **kw))
        return opened[-1]

    yield open_
    for ledger in opened:
        ledger.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sqlite_rollups_equal_the_rows_recounted(
    sqlite_ledger: Callable[..., SQLiteLedger], tmp_path: Path, seed: int
) -> None:
    rows = random_rows(600, seed)
    ledger = sqlite_ledger()
    for start in range(0, len(rows), 97):  # several write transactions into the same hours
        for r in rows[start:start + 97]:
            ledger.record(r)
        ledger.flush()
    assert_rollups(tmp_path / "l.db", rows)


def test_spilled_rows_reach_the_rollups(
    sqlite_ledger: Callable[..., SQLiteLedger], tmp_path: Path
) -> None:
    spilled, live = random_rows(50, 7, prefix="s"), random_rows(50, 8)
    LedgerSpill(tmp_path / "spill.jsonl").save(spilled)  # left by an earlier process
    ledger = sqlite_ledger(spill=tmp_path / "spill.jsonl")
    for r in live:
        ledger.record(r)
    ledger.flush()
    assert len(list(ledger.query())) == 100
    assert_rollups(tmp_path / "l.db", spilled + live)


def old_sqlite_ledger(db: Path, rows: list[LedgerRecord]) -> None:
    """A ledger file as a version without rollups left it."""
    names = [f.name for f in fields(LedgerRecord)]
    conn = sqlite3.connect(db)
    conn.execute(f"CREATE TABLE ledger ({', '.join(names)})")
    conn.executemany(f"INSERT INTO ledger VALUES ({', '.join('?' * len(names))})",
                     [tuple(getattr(r, n) for n in names) for r in rows])
    conn.commit()
    conn.close()


def test_an_old_sqlite_ledger_gets_its_rollups_once(
    sqlite_ledger: Callable[..., SQLiteLedger], tmp_path: Path
) -> None:
    old, new = random_rows(400, 4, prefix="o"), random_rows(100, 5)
    old_sqlite_ledger(tmp_path / "l.db", old)
    sqlite_ledger().close()  # built here
    ledger = sqlite_ledger()  # and not again here
    for r in new:
        ledger.record(r)
    ledger.flush()
    assert_rollups(tmp_path / "l.db", old + new)


def test_a_day_is_the_sum_of_its_utc_hours(sqlite_ledger: Callable[..., SQLiteLedger]) -> None:
    rows = random_rows(500, 6)
    ledger = sqlite_ledger()
    for r in rows:
        ledger.record(r)
    ledger.flush()
    since = NOW - 2 * 86400
    spend = ledger.spend("feature", since, NOW, "day")
    day_start = since // 86400 * 86400
    assert spend.since == day_start and spend.until == NOW
    kept = [r for r in rows if r.ts >= day_start]
    by_day: dict[tuple[float, str], Group] = {}
    for r in kept:
        by_day.setdefault((r.ts // 86400 * 86400, r.feature), Group(r.feature)).add(r)
    assert [(s["start"], s["name"]) for s in spend.series] == sorted(by_day)
    for s in spend.series:
        g = by_day[s["start"], s["name"]]
        assert (s["requests"], s["cost_usd"]) == (g.requests, pytest.approx(g.cost_usd))
    total = Group("total")
    for r in kept:
        total.add(r)
    assert spend.totals == pytest.approx({f: getattr(total, f) for f in FIGURES})
    assert sum(g["cost_usd"] for g in spend.groups) == pytest.approx(total.cost_usd)
    costs = [g["cost_usd"] for g in spend.groups]
    assert costs == sorted(costs, reverse=True)
    hours = ledger.spend("feature", since, NOW, "hour")
    assert hours.since == since // 3600 * 3600 and hours.totals["requests"] <= total.requests


def test_strategy_names_none_for_a_plain_call(sqlite_ledger: Callable[..., SQLiteLedger]) -> None:
    ledger = sqlite_ledger()
    ledger.record(LedgerRecord("a", NOW, strategy="", cost_usd=0.5))
    ledger.record(LedgerRecord("b", NOW, strategy="exact_cache", cost_usd=0.0,
                               cache_status="hit-exact"))
    ledger.flush()
    spend = ledger.spend("strategy", NOW - 3600, NOW, "hour")
    assert [(g["name"], g["requests"], g["cache_hits"]) for g in spend.groups] == [
        ("none", 1, 0), ("exact_cache", 1, 1)]
    recent = ledger.recent(1)
    assert [r["request_id"] for r in recent] in (["a"], ["b"])  # the same instant


# ---- PostgreSQL


def pg_rollups(url: str, table: str) -> dict[Key, tuple[Any, ...]]:
    psycopg = pg.import_or_skip("psycopg")
    with psycopg.connect(url) as conn:
        rows = conn.execute(f"SELECT dim, start, name, {', '.join(FIGURES)} FROM {table}")
        return {(d, int(h), n): tuple(rest) for d, h, n, *rest in rows}


def test_postgres_rollups_equal_the_rows_recounted_and_old_ledgers_get_them(
    pg_url: str, tmp_path: Path
) -> None:
    psycopg = pg.import_or_skip("psycopg")
    from skinflint.storage.pg_ledger import PostgresLedger

    old, new, spilled = (random_rows(300, 9, prefix="o"), random_rows(300, 10),
                         random_rows(40, 11, prefix="s"))
    first = PostgresLedger(pg_url, flush_interval=60)
    for r in old:
        first.record(r)
    first.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:  # as a version before rollups
        conn.execute("DROP TABLE skinflint_ledger_rollup, skinflint_ledger_rollup_day")
    LedgerSpill(tmp_path / "spill.jsonl").save(spilled)
    ledger = PostgresLedger(pg_url, flush_interval=60, spill=tmp_path / "spill.jsonl")
    try:
        for start in range(0, len(new), 77):
            for r in new[start:start + 77]:
                ledger.record(r)
            ledger.flush()
        everything = old + spilled + new
        assert_same(pg_rollups(pg_url, "skinflint_ledger_rollup"), recomputed(everything))
        assert_same(pg_rollups(pg_url, "skinflint_ledger_rollup_day"),
                    recomputed(everything, 86400))
        spend = ledger.spend("user", NOW - 86400, NOW, "day")
        recent = ledger.recent(3)
    finally:
        ledger.close()
    kept = [r for r in old + spilled + new if r.ts >= spend.since]
    assert spend.totals["requests"] == sum(r.strategy != CASCADE_ATTEMPT for r in kept)
    assert spend.totals["cost_usd"] == pytest.approx(sum(r.cost_usd or 0 for r in kept))
    newest = sorted(old + spilled + new, key=lambda r: -r.ts)[:3]
    assert [r["request_id"] for r in recent] == [r.request_id for r in newest]


def test_an_sqlite_ledger_with_hours_only_gets_its_days(
    sqlite_ledger: Callable[..., SQLiteLedger], tmp_path: Path
) -> None:
    rows = random_rows(300, 12)
    ledger = sqlite_ledger()
    for r in rows:
        ledger.record(r)
    ledger.close()
    conn = sqlite3.connect(tmp_path / "l.db")
    conn.execute("DROP TABLE ledger_rollup_day")
    conn.commit()
    conn.close()
    sqlite_ledger().flush()
    assert_rollups(tmp_path / "l.db", rows)


def test_series_names_the_costliest_groups_and_sums_the_others(
    sqlite_ledger: Callable[..., SQLiteLedger]
) -> None:
    rnd = random.Random(5)
    rows = [LedgerRecord(f"r{i}", NOW - rnd.uniform(0, 3 * 86400), user=f"user-{i % 60}",
                         cost_usd=rnd.uniform(0, 1), saved_usd=rnd.uniform(0, 0.1),
                         strategy=CASCADE_ATTEMPT if i % 7 == 0 else "")
            for i in range(900)]
    ledger = sqlite_ledger()
    for r in rows:
        ledger.record(r)
    ledger.flush()
    for bucket, size in (("hour", 3600), ("day", 86400)):
        spend = ledger.spend("user", NOW - 3 * 86400, NOW, bucket)
        assert len(spend.groups) == 60
        top = [g["name"] for g in spend.groups[:SERIES_TOP]]
        assert {s["name"] for s in spend.series} == {*top, OTHER}
        kept = [r for r in rows if r.ts >= spend.since]
        for start in {int(r.ts // size) * size for r in kept}:
            points = {s["name"]: s for s in spend.series if s["start"] == start}
            mine = [r for r in kept if int(r.ts // size) * size == start]
            others = [r for r in mine if r.user not in top]
            other = points.get(OTHER, {"cost_usd": 0.0, "requests": 0})  # none: all on top
            assert other["cost_usd"] == pytest.approx(sum(r.cost_usd or 0 for r in others))
            assert other["requests"] == sum(r.strategy == "" for r in others)
            assert sum(p["requests"] for p in points.values()) == sum(
                r.strategy == "" for r in mine)
        assert [(s["start"], s["name"]) for s in spend.series] == sorted(
            (s["start"], s["name"]) for s in spend.series)


@pytest.mark.parametrize("days", [3, 10, 40])  # a short window of a long history, and a long one
def test_day_groups_are_the_same_whatever_the_window(
    sqlite_ledger: Callable[..., SQLiteLedger], days: int
) -> None:
    rnd = random.Random(days)
    rows = [LedgerRecord(f"r{i}", NOW - rnd.uniform(0, 40 * 86400), user=f"u{i % 30}",
                         cost_usd=rnd.uniform(0, 1)) for i in range(600)]
    ledger = sqlite_ledger()
    for r in rows:
        ledger.record(r)
    ledger.flush()
    spend = ledger.spend("user", NOW - days * 86400, NOW, "day")
    by_user: dict[str, Group] = {}
    for r in rows:
        if r.ts >= spend.since:
            by_user.setdefault(r.user, Group(r.user)).add(r)
    assert {g["name"]: (g["requests"], pytest.approx(g["cost_usd"])) for g in spend.groups} == {
        u: (g.requests, g.cost_usd) for u, g in by_user.items()}
