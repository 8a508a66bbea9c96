"""The alert store's contract, on the SQLite file and on PostgreSQL (a real server, see
:mod:`tests.pg`): spend per window and scope read from the ledger, and alerts recorded once
whoever records them."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from skinflint.alerts import AlertEvent
from skinflint.config import settings_from_dict
from skinflint.metrics import Metrics
from skinflint.models import ATTEMPT_STRATEGIES, LedgerRecord
from skinflint.monitor import AlertMonitor
from skinflint.storage.alert_store import AlertStore
from skinflint.storage.opener import Storage, open_storage

T0 = 28_333_333 * 60
Opener = Callable[[], Awaitable[Storage]]


@pytest.fixture(params=["sqlite", "postgres"])
async def open_one(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens another storage (another process, as it were) on the same database."""
    storage: dict[str, Any] = {"sqlite_path": str(tmp_path / "skinflint.db")}
    if request.param == "postgres":
        storage["postgres_url"] = request.getfixturevalue("pg_url")
    settings = settings_from_dict({"storage": storage, "alerts": [{
        "name": "spend", "per": "user", "window": "minute", "baseline_windows": 4,
        "for_windows": 2, "rise": 2.0, "min_usd": 0.05, "resolve_below": 1.3}]}, env={})
    opened: list[Storage] = []

    async def one() -> Storage:
        opened.append(open_storage(settings))
        return opened[-1]

    yield one
    for storage_ in opened:
        await storage_.close()


async def write(storage: Storage, rows: list[LedgerRecord]) -> None:
    ledger = await storage.ledger()
    for row in rows:
        ledger.record(row)
    await asyncio.to_thread(ledger.flush)


def row(ts: float, usd: float | None, user: str = "ann", feature: str = "f") -> LedgerRecord:
    return LedgerRecord(f"r{ts}{user}", ts, user=user, feature=feature, cost_usd=usd)


async def test_spend_is_summed_per_window_and_scope(open_one: Opener) -> None:
    storage = await open_one()
    await write(storage, [row(T0 + 1, 0.5), row(T0 + 59, 0.25), row(T0 + 60, 1.0),
                          row(T0 + 61, None), row(T0 + 62, 2.0, user="bob"),
                          row(T0 + 180, 9.0)])
    store = await storage.alert_store()
    w = T0 // 60
    by_user = await store.spend("user", 60, T0, T0 + 180)  # the last row is outside
    assert sorted(by_user) == [(w, "ann", 0.75), (w + 1, "ann", 1.0), (w + 1, "bob", 2.0)]
    assert sorted(await store.spend("global", 60, T0, T0 + 180)) == [(w, "", 0.75),
                                                                       (w + 1, "", 3.0)]
    assert await store.spend("feature", 3600, T0 + 1000, T0 + 2000) == []
    assert await store.first_ts() == T0 + 1


