"""Grants: far from its limits, a process admits requests from a share it reserved ahead, with
no transaction; the counters stay exact across processes, and near a limit every request is
decided by the shared file."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from skinflint.interfaces import Amounts, Claim, Limits
from skinflint.storage import grants
from skinflint.storage.sqlite_counters import SQLiteBudgetCounters

NOW = 1_000_000.0


def claim(limits: Limits, *, usd: float = 0.0, requests: int = 1, tokens: int = 0) -> Claim:
    return Claim("b", "", NOW - 60, NOW + 60, limits, Amounts(usd, requests, tokens), True)


def test_a_grant_is_a_small_share_of_what_remains_and_none_near_a_limit() -> None:
    c = claim(Limits(usd=10.0, requests=10_000), usd=0.001)
    g = grants.grant_for(c, Amounts(2.0, 100, 0), now=0.0)
    assert g is not None
    assert g.left_usd == pytest.approx(min(8.0 / 64, 0.001 * grants.MOST))
    assert g.left_requests == min(9_900 // 64, grants.MOST)
    assert g.held() == Amounts(g.left_usd, g.left_requests, 0)  # tokens are not limited
    assert grants.grant_for(claim(Limits(requests=10)), Amounts(0, 1, 0), now=0.0) is None
    near = Amounts(10.0 - 0.001 * 63, 0, 0)  # less than 64 requests' worth remains
    assert grants.grant_for(c, near, now=0.0) is None


async def _open(db: Path, **options: bool) -> SQLiteBudgetCounters:
    return await asyncio.to_thread(SQLiteBudgetCounters, str(db), **options)


async def test_far_from_the_limit_requests_share_transactions_and_stay_exact(
    tmp_path: Path,
) -> None:
    store = await _open(tmp_path / "c.db")
    c = claim(Limits(usd=100.0, requests=1_000_000), usd=0.002)
    try:
        for i in range(1000):
            claims = [c]
            assert (await store.reserve(claims, NOW)).blocked is None
            if i == 500:  # in flight: the request's own amount, not the grant, shows
                (row,) = await store.snapshot(NOW)
                assert row.reserved.requests == 1
                assert row.reserved.usd == pytest.approx(0.002)
            store.settle(claims, Amounts(0.001, 1, 10))
        assert store.transactions < 100
    finally:
        await store.close()
    reopened = await _open(tmp_path / "c.db")
    try:
        (row,) = await reopened.snapshot(NOW)
    finally:
        await reopened.close()
    assert row.spent.requests == 1000 and row.spent.tokens == 10_000
    assert row.spent.usd == pytest.approx(1.0)
    assert row.reserved == Amounts()


async def test_near_the_limit_every_request_asks_the_file(tmp_path: Path) -> None:
    store = await _open(tmp_path / "c.db")
    try:
        admitted = [(await store.reserve([claim(Limits(requests=10))], NOW)).blocked is None
                    for _ in range(15)]
        assert admitted == [True] * 10 + [False] * 5
        assert store.transactions == 15
    finally:
        await store.close()


LIMIT, PROCESSES = 3000, 4


def _spend_until_refused(db: Path, admitted: list[int]) -> None:
    """One process's store: reserve and settle one request at a time until refused."""

    async def run() -> int:
        store = await _open(db)
        n = 0
        try:
            while True:
                claims = [claim(Limits(requests=LIMIT), usd=0.01)]
                if (await store.reserve(claims, NOW)).blocked is not None:
                    return n
                n += 1
                store.settle(claims, Amounts(0.005, 1, 0))
        finally:
            await store.close()

    admitted.append(asyncio.run(run()))


def test_processes_holding_grants_admit_exactly_the_limit_together(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    admitted: list[int] = []
    workers = [threading.Thread(target=_spend_until_refused, args=(db, admitted))
               for _ in range(PROCESSES)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert sum(admitted) == LIMIT, admitted

    async def final() -> None:
        store = await _open(db)
        try:
            (row,) = await store.snapshot(NOW)
        finally:
            await store.close()
        assert row.spent.requests == LIMIT and row.reserved == Amounts()
        assert row.spent.usd == pytest.approx(LIMIT * 0.005)

    asyncio.run(final())


async def test_an_unused_grant_is_given_back_when_it_expires(tmp_path: Path) -> None:
    """Another process sees what this one holds unused for at most the grant's lifetime."""
    mine, other = await _open(tmp_path / "c.db"), await _open(tmp_path / "c.db")
    try:
        claims = [claim(Limits(requests=1_000_000))]
        await mine.reserve(claims, NOW)
        mine.settle(claims, Amounts(0.0, 1, 0))
        await asyncio.sleep(0.1)
        (seen,) = await other.snapshot(NOW)
        assert seen.reserved.requests > 0  # the grant, held by another process
        await asyncio.sleep(grants.SECONDS + 0.3)
        (seen,) = await other.snapshot(NOW)
        assert seen.reserved == Amounts() and seen.spent.requests == 1
    finally:
        await mine.close()
        await other.close()
