"""One contract for every budget counter store: atomic admission over several budgets at
once, settling, snapshots, expiry with the window, and no over-admission under concurrency."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from skinflint.errors import BudgetStoreError
from skinflint.interfaces import Amounts, BudgetCounters, Claim, Limits
from skinflint.storage.counters import MemoryBudgetCounters
from skinflint.storage.sqlite_counters import SQLiteBudgetCounters
from tests.pg import free_port
from tests.storage.test_ledger_durability import locked

Opener = Callable[[Path], Awaitable[BudgetCounters]]
NOW = 1_000_000.0


async def _memory(tmp: Path) -> BudgetCounters:
    return MemoryBudgetCounters()


async def _sqlite(tmp: Path) -> BudgetCounters:
    return await asyncio.to_thread(SQLiteBudgetCounters, str(tmp / "counters.db"))


async def _redis(tmp: Path) -> BudgetCounters:
    from skinflint.storage.redis_counters import RedisBudgetCounters

    return await RedisBudgetCounters.create((tmp / "redis-url").read_text())


async def _postgres(tmp: Path) -> BudgetCounters:
    from skinflint.storage.pg_counters import PostgresBudgetCounters

    return await PostgresBudgetCounters.create((tmp / "pg-url").read_text())


OPENERS: dict[str, Opener] = {"memory": _memory, "sqlite": _sqlite, "redis": _redis,
                              "postgres": _postgres}
SERVERS = {"redis": ("redis_url", "redis-url"), "postgres": ("pg_url", "pg-url")}


def _server(request: pytest.FixtureRequest, opener: str, tmp: Path) -> None:
    """Start the server ``opener`` needs (only its tests need it) and note its URL."""
    if opener in SERVERS:
        fixture, note = SERVERS[opener]
        (tmp / note).write_text(request.getfixturevalue(fixture))


@pytest.fixture(params=sorted(OPENERS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BudgetCounters]:
    _server(request, request.param, tmp_path)
    opened = await OPENERS[request.param](tmp_path)
    yield opened
    await opened.close()


def claim(budget: str = "b", *, subject: str = "", hard: bool = True, usd: float = 0.0,
          requests: int = 1, tokens: int = 0, limits: Limits | None = None,
          end: float = NOW + 60) -> Claim:
    return Claim(budget, subject, end - 60, end, limits or Limits(requests=2),
                 Amounts(usd, requests, tokens), hard)


async def test_admits_up_to_the_limit_then_blocks(store: BudgetCounters) -> None:
    results = [await store.reserve([claim()], NOW) for _ in range(3)]
    assert [r.blocked for r in results] == [None, None, 0]
    assert results[0].before == (0.0,) and results[0].after == (0.5,)
    assert results[1].before == (0.5,) and results[1].after == (1.0,)
    assert results[2].before == results[2].after == ()


async def test_a_blocked_request_reserves_nothing_in_any_budget(store: BudgetCounters) -> None:
    tight = claim("tight", limits=Limits(usd=0.5), usd=0.4)
    roomy = claim("roomy", limits=Limits(requests=100))
    assert (await store.reserve([roomy, tight], NOW)).blocked is None
    assert (await store.reserve([roomy, tight], NOW)).blocked == 1
    rows = {r.budget: r for r in await store.snapshot(NOW)}
    assert rows["roomy"].reserved.requests == 1
    assert rows["tight"].reserved.usd == pytest.approx(0.4)


async def test_a_soft_claim_passes_its_limit_and_reports_it(store: BudgetCounters) -> None:
    soft = claim(hard=False, limits=Limits(requests=1))
    first, second = [await store.reserve([soft], NOW) for _ in range(2)]
    assert first.blocked is None and second.blocked is None
    assert second.after == (2.0,)


async def test_settle_replaces_the_reservation_by_what_was_spent(store: BudgetCounters) -> None:
    c = claim(limits=Limits(usd=1.0, tokens=1000), usd=0.3, tokens=500)
    await store.reserve([c], NOW)
    store.settle([c], Amounts(0.01, 1, 40))
    (row,) = await store.snapshot(NOW)
    assert row.reserved == Amounts(0.0, 0, 0)
    assert row.spent.usd == pytest.approx(0.01)
    assert (row.spent.requests, row.spent.tokens) == (1, 40)
    store.settle([c], Amounts())  # settling twice never goes below zero
    (row,) = await store.snapshot(NOW)
    assert row.reserved == Amounts(0.0, 0, 0)


async def test_a_reservation_whose_caller_left_is_released(store: BudgetCounters) -> None:
    """A request cancelled (its client gone) while its reservation is on its way is never
    settled by the gateway: the store releases the reservation itself once it is made."""
    c = claim(limits=Limits(requests=5), usd=0.5)
    for _ in range(5):
        task = asyncio.ensure_future(store.reserve([c], NOW))
        await asyncio.sleep(0)  # on its way
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if not task.cancelled():  # made at once (in memory): the caller has it, and settles
            store.settle([c], Amounts())
    for _ in range(100):  # releases are written in the background
        rows = await store.snapshot(NOW)
        if all(r.reserved == Amounts() for r in rows):
            break
        await asyncio.sleep(0.02)
    assert all(r.reserved == Amounts() and r.spent == Amounts() for r in rows)
    assert (await store.reserve([c], NOW)).blocked is None


async def test_sqlite_locked_refuses_reservations_and_keeps_settlements(tmp_path: Path) -> None:
    """Another process holds the file's write lock: a reservation fails after the busy timeout
    with a 503 error, a settlement waits and is written once the lock goes."""
    db = tmp_path / "counters.db"
    store = await asyncio.to_thread(SQLiteBudgetCounters, str(db), busy_timeout=0.2, retry=0.05)
    try:
        c = claim(limits=Limits(requests=10))
        assert (await store.reserve([c], NOW)).blocked is None
        with locked(db):
            store.settle([c], Amounts(0.25, 1, 7))
            with pytest.raises(BudgetStoreError) as refused:
                await store.reserve([c], NOW)
            assert refused.value.status == 503 and refused.value.retry_after
        (row,) = await store.snapshot(NOW)
        assert row.reserved == Amounts() and row.spent == Amounts(0.25, 1, 7)
    finally:
        await store.close()


async def test_an_unreachable_redis_is_a_503_not_a_crash() -> None:
    import redis.asyncio as aioredis

    from skinflint.storage.redis_counters import RedisBudgetCounters

    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}", socket_timeout=1,
                                     socket_connect_timeout=1)
    store = RedisBudgetCounters(client)
    try:
        with pytest.raises(BudgetStoreError):
            await store.reserve([claim()], NOW)
    finally:
        await client.aclose()


async def test_subjects_and_windows_are_counted_apart(store: BudgetCounters) -> None:
    one = Limits(requests=1)
    assert (await store.reserve([claim(subject="ann", limits=one)], NOW)).blocked is None
    assert (await store.reserve([claim(subject="bob", limits=one)], NOW)).blocked is None
    assert (await store.reserve([claim(subject="ann", limits=one)], NOW)).blocked == 0
    later = claim(subject="ann", limits=one, end=NOW + 120)
    assert (await store.reserve([later], NOW + 61)).blocked is None


async def test_counters_expire_with_their_window(store: BudgetCounters) -> None:
    await store.reserve([claim()], NOW)
    assert len(await store.snapshot(NOW)) == 1
    assert await store.snapshot(NOW + 60) == []
    await store.reserve([claim(end=NOW + 180)], NOW + 130)  # sweeps the ended window
    assert [r.window_end for r in await store.snapshot(NOW)] == [NOW + 180]


LIMIT, THREADS, EACH = 10, 8, 25


def _hammer(opener: str, tmp: Path, admitted: list[int]) -> None:
    async def run() -> int:
        own = await OPENERS[opener](tmp)  # one store per thread: its own connection
        try:
            limits = Limits(requests=LIMIT)
            results = [await own.reserve([claim(limits=limits)], NOW) for _ in range(EACH)]
            return sum(r.blocked is None for r in results)
        finally:
            await own.close()

    admitted.append(asyncio.run(run()))


@pytest.mark.parametrize("opener", ["sqlite", "redis", "postgres"])
def test_never_admits_past_the_limit_across_connections(
    opener: str, tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    _server(request, opener, tmp_path)
    admitted: list[int] = []
    threads = [threading.Thread(target=_hammer, args=(opener, tmp_path, admitted))
               for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == THREADS and sum(admitted) == LIMIT


def _process(tmp: str, queue: multiprocessing.Queue[int]) -> None:
    got: list[int] = []
    _hammer("sqlite", Path(tmp), got)
    queue.put(got[0])


def test_sqlite_never_admits_past_the_limit_across_processes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[int] = ctx.Queue()
    procs = [ctx.Process(target=_process, args=(str(tmp_path), queue)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sum(queue.get(timeout=5) for _ in procs) == LIMIT


def test_memory_store_is_safe_across_threads() -> None:
    store = MemoryBudgetCounters()
    admitted: list[int] = []

    def run() -> None:
        async def go() -> int:
            limits = Limits(requests=LIMIT)
            results = [await store.reserve([claim(limits=limits)], NOW) for _ in range(EACH)]
            return sum(r.blocked is None for r in results)
        admitted.append(asyncio.run(go()))

    threads = [threading.Thread(target=run) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(admitted) == LIMIT
