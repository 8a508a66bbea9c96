"""The live alert monitor over a real SQLite ledger, driven by a clock of the test's own: it
fires and resolves as the offline replay does, records each change once however many
processes judge, and delivers webhooks to a real HTTP server, retrying a failure."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from skinflint.alerts import AlertEvent, replay
from skinflint.config import AlertRule, Settings, settings_from_dict
from skinflint.metrics import Metrics
from skinflint.models import LedgerRecord
from skinflint.monitor import AlertMonitor, Webhook, grace
from skinflint.storage.ledger import SQLiteLedger
from skinflint.storage.opener import Storage, open_storage

T0 = 28_333_333 * 60  # a minute's start: window 0 of these tests
RULE = {"name": "feature-spend", "per": "feature", "window": "minute", "baseline_windows": 6,
        "rise": 2.0, "for_windows": 2, "min_usd": 0.05, "resolve_below": 1.3}
#: Spend per window of the feature "search": steady, two windows high, then back.
SEARCH = [0.10] * 10 + [1.00] * 2 + [0.10] * 4


def settings(db: Path, **rule: Any) -> Settings:
    return settings_from_dict({"storage": {"sqlite_path": str(db)},
                               "alerts": [{**RULE, **rule}]}, env={})


def write_ledger(db: Path, spends: Sequence[float], feature: str = "search") -> list[LedgerRecord]:
    rows = [LedgerRecord(f"r{feature}{i}", T0 + i * 60 + 20, feature=feature, cost_usd=usd,
                         model="gpt-4o") for i, usd in enumerate(spends)]
    ledger = SQLiteLedger(str(db))
    for row in rows:
        ledger.record(row)
    ledger.close()
    return rows


def after(window: int) -> float:
    """A moment at which the window ``window`` has ended and been given its grace."""
    return T0 + (window + 1) * 60 + 7


@pytest.fixture
async def storages() -> AsyncIterator[list[Storage]]:
    opened: list[Storage] = []
    yield opened
    for storage in opened:
        await storage.close()


async def monitor(db: Path, storages: list[Storage], sender: Webhook | None = None,
                  **rule: Any) -> AlertMonitor:
    config = settings(db, **rule)
    storage = open_storage(config)
    storages.append(storage)
    return AlertMonitor(config.alerts, await storage.alert_store(), Metrics(), sender)


def sample(m: AlertMonitor, name: str, **labels: str) -> float | None:
    return m.metrics.registry.get_sample_value(name, labels)


async def test_it_fires_and_resolves_as_the_replay_of_the_same_ledger(
    tmp_path: Path, storages: list[Storage], caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "skinflint.db"
    rows = write_ledger(db, SEARCH) + write_ledger(db, [0.10] * len(SEARCH), feature="chat")
    m = await monitor(db, storages)
    seen: list[AlertEvent] = []
    with caplog.at_level(logging.INFO, logger="skinflint.alerts"):
        for window in range(-1, len(SEARCH)):  # once a window, as the clock goes by
            seen += await m.evaluate(after(window))
    fired = AlertEvent("feature-spend", "feature", "search", T0 + 12 * 60, None, 1.0, 0.1)
    resolved = AlertEvent("feature-spend", "feature", "search", T0 + 12 * 60, T0 + 14 * 60,
                          1.0, 0.1)
    assert seen == [fired, resolved]
    points = [(r.ts, {"feature": r.feature, "model": r.model}, r.cost_usd or 0.0) for r in rows]
    assert await m.store.recent(10) == replay(m.rules, points) == [resolved]
    logged = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in logged] == ["WARNING", "INFO"]
    assert logged[0][1].startswith("cost alert feature-spend firing for feature 'search': $1.0")
    assert logged[1][1].startswith("cost alert feature-spend resolved for feature 'search' at")
    assert sample(m, "skinflint_alert_events_total", rule="feature-spend", state="firing") == 1
    assert sample(m, "skinflint_alerts_active", rule="feature-spend") == 0


async def test_each_change_is_recorded_once_by_several_monitors(
    tmp_path: Path, storages: list[Storage]
) -> None:
    db = tmp_path / "skinflint.db"
    write_ledger(db, SEARCH[:12])
    first, second = await monitor(db, storages), await monitor(db, storages)
    fired = await asyncio.gather(first.evaluate(after(11)), second.evaluate(after(11)))
    assert sorted(len(f) for f in fired) == [0, 1]  # one of them recorded and notified
    assert await second.evaluate(after(11) + 30) == []  # judged already: nothing new
    assert len(await first.store.recent(10)) == 1
    for m in (first, second):
        await m.evaluate(after(12))
        assert sample(m, "skinflint_alerts_active", rule="feature-spend") == 1  # the table's
    notified = [sample(m, "skinflint_alert_events_total", rule="feature-spend", state="firing")
                for m in (first, second)]
    assert sorted(n or 0 for n in notified) == [0, 1]


async def test_a_monitor_started_later_catches_up_and_agrees(
    tmp_path: Path, storages: list[Storage]
) -> None:
    db = tmp_path / "skinflint.db"
    write_ledger(db, SEARCH)
    early = await monitor(db, storages)
    assert len(await early.evaluate(after(11))) == 1  # fired
    late = await monitor(db, storages)  # starts after the alert fired: finds it in the table
    resolved = await late.evaluate(after(13))
    assert [(e.start, e.end) for e in resolved] == [(T0 + 12 * 60, T0 + 14 * 60)]
    assert await early.evaluate(after(15)) == []  # the other process recorded it


async def test_nothing_fires_before_the_spend_is_high_for_for_windows(
    tmp_path: Path, storages: list[Storage]
) -> None:
    db = tmp_path / "skinflint.db"
    write_ledger(db, SEARCH[:11])
    m = await monitor(db, storages)
    assert await m.evaluate(after(10)) == []
    assert await m.evaluate(after(10) - 2 * 60) == []  # an earlier time judges nothing again


def test_rounds_come_a_grace_after_each_window() -> None:
    rule = AlertRule(**RULE)
    m = AlertMonitor([rule, AlertRule(**{**RULE, "name": "h", "window": "hour"})],
                     store=None, metrics=Metrics())  # type: ignore[arg-type]
    assert grace(rule) == 6.0
    assert m.next_round(T0 + 30) == T0 + 66
    assert m.next_round(T0 + 3) == T0 + 6  # the window before has not had its grace yet


async def test_the_background_rounds_follow_the_clock(
    tmp_path: Path, storages: list[Storage]
) -> None:
    db = tmp_path / "skinflint.db"
    write_ledger(db, SEARCH)
    clock, delays, done = [T0 + 5 * 60 + 30.0], [], asyncio.Event()

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        clock[0] += seconds
        if clock[0] > after(len(SEARCH)):
            done.set()
            await asyncio.Event().wait()  # until closed

    config = settings(db)
    storage = open_storage(config)
    storages.append(storage)
    m = AlertMonitor(config.alerts, await storage.alert_store(), Metrics(),
                     clock=lambda: clock[0], sleep=sleep)
    m.start()
    await asyncio.wait_for(done.wait(), 10)
    await m.close()
    assert [(e.start, e.end) for e in await m.store.recent(5)] == [(T0 + 720, T0 + 840)]
    assert delays[0] == 36 and set(delays[1:]) == {60}  # each window's end, plus 6 s


class Receiver:
    """A webhook receiver on loopback that fails the first ``fail`` POSTs with ``status``."""

    def __init__(self, fail: int, status: int = 500, delay: float = 0.0) -> None:
        self.fail, self.status, self.delay = fail, status, delay
        self.bodies: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        await asyncio.sleep(self.delay)
        if len(self.bodies) <= self.fail:
            return web.Response(status=self.status)
        return web.Response(status=204)


@pytest.fixture
async def receiver_url() -> AsyncIterator[tuple[str, Receiver]]:
    receiver = Receiver(fail=1)
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/hook?token=secret", receiver
    await runner.cleanup()


async def test_the_webhook_gets_each_change_retried_after_a_failure(
    tmp_path: Path, storages: list[Storage], receiver_url: tuple[str, Receiver],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, receiver = receiver_url
    db = tmp_path / "skinflint.db"
    write_ledger(db, SEARCH)
    async with aiohttp.ClientSession() as session:
        m = await monitor(db, storages, Webhook(session, backoff=0.01), webhook=url)
        await m.evaluate(after(11))
        await m.evaluate(after(13))
        await m.close()  # waits for deliveries in flight
    fired, again, resolved = receiver.bodies
    assert fired == again  # the first answer was a 500; the resolution waited for it
    assert fired["state"] == "firing" and resolved["state"] == "resolved"
    assert {k: fired[k] for k in ("rule", "per", "name", "start", "end", "window")} == {
        "rule": "feature-spend", "per": "feature", "name": "search",
        "start": "2023-11-14T22:25:00Z", "end": None, "window": "minute"}
    assert fired["spend_usd"] == 1.0 and fired["baseline_usd"] == 0.1
    assert "firing for feature 'search'" in fired["text"]
    assert resolved["end"] == "2023-11-14T22:27:00Z"
    assert "secret" not in caplog.text


async def test_a_webhook_never_holds_up_judging_and_gives_up(
    tmp_path: Path, storages: list[Storage], receiver_url: tuple[str, Receiver],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, receiver = receiver_url
    receiver.fail, receiver.delay = 10, 0.3
    db = tmp_path / "skinflint.db"
    write_ledger(db, SEARCH)
    async with aiohttp.ClientSession() as session:
        m = await monitor(db, storages, Webhook(session, attempts=3, backoff=0.01), webhook=url)
        started = time.perf_counter()
        assert len(await m.evaluate(after(11))) == 1
        assert time.perf_counter() - started < 0.3  # the POST runs in the background
        with caplog.at_level(logging.WARNING, logger="skinflint.alerts"):
            await m.close()
    assert len(receiver.bodies) == 3
    assert "alert webhook to 127.0.0.1 not delivered: HTTP 500" in caplog.text
    assert "secret" not in caplog.text


async def test_a_webhook_refusing_the_payload_is_not_retried(
    receiver_url: tuple[str, Receiver],
) -> None:
    url, receiver = receiver_url
    receiver.status = 400
    async with aiohttp.ClientSession() as session:
        assert not await Webhook(session, backoff=0.01).deliver(url, {"text": "x"})
    assert len(receiver.bodies) == 1


async def test_the_alerts_of_a_rule_no_longer_configured_are_resolved_at_start(
    tmp_path: Path, storages: list[Storage]
) -> None:
    """A renamed or removed rule's alert would stay firing for ever; another owner's (the
    shadow guard's) is left alone."""
    db = tmp_path / "skinflint.db"
    write_ledger(db, SEARCH[:1])
    config = settings(db)
    storage = open_storage(config)
    storages.append(storage)
    store = await storage.alert_store()
    for event in (AlertEvent("old-name", "feature", "search", T0, None, 1.0, 0.1),
                  AlertEvent("feature-spend", "feature", "chat", T0, None, 1.0, 0.1),
                  AlertEvent("shadow-guard", "feature", "docs/context", T0, None, 0.0, 0.0)):
        assert await store.fire(event)
    m = AlertMonitor(config.alerts, store, Metrics(), others=("shadow-guard",))
    [retired] = await m.retire(T0 + 600)
    assert (retired.rule, retired.name, retired.end) == ("old-name", "search", T0 + 600)
    assert await store.active() == {"feature-spend": 1, "shadow-guard": 1}
    assert await m.retire(T0 + 900) == []
