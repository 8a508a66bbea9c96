"""The SQL job store's thread (see :mod:`skinflint.storage.jobs`): one thread owns the
connection and runs every operation in a transaction; operations that may share one (enqueues
and lookups) share the transaction of those that arrived together (group commit)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from skinflint.errors import JobStoreError
from skinflint.interfaces import (
    ClientBatch,
    GroupCounts,
    Job,
    JobResult,
    ListedFile,
    ProviderBatch,
    Purged,
    QueuedGroup,
    StoredFile,
)
from skinflint.storage.jobs import Connection, FileDeletion, JobTables

__all__ = ["SqlJobStore"]

T = TypeVar("T")

#: Free pages given back to the file system per transaction (see :meth:`SqlJobStore.reclaim`).
RECLAIM_PAGES = 1000

log = logging.getLogger("skinflint.storage")


@dataclass(slots=True)
class _Op:
    run: Callable[[JobTables], Any]
    shared: bool  # may share a transaction with other shared operations
    write: bool  # writes (SQLite: takes the write lock at once)
    loop: asyncio.AbstractEventLoop
    waiter: asyncio.Future[Any]


def _deliver(done: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for waiter, result, exc in done:
        if waiter.done():  # its caller went away
            continue
        if exc is not None:
            waiter.set_exception(exc)
        else:
            waiter.set_result(result)


class SqlJobStore:
    """A :class:`~skinflint.interfaces.JobStore` over a :class:`Connection` owned by one thread
    (see the module docstring). ``transactions`` counts the transactions committed."""

    def __init__(self, connect: Callable[[], Connection], *, name: str = "jobs") -> None:
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._ops: list[_Op] = []
        self._closed = False
        self.transactions = 0
        self._ready: list[BaseException | Connection] = []
        self._thread = threading.Thread(target=self._run, args=(connect,),
                                        name=f"skinflint-{name}", daemon=True)
        started = threading.Event()
        self._started = started
        self._thread.start()
        started.wait()
        first = self._ready[0]
        if isinstance(first, BaseException):
            raise first

    # ---- on the event loop

    async def _call(self, run: Callable[[JobTables], T], *, shared: bool = False,
                    write: bool = True) -> T:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the job store is closed")
            self._ops.append(_Op(run, shared, write, loop, waiter))
            self._arrived.notify()
        return await waiter

    async def enqueue(self, jobs: Sequence[Job]) -> None:
        await self._call(lambda t: t.enqueue(jobs), shared=True)

    async def get(self, job_id: str) -> Job | None:
        return await self._call(lambda t: t.get(job_id), shared=True, write=False)

    async def queued(self) -> list[QueuedGroup]:
        return await self._call(lambda t: t.queued(), write=False)

    async def claim(self, batch: ProviderBatch, limit: int) -> list[Job]:
        return await self._call(lambda t: t.claim(batch, limit))

    async def submitted(self, batch_id: str, provider_id: str) -> None:
        await self._call(lambda t: t.submitted(batch_id, provider_id))

    async def unfinished(self) -> list[ProviderBatch]:
        return await self._call(lambda t: t.unfinished(), write=False)

    async def batch_jobs(self, batch_id: str) -> list[Job]:
        return await self._call(lambda t: t.batch_jobs(batch_id), write=False)

    async def requeue(self, batch_id: str) -> int:
        return await self._call(lambda t: t.requeue(batch_id))

    async def retrying(self, job_ids: Sequence[str]) -> None:
        await self._call(lambda t: t.retrying(job_ids))

    async def finish(self, results: Sequence[JobResult], now: float) -> list[Job]:
        return await self._call(lambda t: t.finish(results, now))

    async def lease(self, owner: str, ttl: float, now: float) -> bool:
        return await self._call(lambda t: t.lease(owner, ttl, now))

    async def release(self, owner: str) -> None:
        await self._call(lambda t: t.release(owner))

    async def lease_holder(self) -> str | None:
        return await self._call(lambda t: t.lease_holder(), write=False)

    async def put_file(self, file: StoredFile) -> None:
        await self._call(lambda t: t.put_file(file))

    async def get_file(self, file_id: str) -> StoredFile | None:
        return await self._call(lambda t: t.get_file(file_id), shared=True, write=False)

    async def tenant_files(self, tenant: str, purpose: str, after: str, limit: int,
                           newest_first: bool = True) -> list[ListedFile]:
        return await self._call(
            lambda t: t.tenant_files(tenant, purpose, after, limit, newest_first), shared=True,
            write=False)

    async def delete_file(self, file_id: str, tenant: str) -> FileDeletion:
        return await self._call(lambda t: t.delete_file(file_id, tenant))

    async def put_batch(self, batch: ClientBatch, jobs: Sequence[Job]) -> None:
        await self._call(lambda t: t.put_batch(batch, jobs))

    async def get_batch(self, batch_id: str) -> ClientBatch | None:
        return await self._call(lambda t: t.get_batch(batch_id), shared=True, write=False)

    async def tenant_batches(self, tenant: str, after: str, limit: int) -> list[ClientBatch]:
        return await self._call(lambda t: t.tenant_batches(tenant, after, limit), shared=True,
                                write=False)

    async def cancel_batch(self, batch_id: str, now: float) -> list[Job]:
        return await self._call(lambda t: t.cancel_batch(batch_id, now))

    async def group_jobs(self, group: str) -> list[Job]:
        return await self._call(lambda t: t.group_jobs(group), shared=True, write=False)

    async def group_counts(self, group: str) -> GroupCounts:
        return await self._call(lambda t: t.group_counts(group), shared=True, write=False)

    async def waiting(self) -> dict[str, int]:
        return await self._call(lambda t: t.waiting(), write=False)

    async def purge(self, before: float, limit: int) -> Purged:
        return await self._call(lambda t: t.purge(before, limit))

    async def reclaim(self) -> None:
        while await self._call(lambda t: t.reclaim(RECLAIM_PAGES)):
            pass

    async def close(self) -> None:
        with self._lock:
            self._closed = True
            self._arrived.notify()
        await asyncio.to_thread(self._thread.join)

    # ---- in the store's thread

    def _run(self, connect: Callable[[], Connection]) -> None:
        try:
            conn = connect()
        except BaseException as exc:
            self._ready.append(exc)
            self._started.set()
            return
        self._ready.append(conn)
        self._started.set()
        tables = JobTables(conn)
        try:
            while True:
                with self._lock:
                    while not self._ops and not self._closed:
                        self._arrived.wait()
                    ops, self._ops = self._ops, []
                    if not ops and self._closed:
                        return
                self._apply(tables, ops)
        finally:
            conn.close()

    def _apply(self, tables: JobTables, ops: list[_Op]) -> None:
        done: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        shared = [op for op in ops if op.shared]
        alone = [op for op in ops if not op.shared]
        if len(shared) > 1:
            try:
                results = self._transaction(tables, shared)
            except Exception:  # one of them failed: each alone, to fail only that one
                alone = shared + alone
            else:
                for op, result in zip(shared, results, strict=True):
                    done.setdefault(op.loop, []).append((op.waiter, result, None))
        else:
            alone = shared + alone
        for op in alone:
            try:
                result = self._transaction(tables, [op])[0]
            except Exception as exc:  # the caller gets it, as ours (the driver's is logged)
                log.warning("jobs: a store operation failed: %s", exc)
                failure = JobStoreError(f"the job store is unavailable: {exc}")
                done.setdefault(op.loop, []).append((op.waiter, None, failure))
            else:
                done.setdefault(op.loop, []).append((op.waiter, result, None))
        for loop, delivered in done.items():
            with contextlib.suppress(RuntimeError):  # its loop closed: nobody waits
                loop.call_soon_threadsafe(_deliver, delivered)

    def _transaction(self, tables: JobTables, ops: list[_Op]) -> list[Any]:
        with tables.conn.transaction(write=any(op.write for op in ops)):
            results = [op.run(tables) for op in ops]
        self.transactions += 1
        return results
