"""One contract for every job store: enqueue and read back, claiming by provider, model and
group, results recorded once, restart bookkeeping, the lease, and the pass-through tables."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import fields, replace
from pathlib import Path

import pytest

from skinflint.errors import JobStoreError
from skinflint.interfaces import ClientBatch, Job, JobResult, JobStore, ProviderBatch, StoredFile
from skinflint.storage.jobs import Dialect, schema
from skinflint.storage.sqlite_jobs import SQLiteJobStore
from tests.storage.test_ledger_durability import locked

Opener = Callable[[Path], Awaitable[JobStore]]
NOW = 1_000_000.0


async def _memory(tmp: Path) -> JobStore:
    return await asyncio.to_thread(SQLiteJobStore, ":memory:")


async def _sqlite(tmp: Path) -> JobStore:
    return await asyncio.to_thread(SQLiteJobStore, str(tmp / "jobs.db"))


async def _postgres(tmp: Path) -> JobStore:
    from skinflint.storage.pg_jobs import PostgresJobStore

    return await asyncio.to_thread(PostgresJobStore, (tmp / "pg-url").read_text())


OPENERS: dict[str, Opener] = {"memory": _memory, "sqlite": _sqlite, "postgres": _postgres}


@pytest.fixture(params=sorted(OPENERS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    if request.param == "postgres":
        (tmp_path / "pg-url").write_text(request.getfixturevalue("pg_url"))
    opened = await OPENERS[request.param](tmp_path)
    yield opened
    await opened.close()


def job(i: int, *, model: str = "m", provider: str = "p", group: str = "", due: float = NOW,
        tenant: str = "t1") -> Job:
    return Job(id=f"job_{i:04d}", tenant=tenant, feature="f", user="u", request_id=f"r{i}",
               requested_model="alias", provider=provider, provider_model=model,
               body=b'{"model":"alias","messages":[{"role":"user","content":"hi"}]}',
               created=NOW, due=due + i * 1e-3, group=group, custom_id=f"c{i}" if group else "")


def batch(bid: str, *, model: str = "m", provider: str = "p", group: str = "") -> ProviderBatch:
    return ProviderBatch(bid, provider, model, group, NOW)


async def test_enqueued_jobs_read_back_whole(store: JobStore) -> None:
    await store.enqueue([job(1), job(2)])
    got = await store.get("job_0001")
    assert got == job(1)
    assert got is not None and got.state == "queued" and isinstance(got.body, bytes)
    assert await store.get("job_9999") is None


async def test_queued_groups_count_and_earliest_due(store: JobStore) -> None:
    await store.enqueue([job(1), job(2, model="n"), job(3), job(4, group="g1")])
    groups = sorted(await store.queued())
    assert [(g.provider, g.model, g.group, g.jobs) for g in groups] == [
        ("p", "m", "", 2), ("p", "m", "g1", 1), ("p", "n", "", 1)]
    assert groups[0].due == pytest.approx(NOW + 1e-3)


async def test_claim_takes_its_group_earliest_first_up_to_the_limit(store: JobStore) -> None:
    await store.enqueue([job(i) for i in range(5)] + [job(9, model="n")])
    claimed = await store.claim(batch("b1"), 3)
    assert [j.id for j in claimed] == ["job_0000", "job_0001", "job_0002"]
    assert all(j.state == "submitted" and j.batch == "b1" for j in claimed)
    rest = await store.claim(batch("b2"), 10)
    assert [j.id for j in rest] == ["job_0003", "job_0004"]
    assert [(g.model, g.jobs) for g in await store.queued()] == [("n", 1)]


async def test_a_claim_of_nothing_records_no_batch(store: JobStore) -> None:
    await store.enqueue([job(1, model="n")])
    assert await store.claim(batch("b1"), 10) == []
    assert await store.unfinished() == []


async def test_unfinished_batches_until_every_job_is_finished(store: JobStore) -> None:
    await store.enqueue([job(1), job(2)])
    await store.claim(batch("b1"), 10)
    assert [(b.id, b.provider_id) for b in await store.unfinished()] == [("b1", "")]
    await store.submitted("b1", "batch_77")
    assert [b.provider_id for b in await store.unfinished()] == ["batch_77"]
    done = await store.finish([JobResult("job_0001", "completed", b'{"ok":1}')], NOW + 5)
    assert [(j.id, j.state, j.response, j.finished) for j in done] == [
        ("job_0001", "completed", b'{"ok":1}', NOW + 5)]
    assert len(await store.unfinished()) == 1
    await store.finish([JobResult("job_0002", "failed", error="expired", message="late")], NOW)
    assert await store.unfinished() == []
    failed = await store.get("job_0002")
    assert failed is not None and (failed.error, failed.message) == ("expired", "late")


async def test_a_result_is_recorded_once(store: JobStore) -> None:
    await store.enqueue([job(1)])
    await store.claim(batch("b1"), 10)
    first = await store.finish([JobResult("job_0001", "completed", b"{}")], NOW)
    again = await store.finish([JobResult("job_0001", "failed", error="failed")], NOW)
    assert len(first) == 1 and again == []
    got = await store.get("job_0001")
    assert got is not None and got.state == "completed"


async def test_requeue_gives_unfinished_jobs_back(store: JobStore) -> None:
    await store.enqueue([job(1), job(2)])
    await store.claim(batch("b1"), 10)
    await store.finish([JobResult("job_0001", "completed", b"{}")], NOW)
    assert await store.requeue("b1") == 1
    back = await store.get("job_0002")
    assert back is not None and (back.state, back.batch) == ("queued", "")
    assert await store.unfinished() == []
    assert [g.jobs for g in await store.queued()] == [1]


async def test_many_concurrent_enqueues_share_transactions(store: JobStore) -> None:
    await asyncio.gather(*(store.enqueue([job(i)]) for i in range(300)))
    assert sum(g.jobs for g in await store.queued()) == 300
    if isinstance(store, SQLiteJobStore):
        assert store.transactions < 300  # group commit


async def test_one_owner_holds_the_lease_until_it_expires_or_is_released(
        store: JobStore) -> None:
    assert await store.lease("a", 10, NOW)
    assert not await store.lease("b", 10, NOW + 1)
    assert await store.lease("a", 10, NOW + 5)  # renewed
    assert await store.lease("b", 10, NOW + 16)  # a's expired
    assert await store.lease_holder() == "b"
    await store.release("b")
    assert await store.lease_holder() is None
    assert await store.lease("a", 10, NOW + 17)


async def test_files_and_client_batches(store: JobStore) -> None:
    f = StoredFile("file-1", "t1", "feat", "u", "batch", "in.jsonl", b"\x00line\n", NOW)
    await store.put_file(f)
    assert await store.get_file("file-1") == f
    assert await store.get_file("file-2") is None
    cb = ClientBatch("batch_1", "t1", "file-1", "/v1/chat/completions", "24h", {"k": "v"}, NOW)
    await store.put_batch(cb, [job(1, group="batch_1"), job(2, group="batch_1")])
    assert await store.get_batch("batch_1") == cb
    assert [j.custom_id for j in await store.group_jobs("batch_1")] == ["c1", "c2"]
    await store.claim(batch("b1", group="batch_1"), 1)
    cancelled = await store.cancel_batch("batch_1", NOW + 1)
    assert [(j.id, j.state, j.error) for j in cancelled] == [("job_0002", "cancelled",
                                                               "cancelled")]
    got = await store.get_batch("batch_1")
    assert got is not None and got.cancelled == NOW + 1


async def test_results_survive_reopening(tmp_path: Path) -> None:
    path = str(tmp_path / "jobs.db")
    first = await asyncio.to_thread(SQLiteJobStore, path)
    await first.enqueue([job(1)])
    await first.claim(batch("b1"), 5)
    await first.submitted("b1", "batch_9")
    await first.close()
    second = await asyncio.to_thread(SQLiteJobStore, path)
    try:
        assert [b.provider_id for b in await second.unfinished()] == ["batch_9"]
        started = time.perf_counter()
        got = await second.get("job_0001")
        assert got is not None and got.state == "submitted"
        assert time.perf_counter() - started < 1
    finally:
        await second.close()


async def test_group_counts(store: JobStore) -> None:
    cb = ClientBatch("batch_2", "t1", "file-1", "/v1/chat/completions", "24h", None, NOW)
    await store.put_batch(cb, [job(i, group="batch_2") for i in range(5)])
    await store.claim(batch("b1", group="batch_2"), 3)
    await store.finish([JobResult("job_0000", "completed", b"{}"),
                        JobResult("job_0001", "failed", error="expired", message="late"),
                        JobResult("job_0002", "failed", error="failed")], NOW + 7)
    counts = await store.group_counts("batch_2")
    assert (counts.queued, counts.submitted, counts.completed, counts.failed,
            counts.expired, counts.total, counts.open) == (2, 0, 1, 2, 1, 5, 2)
    assert counts.last_finished == NOW + 7
    assert (await store.group_counts("batch_none")).total == 0


async def test_a_locked_file_fails_writes_with_our_error_and_reads_go_on(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    store = await asyncio.to_thread(SQLiteJobStore, str(path), busy_timeout=0.2)
    try:
        await store.enqueue([job(1)])
        with locked(path):
            with pytest.raises(JobStoreError, match="unavailable"):
                await store.enqueue([job(2)])
            assert await store.get("job_0001") is not None  # a reader waits for no lock
        await store.enqueue([job(2)])
        assert await store.get("job_0002") is not None
    finally:
        await store.close()


async def test_a_tenants_batches_newest_first_in_pages(store: JobStore) -> None:
    for i in range(5):
        tenant = "t2" if i == 2 else "t1"
        await store.put_batch(ClientBatch(f"batch_{i}", tenant, "f", "/v1/chat/completions",
                                          "24h", None, NOW + i), [])
    first = await store.tenant_batches("t1", "", 2)
    assert [b.id for b in first] == ["batch_4", "batch_3"]
    rest = await store.tenant_batches("t1", "batch_3", 10)
    assert [b.id for b in rest] == ["batch_1", "batch_0"]
    assert [b.id for b in await store.tenant_batches("t2", "", 10)] == ["batch_2"]


_ADDED = ('"cache_key" TEXT NOT NULL DEFAULT \'\', ', '"cache_ttl" REAL NOT NULL DEFAULT 0, ',
          '"cache_ttl" DOUBLE PRECISION NOT NULL DEFAULT 0, ')


def _earlier(dialect: Dialect) -> str:
    """The jobs table as it was made before the cache columns were added."""
    create = schema(dialect)[0]
    for column in _ADDED:
        create = create.replace(column, "")
    assert "cache_" not in create
    return create


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
async def test_a_jobs_table_made_earlier_gets_the_new_columns(
        dialect: Dialect, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    old = job(1)
    columns = [f.name for f in fields(Job) if not f.name.startswith("cache_")]
    row = [getattr(old, c) for c in columns]
    insert = "INSERT INTO jobs ({}) VALUES ({})".format(
        ", ".join(f'"{c}"' for c in columns), ", ".join("?" for _ in columns))
    if dialect == "sqlite":
        conn = sqlite3.connect(tmp_path / "jobs.db")
        conn.execute(_earlier("sqlite"))
        conn.execute(insert, row)
        conn.commit()
        conn.close()
        opened = await _sqlite(tmp_path)
    else:
        url = request.getfixturevalue("pg_url")
        psycopg = pytest.importorskip("psycopg")
        with psycopg.connect(url, autocommit=True) as pg:
            pg.execute(_earlier("postgres"))
            pg.execute(insert.replace("?", "%s"), row)
        (tmp_path / "pg-url").write_text(url)
        opened = await _postgres(tmp_path)
    try:
        assert await opened.get(old.id) == old  # read with the columns' defaults
        new = replace(job(2), cache_key="k", cache_ttl=60.0)
        await opened.enqueue([new])
        assert await opened.get(new.id) == new
    finally:
        await opened.close()
