"""Retention and the job metrics in the batch service, against the real SQLite job store and
the fake upstream's batch API, with the service's clock driven by the test: the lease holder
deletes what ended more than ``keep_days`` ago, in the background, and nothing else; a process
without the lease deletes nothing; the waiting gauge follows each round."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from skinflint.config import BatchingConfig
from skinflint.interfaces import ProviderBatch, Purged, StoredFile
from skinflint.jobs import BatchService, Settler
from skinflint.jobs.service import IDLE_TICK
from skinflint.metrics import Metrics
from skinflint.pricing import PriceCatalog
from skinflint.providers.http import new_session
from skinflint.providers.openai_compat import OpenAICompatProvider
from skinflint.storage.ledger import MemoryLedger
from skinflint.storage.sqlite_jobs import SQLiteJobStore
from tests.fake_upstream import FakeUpstream
from tests.jobs.test_service import job

DAY = 86_400.0


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Parts:
    def __init__(self, store: SQLiteJobStore, clock: Clock, metrics: Metrics,
                 services: list[BatchService], settler: Settler,
                 provider: OpenAICompatProvider) -> None:
        self.store, self.clock, self.metrics = store, clock, metrics
        self.services, self.settler, self.provider = services, settler, provider

    def service(self, metrics: Metrics | None = None) -> BatchService:
        config = BatchingConfig(window_seconds=0, poll_seconds=0.01, keep_days=7)
        made = BatchService(self.store, {"fake": self.provider}, config, self.settler,
                            timeouts={"fake": 5}, clock=self.clock,
                            metrics=metrics or self.metrics)
        self.services.append(made)
        return made

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


@pytest.fixture
async def parts(fake: FakeUpstream, tmp_path: Path) -> AsyncIterator[Parts]:
    session = new_session()
    provider = OpenAICompatProvider("fake", base_url=fake.base_url, api_key="sk-x",
                                    session=session)
    store = await asyncio.to_thread(SQLiteJobStore, str(tmp_path / "jobs.db"))
    clock, metrics = Clock(), Metrics()
    settler = Settler(store, ledger=MemoryLedger(), catalog=PriceCatalog(),
                      batch_price=lambda p, m, u: 0.0, providers={"fake": provider},
                      timeouts={"fake": 5}, on_failure="fail", clock=clock, metrics=metrics)
    services: list[BatchService] = []
    yield Parts(store, clock, metrics, services, settler, provider)
    for service in services:
        await service.close()
    await store.close()
    await session.close()


async def _until(check: object, service: BatchService, clock: Clock,
                 rounds: int = 100) -> None:
    """Run rounds, a second apart on the service's clock, until ``check()``."""
    assert callable(check)
    for _ in range(rounds):
        clock.now += 1
        await service.round()
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("not reached")


async def test_the_lease_holder_deletes_only_what_ended_past_keep_days(
        parts: Parts) -> None:
    holder = parts.service()
    now = parts.clock.now
    waiting = job(9, now)
    waiting.provider_model = waiting.requested_model = "gpt-4o"
    waiting.due = now + 100 * DAY  # never due in this test: it stays queued
    await parts.store.enqueue([job(1, now), job(2, now), waiting])

    async def answered() -> bool:
        found = [await parts.store.get(f"job_00{i}") for i in (1, 2)]
        return all(j is not None and j.state == "completed" for j in found)

    await _until(answered, holder, parts.clock)
    assert parts.sample("skinflint_jobs_finished_total", outcome="completed") == 2
    assert parts.sample("skinflint_jobs_waiting", state="queued") == 1
    assert parts.sample("skinflint_jobs_waiting", state="submitted") == 0

    parts.clock.now += 6 * DAY  # not old enough yet
    assert await holder.purge() == Purged()
    parts.clock.now += 2 * DAY
    assert await parts.store.lease(holder.owner, 30, parts.clock.now)  # renewed meanwhile
    other = parts.service(Metrics())  # another process: it does not hold the lease
    await other.round()
    assert not other.leading and await other.purge() == Purged()
    assert await parts.store.get("job_001") is not None

    async def purged() -> bool:  # the holder's round starts the purge in the background
        return await parts.store.get("job_001") is None

    await _until(purged, holder, parts.clock)
    assert await parts.store.get("job_002") is None
    kept = await parts.store.get("job_009")
    assert kept is not None and kept.state == "queued"  # 8 days old, but not finished
    assert parts.sample("skinflint_jobs_purged_total", kind="job") == 2
    assert parts.sample("skinflint_jobs_purged_total", kind="provider_batch") == 1
    assert parts.sample("skinflint_jobs_waiting", state="queued") == 1


async def test_a_process_that_loses_the_lease_stops_showing_the_gauge(parts: Parts) -> None:
    holder = parts.service()
    await parts.store.enqueue([job(1, parts.clock.now + DAY)])
    await holder.round()
    assert parts.sample("skinflint_jobs_waiting", state="queued") == 1
    await parts.store.release(holder.owner)
    assert await parts.store.lease("someone-else", 60, parts.clock.now)
    await holder.round()
    assert not holder.leading
    assert parts.sample("skinflint_jobs_waiting", state="queued") is None



async def test_without_a_batch_api_leftover_jobs_are_settled_and_purged(parts: Parts) -> None:
    """A configuration whose providers have no batch API (any more): the service still runs,
    seldom; the jobs an earlier one left fail (queued, or in a batch sent before), and what
    ended is purged, uploads too."""
    config = BatchingConfig(window_seconds=0, poll_seconds=0.01, keep_days=7)
    idle = BatchService(parts.store, {}, config, parts.settler, timeouts={},
                        clock=parts.clock, metrics=parts.metrics)
    parts.services.append(idle)
    assert idle.tick == IDLE_TICK
    now = parts.clock.now
    await parts.store.put_file(StoredFile("file-old", "t1", "f", "u", "batch", "a.jsonl",
                                          b"{}", now - 30 * DAY))
    await parts.store.enqueue([job(1, now), job(2, now)])
    sent = ProviderBatch("pb_sent", "fake", "gpt-4o-mini", "", now)
    assert [j.id for j in await parts.store.claim(sent, 1)] == ["job_001"]
    await parts.store.submitted("pb_sent", "batch_abc")
    idle.start()  # the first round runs at once

    async def failed() -> bool:
        found = [await parts.store.get(f"job_00{i}") for i in (1, 2)]
        return all(j is not None and j.state == "failed" for j in found)

    for _ in range(200):
        if await failed():
            break
        await asyncio.sleep(0.01)
    assert await failed()
    for i in (1, 2):
        found = await parts.store.get(f"job_00{i}")
        assert found is not None and found.message == "fake has no batch API"
    assert await parts.store.unfinished() == []
    assert await parts.store.get_file("file-old") is None  # purged by that first round
    parts.clock.now += 8 * DAY
    assert (await idle.purge()).jobs == 2
