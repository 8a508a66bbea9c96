"""The batch service's bookkeeping against the real job store and the fake upstream's batch API
(through the real OpenAI-compatible provider): a batch written but not known to be sent when
the process stopped is sent again, with a warning; a batch the provider refuses fails its jobs;
one it cannot reach goes back to the queue."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from skinflint.config import BatchingConfig
from skinflint.interfaces import Job, ProviderBatch
from skinflint.jobs import BatchService, Settler
from skinflint.jobs.service import dead_here
from skinflint.models import BatchOutcome
from skinflint.pricing import PriceCatalog
from skinflint.providers.http import new_session
from skinflint.providers.openai_compat import OpenAICompatProvider
from skinflint.storage.ledger import MemoryLedger
from skinflint.storage.sqlite_jobs import SQLiteJobStore
from tests.fake_upstream import FakeUpstream


def job(i: int, now: float) -> Job:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"item {i}"}]}
    return Job(f"job_{i:03d}", "default", "f", "", f"req{i}", "gpt-4o-mini", "fake",
               "gpt-4o-mini", orjson.dumps(body), now, now)


class Parts:
    def __init__(self, store: SQLiteJobStore, service: BatchService, ledger: MemoryLedger):
        self.store, self.service, self.ledger = store, service, ledger


@pytest.fixture
async def parts(fake: FakeUpstream, tmp_path: Path) -> AsyncIterator[Parts]:
    session = new_session()
    provider = OpenAICompatProvider("fake", base_url=fake.base_url, api_key="sk-x",
                                    session=session)
    store = await asyncio.to_thread(SQLiteJobStore, str(tmp_path / "jobs.db"))
    ledger = MemoryLedger()
    config = BatchingConfig(window_seconds=0, poll_seconds=0.01, on_failure="fail")
    settler = Settler(store, ledger=ledger, catalog=PriceCatalog(),
                      batch_price=lambda p, m, u: 0.0, providers={"fake": provider},
                      timeouts={"fake": 5}, on_failure="fail", clock=time.time)
    service = BatchService(store, {"fake": provider}, config, settler, timeouts={"fake": 5})
    yield Parts(store, service, ledger)
    await service.close()
    await store.close()
    await session.close()


async def _until_finished(parts: Parts, rounds: int = 20) -> None:
    for _ in range(rounds):
        await parts.service.round()
        if not await parts.store.unfinished() and not await parts.store.queued():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the jobs did not finish")


async def test_a_batch_not_known_to_be_sent_is_sent_again_with_a_warning(
        parts: Parts, fake: FakeUpstream, caplog: pytest.LogCaptureFixture) -> None:
    now = time.time()
    await parts.store.enqueue([job(i, now) for i in range(3)])
    await parts.store.claim(ProviderBatch("pb_lost", "fake", "gpt-4o-mini", "", now), 10)
    with caplog.at_level(logging.WARNING, "skinflint.batches"):
        await _until_finished(parts)
    assert "was being sent when the gateway stopped" in caplog.text
    assert fake.batches.submitted == 3
    done = [await parts.store.get(f"job_{i:03d}") for i in range(3)]
    assert [j.state for j in done if j is not None] == ["completed"] * 3
    assert sorted(r.request_id for r in parts.ledger.records) == ["req0", "req1", "req2"]


async def test_results_are_recorded_once_whoever_polls_again(
        parts: Parts, fake: FakeUpstream) -> None:
    now = time.time()
    await parts.store.enqueue([job(1, now)])
    await _until_finished(parts)
    (batch_id,) = fake.batches.batch_ids()
    stale = await parts.store.get("job_001")
    assert stale is not None and stale.state == "completed"
    stale.state = "submitted"  # as a poller that read it before the results were recorded
    api = parts.service.batch_api("fake")
    assert api is not None
    outcomes = await api.batch_results(batch_id, 5)
    again = await parts.service.settler.settle([stale], outcomes)
    assert again == [] and len(parts.ledger.records) == 1


async def test_an_unreachable_provider_gives_the_jobs_back(
        parts: Parts, fake: FakeUpstream, tmp_path: Path) -> None:
    session = new_session()
    dead = OpenAICompatProvider("fake", base_url="http://127.0.0.1:9/v1", api_key="sk-x",
                                session=session)
    service = BatchService(parts.store, {"fake": dead}, parts.service.config,
                           parts.service.settler, timeouts={"fake": 2})
    try:
        await parts.store.enqueue([job(1, time.time())])
        await service.round()
        assert [g.jobs for g in await parts.store.queued()] == [1]
        assert await parts.store.unfinished() == []
    finally:
        await service.close()
        await session.close()


def test_a_dead_lease_holder_is_told_by_host_and_pid() -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = socket.gethostname()
    assert dead_here(f"{host}:{gone}:ab12")
    assert not dead_here(f"{host}:{os.getppid()}:ab12")  # alive
    assert not dead_here(f"{host}:{os.getpid()}:ab12")  # this very process
    assert not dead_here(f"another-{host}:{gone}:ab12")  # another machine's: unknown
    assert not dead_here("garbage")


async def test_a_real_time_retry_cut_short_by_a_stop_is_not_asked_again(
        parts: Parts, fake: FakeUpstream) -> None:
    """The process stops while a failed line is retried in real time: the provider may have
    answered (and billed) it, so whoever settles the batch next fails the job, ledgered at an
    unknown cost, instead of asking a second time."""
    now = time.time()
    await parts.store.enqueue([job(1, now)])
    await parts.store.claim(ProviderBatch("pb_1", "fake", "gpt-4o-mini", "", now), 10)
    failed = [BatchOutcome("job_001", error="failed", message="server_error")]

    def settler() -> Settler:
        provider = parts.service.batch_api("fake")
        assert isinstance(provider, OpenAICompatProvider)
        return Settler(parts.store, ledger=parts.ledger, catalog=PriceCatalog(),
                       batch_price=lambda p, m, u: 0.0, providers={"fake": provider},
                       timeouts={"fake": 5}, on_failure="realtime", clock=time.time)

    fake.fail_next("delay=3")
    first = asyncio.ensure_future(settler().settle(await parts.store.batch_jobs("pb_1"), failed))
    deadline = time.monotonic() + 5
    while not fake.calls("/v1/chat/completions"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    first.cancel()  # the process stops mid-call
    await asyncio.gather(first, return_exceptions=True)
    [marked] = await parts.store.batch_jobs("pb_1")
    assert (marked.state, marked.error) == ("submitted", "realtime_retry")

    [done] = await settler().settle([marked], failed)
    assert (done.state, done.error) == ("failed", "realtime_interrupted")
    assert len(fake.calls("/v1/chat/completions")) == 1  # not asked again
    [row] = parts.ledger.records
    assert (row.request_id, row.status, row.cost_usd) == ("req1", 499, None)
