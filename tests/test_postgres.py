"""PostgreSQL storage against a real server with pgvector (see :mod:`tests.pg`).

The cache-store contract all stores share is in :mod:`tests.test_cache_stores`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pytest

from tests import pg

pg.import_or_skip("psycopg")
pg.import_or_skip("psycopg_pool")
pg.import_or_skip("pgvector")

import psycopg  # noqa: E402
from pgvector.psycopg import register_vector_async  # noqa: E402

from skinflint.errors import ConfigError  # noqa: E402
from skinflint.interfaces import CacheEntry, Vector  # noqa: E402
from skinflint.models import LedgerRecord  # noqa: E402
from skinflint.storage import pg_semantic  # noqa: E402
from skinflint.storage.postgres import PgSemanticIndex, PostgresCacheStore, PostgresLedger  # noqa: E402
from tests.proxy import FreezingProxy  # noqa: E402

DEAD_URL = "postgresql://postgres@127.0.0.1:1/postgres"
DIM = 8

# ---------------------------------------------------------------- PostgreSQL cache specifics


async def test_cache_sweep_drops_expired_rows(pg_url: str) -> None:
    store = await PostgresCacheStore.create(pg_url, sweep_every=10_000)
    try:
        await store.set(CacheEntry("old", b"v", 50.0))
        await store.set(CacheEntry("new", b"v", 500.0))
        await store.set(CacheEntry("forever", b"v", 0.0))
        assert await store.sweep(now=100.0) == 1
        assert await store.stats() == {"entries": 2, "bytes": 2, "evictions": 0}
    finally:
        await store.close()


async def test_cache_sweeps_in_the_background(pg_url: str) -> None:
    store = await PostgresCacheStore.create(pg_url, max_entries=2, sweep_every=5)
    for i in range(5):
        await store.set(CacheEntry(f"k{i}", b"v", 0.0))
    await store.close()  # waits for the sweep the fifth write started
    store = await PostgresCacheStore.create(pg_url)
    try:
        assert (await store.stats())["entries"] == 2
        assert await store.get("k4", 1.0) == b"v"
    finally:
        await store.close()


async def test_cache_failure_is_a_miss(pg_url: str) -> None:
    store = await PostgresCacheStore.create(pg_url)
    await store.close()  # every later call finds the pool closed
    assert await store.get("k", 1.0) is None
    await store.set(CacheEntry("k", b"v", 0.0))
    with pytest.raises(psycopg.OperationalError):
        await store.invalidate_tags(["t"])


async def _lock(url: str, *tables: str) -> psycopg.AsyncConnection[Any]:
    """A connection holding an exclusive lock on ``tables`` until it rolls back."""
    conn = await psycopg.AsyncConnection.connect(url)
    await conn.execute(f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE")
    return conn


async def test_a_locked_cache_costs_misses_then_is_skipped_until_a_probe(pg_url: str) -> None:
    """Reads and writes wait at most ``op_timeout`` for a lock; after three failures in a row
    the store stops asking, and after the cooldown one call finds the database back. Sweeps
    and invalidation are maintenance: they wait for the lock instead of failing."""
    now = [0.0]
    store = await PostgresCacheStore.create(pg_url, op_timeout=0.2, cooldown=5.0,
                                            clock=lambda: now[0])
    try:
        await store.set(CacheEntry("k", b"v", 0.0, ("t",)))
        locker = await _lock(pg_url, "skinflint_cache")
        try:
            assert await asyncio.wait_for(store.get("k", 1.0), 5) is None  # statement timeout
            await asyncio.wait_for(store.set(CacheEntry("k2", b"v", 0.0)), 5)  # logged
            sweep = asyncio.create_task(store.sweep(now=1.0))
            assert await asyncio.wait_for(store.get("k", 1.0), 5) is None  # breaker opens
            await asyncio.sleep(0.5)
            assert not sweep.done()  # still waiting for the lock, past op_timeout
        finally:
            await locker.rollback()
            await locker.close()
        assert await asyncio.wait_for(sweep, 5) == 0
        assert await store.get("k", 1.0) is None  # skipped within the cooldown
        now[0] += 5.1
        assert await store.get("k", 1.0) == b"v"  # the probe succeeds
        await store.set(CacheEntry("k3", b"w", 0.0))
        assert await store.get("k3", 1.0) == b"w"
        assert await store.invalidate_tags(["t"]) == 1
    finally:
        await store.close()


async def test_a_locked_semantic_table_costs_an_empty_search(make_index: IndexFactory,
                                                              pg_url: str) -> None:
    index = await make_index(op_timeout=0.2)
    await index.add("p", "k", "question", unit(1.0))
    locker = await _lock(pg_url, f"skinflint_semantic_{DIM}", f"skinflint_semantic_{DIM}_used")
    try:
        assert await asyncio.wait_for(index.search("p", unit(1.0), 1), 5) == []
        await asyncio.wait_for(index.touch("k"), 5)  # logged, not raised
    finally:
        await locker.rollback()
        await locker.close()
    assert [key for key, _, _ in await index.search("p", unit(1.0), 1)] == ["k"]


@pytest.fixture
async def frozen_url(pg_url: str) -> AsyncIterator[tuple[str, FreezingProxy]]:
    """``pg_url`` through a :class:`~tests.proxy.FreezingProxy`, and the proxy."""
    parts = urlsplit(pg_url)
    assert parts.hostname is not None and parts.port is not None
    proxy = FreezingProxy(parts.hostname, parts.port)
    port = await proxy.start()
    yield urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}")), proxy
    await proxy.close()


async def test_a_server_that_stops_answering_is_given_up_on_then_skipped(
    frozen_url: tuple[str, FreezingProxy],
) -> None:
    """A hung server or a silent network answers nothing, so the statement timeout never fires
    and the driver's own cancellation would wait ten seconds: the store gives up after its
    deadline (op_timeout + 0.5 s) instead, skips the server after three such calls, and uses it
    again once a probe after the cooldown gets an answer."""
    url, proxy = frozen_url
    now = [0.0]
    store = await PostgresCacheStore.create(url, op_timeout=0.2, cooldown=5.0,
                                            clock=lambda: now[0])
    try:
        await store.set(CacheEntry("k", b"v", 0.0))
        proxy.freeze()
        assert await asyncio.wait_for(store.get("k", 1.0), 5) is None
        await asyncio.wait_for(store.set(CacheEntry("k2", b"w", 0.0)), 5)  # logged
        assert await asyncio.wait_for(store.get("k", 1.0), 5) is None  # the breaker opens
        assert await asyncio.wait_for(store.get("k", 1.0), 0.1) is None  # skipped: no wait
        proxy.thaw()
        now[0] += 5.1
        assert await asyncio.wait_for(store.get("k", 1.0), 5) == b"v"  # the probe succeeds
    finally:
        await store.close()


async def test_a_semantic_index_whose_server_stops_answering_returns_nothing(
    frozen_url: tuple[str, FreezingProxy],
) -> None:
    url, proxy = frozen_url
    index = await PgSemanticIndex.create(url, space="s", dim=DIM, pool_size=2, op_timeout=0.2)
    try:
        await index.add("p", "k", "question", unit(1.0))
        proxy.freeze()
        assert await asyncio.wait_for(index.search("p", unit(1.0), 1), 5) == []
        await asyncio.wait_for(index.add("p", "k2", "other", unit(0.0, 1.0)), 5)  # logged
        proxy.thaw()
    finally:
        await index.close()


async def test_unreachable_server_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"127\.0\.0\.1:1"):
        await PostgresCacheStore.create(DEAD_URL, timeout=2.0)
    with pytest.raises(ConfigError, match=r"127\.0\.0\.1:1"):
        await PgSemanticIndex.create(DEAD_URL, space="e", dim=DIM, timeout=2.0)
    with pytest.raises(ConfigError, match=r"127\.0\.0\.1:1"):
        await PostgresLedger.create(DEAD_URL)


# ---------------------------------------------------------------- the semantic index


def unit(*values: float) -> Vector:
    vector = np.zeros(DIM, dtype=np.float32)
    vector[: len(values)] = values
    return (vector / np.linalg.norm(vector)).astype(np.float32)


IndexFactory = Callable[..., Awaitable[PgSemanticIndex]]


@pytest.fixture
async def make_index(pg_url: str) -> AsyncIterator[IndexFactory]:
    made: list[PgSemanticIndex] = []

    async def make(space: str = "local-minilm", **options: Any) -> PgSemanticIndex:
        options.setdefault("evict_every", 10_000)
        index = await PgSemanticIndex.create(pg_url, space=space, dim=DIM, pool_size=2, **options)
        made.append(index)
        return index

    yield make
    for index in made:
        await index.close()


async def test_semantic_top_k_most_similar_first(make_index: IndexFactory) -> None:
    index = await make_index()
    angles = [0.0, 0.3, 0.6, 0.9, 1.2]
    for i, angle in enumerate(angles):
        await index.add("p", f"k{i}", f"question {i}", unit(np.cos(angle), np.sin(angle)))
    found = await index.search("p", unit(1.0), 3)
    assert [(key, text) for key, _, text in found] == [
        ("k0", "question 0"), ("k1", "question 1"), ("k2", "question 2")]
    assert [score for _, score, _ in found] == pytest.approx(np.cos(angles[:3]), abs=1e-5)
    assert await index.search("p", unit(1.0), 0) == []
    assert await index.search("empty", unit(1.0), 3) == []


async def test_semantic_partitions_are_isolated(make_index: IndexFactory) -> None:
    index = await make_index()
    await index.add("tenant:1", "a", "q", unit(1.0))
    await index.add("tenant:2", "b", "q", unit(1.0))
    assert [key for key, _, _ in await index.search("tenant:1", unit(1.0), 5)] == ["a"]
    assert [key for key, _, _ in await index.search("tenant:2", unit(1.0), 5)] == ["b"]


async def test_semantic_spaces_never_mix(make_index: IndexFactory) -> None:
    one, two = await make_index("embedder-a"), await make_index("embedder-b")
    await one.add("p", "k", "from a", unit(1.0))
    assert await two.search("p", unit(1.0), 5) == []
    assert await two.count() == 0
    await two.add("p", "k", "from b", unit(0.0, 1.0))
    await one.remove("k")
    assert await one.count() == 0
    assert [text for _, _, text in await two.search("p", unit(1.0), 5)] == ["from b"]


async def test_semantic_add_replaces_and_remove_forgets(make_index: IndexFactory) -> None:
    index = await make_index()
    await index.add("p1", "k", "first", unit(1.0))
    await index.add("p2", "k", "second", unit(1.0))
    assert await index.count() == 1
    assert await index.search("p1", unit(1.0), 5) == []
    assert [text for _, _, text in await index.search("p2", unit(1.0), 5)] == ["second"]
    await index.remove("k")
    await index.remove("never-added")
    assert await index.count() == 0
    assert await index.search("p2", unit(1.0), 5) == []


async def test_semantic_evicts_least_recently_used(make_index: IndexFactory) -> None:
    index = await make_index(max_entries=3)
    for key in "abcd":
        await index.add("p", key, key, unit(1.0, len(key)))
    await index.touch("a")
    assert await index.evict() == 1
    assert sorted(key for key, _, _ in await index.search("p", unit(1.0), 10)) == ["a", "c", "d"]
    assert await index.evict() == 0


async def test_semantic_evicts_in_the_background(make_index: IndexFactory) -> None:
    index = await make_index(max_entries=1, evict_every=3)
    for i in range(3):
        await index.add("p", f"k{i}", "q", unit(1.0, float(i)))
    await index.close()  # waits for the eviction the third addition started
    assert await (await make_index()).count() == 1


async def test_semantic_rejects_a_vector_of_the_wrong_size(make_index: IndexFactory) -> None:
    index = await make_index()
    with pytest.raises(ValueError, match="8 dimensions"):
        await index.add("p", "k", "q", np.ones(DIM + 1, dtype=np.float32))
    with pytest.raises(ConfigError, match="2000"):
        await PgSemanticIndex.create(DEAD_URL, space="e", dim=4096)


async def test_semantic_search_uses_the_hnsw_index(make_index: IndexFactory, pg_url: str) -> None:
    index = await make_index()
    rng = np.random.default_rng(7)
    for i in range(40):
        await index.add(f"p{i % 2}", f"k{i}", "q", unit(*rng.normal(size=DIM)))
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await register_vector_async(conn)
        # Too few rows for the planner to prefer the index on its own: price sorting out, so
        # that only an index whose order serves ORDER BY ... LIMIT can win.
        await conn.execute("SET enable_sort = off")
        sql = pg_semantic._SemanticSQL(f"skinflint_semantic_{DIM}").search
        params = {"v": unit(1.0), "space": index.space, "partition": "p0", "k": 3}
        plan = await (await conn.execute("EXPLAIN " + sql, params)).fetchall()
        found = await (await conn.execute(sql, params)).fetchall()
    assert "skinflint_semantic_8_hnsw" in "\n".join(row[0] for row in plan)
    assert [key for key, _, _ in found] == [key for key, _, _ in await index.search(
        "p0", unit(1.0), 3)]


# ---------------------------------------------------------------- the ledger


def records(n: int, start: float = 1000.0) -> list[LedgerRecord]:
    return [
        LedgerRecord(f"req-{i}", start + i, feature="faq", user=f"u{i % 3}", model="gpt-4o-mini",
                     input_tokens=i, cost_usd=None if i % 4 == 0 else i / 7,
                     similarity=0.93 if i % 5 == 0 else None, status=200 + i % 2)
        for i in range(n)
    ]


async def test_ledger_record_flush_query(pg_url: str) -> None:
    ledger = await PostgresLedger.create(pg_url, flush_interval=60)
    try:
        written = records(300)
        for record in written:
            ledger.record(record)
        await asyncio.to_thread(ledger.flush)
        assert await asyncio.to_thread(lambda: list(ledger.query())) == written
        assert list(ledger.query(since=1250.0)) == written[250:]
    finally:
        ledger.close()


def test_ledger_close_loses_nothing(pg_url: str) -> None:
    one, two = PostgresLedger(pg_url, flush_interval=60), PostgresLedger(pg_url, flush_interval=60)
    for record in records(50):
        one.record(record)
    for record in records(50, start=2000.0):
        two.record(record)
    one.close()
    two.close()
    reader = PostgresLedger(pg_url)
    try:
        assert list(reader.query()) == records(50) + records(50, start=2000.0)
    finally:
        reader.close()


def test_ledger_keeps_records_through_failures(pg_url: str) -> None:
    ledger = PostgresLedger(pg_url, flush_interval=60)
    admin = psycopg.connect(pg_url, autocommit=True)
    try:
        admin.execute("ALTER TABLE skinflint_ledger RENAME TO away")
        for record in records(10):
            ledger.record(record)
        ledger.flush()  # fails, logs and holds the records
        admin.execute("ALTER TABLE away RENAME TO skinflint_ledger")
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                      " WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'")
        ledger.record(records(11)[10])
        ledger.flush()  # the broken connection fails once more; the records stay held
        ledger.flush()  # reconnects and writes them all
        assert list(ledger.query()) == records(11)
    finally:
        admin.close()
        ledger.close()


def test_ledger_retries_held_records_by_itself_and_spills_past_max_held(
    pg_url: str, tmp_path: Path,
) -> None:
    """Records the server refuses are written once it takes them, with no new record to carry
    them; past ``max_held`` they wait in the spill file rather than being dropped."""
    spill = tmp_path / "spill.jsonl"
    ledger = PostgresLedger(pg_url, flush_interval=0.05, max_held=5, spill=spill)
    admin = psycopg.connect(pg_url, autocommit=True)
    try:
        admin.execute("ALTER TABLE skinflint_ledger RENAME TO away")
        for record in records(10):
            ledger.record(record)
        deadline = time.monotonic() + 10
        while not spill.is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert spill.is_file()
        admin.execute("ALTER TABLE away RENAME TO skinflint_ledger")
        count = 0
        while count < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
            row = admin.execute("SELECT COUNT(*) FROM skinflint_ledger").fetchone()
            count = row[0] if row else 0
        assert list(ledger.query()) == records(10)
        assert list(tmp_path.iterdir()) == []
    finally:
        admin.close()
        ledger.close()


async def test_ledger_writes_to_a_server_that_stops_answering_are_cut_off_and_held(
    frozen_url: tuple[str, FreezingProxy], tmp_path: Path,
) -> None:
    """A COPY that gets no answer is cut off after ``write_timeout``, its records held, and
    written once the server answers again. Closing never waits on a silent server: what it
    could not write is saved to the spill file, and the next ledger writes it first."""
    url, proxy = frozen_url
    spill = tmp_path / "spill.jsonl"
    ledger = await PostgresLedger.create(url, flush_interval=60, write_timeout=0.5, spill=spill)
    last = records(1, start=3000.0)
    try:
        first, later = records(3), records(4, start=2000.0)
        for record in first:
            ledger.record(record)
        await asyncio.to_thread(ledger.flush)
        proxy.freeze()
        for record in later:
            ledger.record(record)
        await asyncio.wait_for(asyncio.to_thread(ledger.flush), 10)  # cut off, held
        proxy.thaw()
        await asyncio.wait_for(asyncio.to_thread(ledger.flush), 10)
        assert await asyncio.to_thread(lambda: list(ledger.query())) == first + later
        proxy.freeze()
        ledger.record(last[0])
    finally:
        await asyncio.wait_for(asyncio.to_thread(ledger.close), 30)
        proxy.thaw()
    assert spill.is_file()
    reader = await PostgresLedger.create(url, spill=spill)
    try:
        assert await asyncio.to_thread(lambda: list(reader.query())) == first + later + last
        assert list(tmp_path.iterdir()) == []  # written, so the claim is gone
    finally:
        await asyncio.to_thread(reader.close)