@pytest.mark.parametrize("per", ["global", "tenant", "feature", "model", "user"])
@pytest.mark.parametrize("seconds", [60, 3600, 86400])
async def test_every_window_sums_as_the_rows_do(open_one: Opener, per: str,
                                                 seconds: int) -> None:
    """Hour and day windows are read from the ledger's rollups, minutes from its rows: the
    same sums either way, attempts' cost and unknown costs included."""
    rng = random.Random(seconds)
    start = T0 - T0 % 86400
    rows = [LedgerRecord(f"r{i}", start + rng.uniform(0, 3 * 86400), tenant=rng.choice("ab"),
                         feature=rng.choice("xyz"), model=rng.choice(["m1", "m2"]),
                         user=rng.choice(["ann", "bob", ""]),
                         cost_usd=rng.choice([None, 0.01, 0.5, 2.0]),
                         strategy=rng.choice(["", "cascade", *ATTEMPT_STRATEGIES]))
            for i in range(300)]
    storage = await open_one()
    await write(storage, rows)
    store = await storage.alert_store()
    found = await store.spend(per, seconds, start, start + 2 * 86400)
    expected: dict[tuple[int, str], float] = {}
    for r in rows:
        if r.ts < start + 2 * 86400:
            name = "" if per == "global" else getattr(r, per)
            key = (int(r.ts // seconds), name)
            expected[key] = expected.get(key, 0.0) + (r.cost_usd or 0.0)
    assert {(w, n): pytest.approx(usd) for w, n, usd in found} == expected


def alert(start: float, end: float | None = None, name: str = "ann") -> AlertEvent:
    return AlertEvent("spend", "user", name, start, end, 1.0, 0.1)


async def test_an_alert_is_recorded_once_and_one_per_scope_is_open(open_one: Opener) -> None:
    one, other = [await (await open_one()).alert_store() for _ in range(2)]
    assert await one.first_ts() is None
    fired = await asyncio.gather(one.fire(alert(T0)), other.fire(alert(T0)))
    assert sorted(fired) == [False, True]
    assert not await other.fire(alert(T0 + 60))  # another alert of a scope that fires
    assert await other.fire(alert(T0 + 60, name="bob"))
    assert await one.active() == {"spend": 2}
    assert await one.open_at("spend", "user", T0) == [alert(T0)]
    resolving = [store.resolve(alert(T0 + 60, T0 + 120)) for store in (one, other)]
    resolved = await asyncio.gather(*resolving)
    assert resolved.count(None) == 1
    assert [r for r in resolved if r is not None] == [alert(T0, T0 + 120)]  # as recorded
    assert await one.open_at("spend", "user", T0 + 60) == [alert(T0, T0 + 120),
                                                            alert(T0 + 60, name="bob")]
    assert await one.open_at("spend", "user", T0 + 120) == [alert(T0 + 60, name="bob")]
    assert await one.fire(alert(T0 + 180))  # fires again once resolved
    assert [(e.name, e.start) for e in await other.recent(10)] == [
        ("ann", T0 + 180), ("bob", T0 + 60), ("ann", T0)]
    assert len(await other.recent(1)) == 1


async def test_monitors_on_one_database_record_each_alert_once(open_one: Opener) -> None:
    first = await open_one()
    spends = [0.1] * 6 + [1.0] * 2
    await write(first, [row(T0 + i * 60 + 5, usd) for i, usd in enumerate(spends)])
    monitors = []
    for storage in (first, await open_one()):
        store: AlertStore = await storage.alert_store()
        monitors.append(AlertMonitor(storage.settings.alerts, store, Metrics()))
    now = T0 + len(spends) * 60 + 10
    recorded = await asyncio.gather(*(m.evaluate(now) for m in monitors))
    assert sorted(len(r) for r in recorded) == [0, 1]
    assert [e.start for e in await monitors[0].store.recent(5)] == [now - 10]


async def test_shadow_samples_are_read_in_one_order_and_kept_bounded(
        open_one: Opener, monkeypatch: pytest.MonkeyPatch) -> None:
    """Samples logged by two processes at once are read back by each in the same order,
    every one of them; an operator's re-enable deletes that name's samples before it, and only
    the newest SCORES_KEPT of a name are kept."""
    from skinflint.storage import alert_store

    one, two = await (await open_one()).alert_store(), await (await open_one()).alert_store()

    async def log(store: AlertStore, name: str) -> None:
        for i in range(20):
            await store.add_score(name, i / 20, 0.9, 20)

    await asyncio.gather(log(one, "f/context"), log(two, "f/history"))
    seen = await one.scores_after(0, 1000)
    assert seen == await two.scores_after(0, 1000)
    assert [s[0] for s in seen] == sorted(s[0] for s in seen) and len(seen) == 40
    for name in ("f/context", "f/history"):  # each process's own, in the order it logged them
        assert [s[2] for s in seen if s[1] == name] == [i / 20 for i in range(20)]
    assert await one.scores_after(seen[9][0], 5) == seen[10:15]
    await one.add_score("f/context", None, 0.0, 0)  # an operator's re-enable: a mark
    left = await two.scores_after(0, 1000)
    assert [s[1:] for s in left if s[1] == "f/context"] == [("f/context", None, 0.0, 0)]
    assert [s for s in left if s[1] == "f/history"] == [s for s in seen if s[1] == "f/history"]
    monkeypatch.setattr(alert_store, "SCORES_KEPT", 5)
    monkeypatch.setattr(alert_store, "TRIM_EVERY", 1)  # trimmed at every sample
    await two.add_score("f/history", 1.0, 0.9, 20)
    kept = await one.scores_after(0, 1000)
    assert len([s for s in kept if s[1] == "f/history"]) == 5
    assert len([s for s in kept if s[1] == "f/context"]) == 1  # another name's: as it was
