"""The job store's retention, file listing and deletion, and its count of waiting jobs, for
every job store (memory, SQLite file, PostgreSQL): only what has ended is deleted, a batch's
lines and input file go with it, and a purge deletes a bounded number of rows at a time."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from skinflint.interfaces import ClientBatch, JobResult, JobStore, Purged, StoredFile
from skinflint.storage.sqlite_jobs import SQLiteJobStore
from tests.storage.test_job_store import NOW, batch, job
from tests.storage.test_job_store import store as store

DAY = 86_400.0
CUTOFF = NOW + 10 * DAY  # what ended before this is deleted


def upload(file_id: str, tenant: str = "t1", *, created: float = NOW,
           purpose: str = "batch") -> StoredFile:
    return StoredFile(file_id, tenant, "f", "u", purpose, f"{file_id}.jsonl", b"0123456789",
                      created)


def client_batch(batch_id: str, file_id: str, created: float = NOW) -> ClientBatch:
    return ClientBatch(batch_id, "t1", file_id, "/v1/chat/completions", "24h", None, created)


async def test_only_jobs_finished_before_the_cutoff_are_deleted(store: JobStore) -> None:
    await store.enqueue([job(i) for i in range(6)])
    await store.claim(batch("b1"), 4)  # jobs 0-3 submitted; 4 and 5 stay queued
    await store.finish([JobResult("job_0000", "completed", b"{}"),
                        JobResult("job_0001", "failed", error="expired")], NOW + DAY)
    await store.finish([JobResult("job_0002", "completed", b"{}")], CUTOFF + 1)  # recent
    purged = await store.purge(CUTOFF, 1000)
    assert purged.jobs == 2
    left = {i: await store.get(f"job_{i:04d}") for i in range(6)}
    assert [i for i, j in left.items() if j is None] == [0, 1]
    assert [left[i].state for i in (2, 3, 4, 5) if left[i] is not None] == [
        "completed", "submitted", "queued", "queued"]  # created long ago, never finished
    assert await store.purge(CUTOFF, 1000) == Purged()


async def test_a_purge_deletes_at_most_its_limit_per_call(store: JobStore) -> None:
    await store.enqueue([job(i) for i in range(5)])
    await store.claim(batch("b1"), 5)
    await store.finish([JobResult(f"job_{i:04d}", "completed", b"{}") for i in range(5)], NOW)
    assert [(await store.purge(CUTOFF, 2)).jobs for _ in range(4)] == [2, 2, 1, 0]
    assert await store.get("job_0004") is None


async def test_done_provider_batches_go_and_open_ones_stay(store: JobStore) -> None:
    await store.enqueue([job(1), job(2, model="n")])
    await store.claim(batch("b1"), 5)
    await store.claim(batch("b2", model="n"), 5)
    await store.finish([JobResult("job_0001", "completed", b"{}")], NOW)
    purged = await store.purge(CUTOFF, 1000)
    assert (purged.jobs, purged.provider_batches) == (1, 1)
    assert [b.id for b in await store.unfinished()] == ["b2"]


async def test_a_batch_its_lines_and_its_file_go_together_once_all_ended(
        store: JobStore) -> None:
    await store.put_file(upload("file-old"))
    await store.put_file(upload("file-busy"))
    await store.put_file(upload("file-new", created=CUTOFF + 1))
    await store.put_batch(client_batch("batch_done", "file-old"),
                          [job(1, group="batch_done"), job(2, group="batch_done")])
    await store.put_batch(client_batch("batch_busy", "file-busy"),
                          [job(3, group="batch_busy"), job(4, group="batch_busy")])
    await store.claim(batch("b1", group="batch_done"), 5)
    await store.claim(batch("b2", group="batch_busy"), 5)
    await store.finish([JobResult(f"job_{i:04d}", "completed", b"{}") for i in (1, 2, 3)], NOW)
    purged = await store.purge(CUTOFF, 1000)
    assert purged == Purged(jobs=2, files=1, batches=1, provider_batches=1)
    assert await store.get_batch("batch_done") is None
    assert await store.get_file("file-old") is None
    # a batch with a line still running keeps its finished lines and its file
    assert await store.get_batch("batch_busy") is not None
    assert await store.get("job_0003") is not None
    assert await store.get_file("file-busy") is not None
    assert await store.get_file("file-new") is not None
    await store.finish([JobResult("job_0004", "completed", b"{}")], CUTOFF + 5)
    # its last line ended too recently: only its provider batch, done, goes
    assert await store.purge(CUTOFF, 1000) == Purged(provider_batches=1)
    assert await store.purge(CUTOFF + 6, 1000) == Purged(jobs=2, files=2, batches=1)


async def test_files_listed_per_tenant_newest_first_in_pages(store: JobStore) -> None:
    for i in range(5):
        await store.put_file(upload(f"file-{i}", "t2" if i == 2 else "t1", created=NOW + i,
                                    purpose="fine-tune" if i == 0 else "batch"))
    first = await store.tenant_files("t1", "", "", 2)
    assert [(f.id, f.size, f.filename) for f in first] == [
        ("file-4", 10, "file-4.jsonl"), ("file-3", 10, "file-3.jsonl")]
    assert [f.id for f in await store.tenant_files("t1", "", "file-3", 10)] == [
        "file-1", "file-0"]
    assert [f.id for f in await store.tenant_files("t1", "batch", "", 10)] == [
        "file-4", "file-3", "file-1"]
    assert [f.id for f in await store.tenant_files("t1", "", "file-0", 10,
                                                   newest_first=False)] == [
        "file-1", "file-3", "file-4"]
    assert [f.id for f in await store.tenant_files("t2", "", "", 10)] == ["file-2"]
    assert await store.tenant_files("t2", "", "file-4", 10) == []  # another tenant's cursor


async def test_a_file_is_deleted_by_its_tenant_unless_a_running_batch_uses_it(
        store: JobStore) -> None:
    await store.put_file(upload("file-1"))
    await store.put_batch(client_batch("batch_1", "file-1"), [job(1, group="batch_1")])
    assert await store.delete_file("file-1", "t2") == "missing"
    assert await store.delete_file("file-1", "t1") == "in_use"
    await store.claim(batch("b1", group="batch_1"), 5)
    assert await store.delete_file("file-1", "t1") == "in_use"
    await store.finish([JobResult("job_0001", "completed", b"{}")], NOW)
    assert await store.delete_file("file-1", "t1") == "deleted"
    assert await store.get_file("file-1") is None
    assert await store.delete_file("file-1", "t1") == "missing"


async def test_waiting_jobs_are_counted_by_state(store: JobStore) -> None:
    assert await store.waiting() == {}
    await store.enqueue([job(i) for i in range(5)])
    await store.claim(batch("b1"), 3)
    await store.finish([JobResult("job_0000", "completed", b"{}")], NOW)
    assert await store.waiting() == {"queued": 2, "submitted": 2}


async def test_sqlite_gives_space_back_only_when_created_for_it(tmp_path: Path) -> None:
    incremental = tmp_path / "incremental.db"
    with sqlite3.connect(incremental) as conn:
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("CREATE TABLE x (y)")  # the setting holds from the first table on
    plain = tmp_path / "plain.db"
    sizes = []
    for path in (incremental, plain):
        s = await asyncio.to_thread(SQLiteJobStore, str(path))
        try:
            big = [job(i) for i in range(200)]
            for j in big:
                j.body = b"x" * 20_000
            await s.enqueue(big)
            await s.claim(batch("b1"), 200)
            await s.finish([JobResult(j.id, "completed", b"{}") for j in big], NOW)
            assert (await s.purge(CUTOFF, 1000)).jobs == 200
            await s.reclaim()
        finally:
            await s.close()
        with sqlite3.connect(path) as conn:
            sizes.append(conn.execute("PRAGMA freelist_count").fetchone()[0])
    assert sizes[0] == 0 and sizes[1] > 500  # only the incremental file gave its pages back
