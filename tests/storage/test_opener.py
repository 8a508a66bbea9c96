"""The storage opener: where each store lives for each configuration and ``--db`` target, the
stores it opens on every backend (SQLite in a temporary directory, PostgreSQL and Redis on real
servers), and that commands opening an existing storage create nothing."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from skinflint.analytics.cachestats import stats
from skinflint.analytics.invalidation import invalidate
from skinflint.analytics.report import read_records
from skinflint.config import Settings, settings_from_dict
from skinflint.errors import ConfigError
from skinflint.interfaces import CacheEntry
from skinflint.models import LedgerRecord
from skinflint.storage.cache import TieredCacheStore
from skinflint.storage.ledger import MemoryLedger, SQLiteLedger
from skinflint.storage.opener import (
    LedgerFigures,
    Location,
    NotStoredError,
    locate,
    open_storage,
)
from skinflint.storage.semantic import LocalSemanticIndex
from tests import pg

PG = "postgresql://app@db/ledger"
REDIS = "redis://cache:6379/0"


def _settings(**storage: Any) -> Settings:
    return settings_from_dict({"storage": storage}, env={})


def _vector(*values: float) -> Any:
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


@pytest.mark.parametrize(
    ("storage", "db", "expected"),
    [
        ({"sqlite_path": "a.db"}, None, Location("a.db", "a.db", "a.db")),
        ({"postgres_url": PG}, None, Location(PG, PG, PG)),
        ({"redis_url": REDIS, "sqlite_path": "a.db"}, None, Location("a.db", REDIS, "a.db")),
        ({"redis_url": REDIS, "postgres_url": PG}, None, Location(PG, REDIS, PG)),
        # a --db target replaces the configured storage entirely
        ({"redis_url": REDIS, "postgres_url": PG}, "b.db", Location("b.db", "b.db", "b.db")),
        ({"sqlite_path": "a.db"}, PG, Location(PG, PG, PG)),
        ({"postgres_url": PG}, REDIS, Location(None, REDIS, None)),  # Redis keeps no ledger
    ],
)
def test_one_decision_places_every_store(
    storage: dict[str, str], db: str | None, expected: Location
) -> None:
    assert locate(_settings(**storage), db) == expected


async def test_sqlite_storage_opens_every_store_in_one_file(tmp_path: Path) -> None:
    db = tmp_path / "new" / "dir" / "skinflint.db"
    storage = open_storage(_settings(sqlite_path=str(db), ledger_flush_interval=0.01))
    assert db.parent.is_dir()  # created for the gateway
    ledger, cache = await storage.ledger(), await storage.cache()
    assert isinstance(ledger, SQLiteLedger) and isinstance(cache, TieredCacheStore)
    assert await storage.ledger() is ledger and await storage.cache() is cache  # kept
    ledger.record(LedgerRecord("r1", time.time(), cache_status="hit-exact", saved_usd=0.5))
    await cache.set(CacheEntry("k", b"value", 0.0, ("user:1",)))
    index = await storage.semantic_index("space-a", 2)
    assert isinstance(index, LocalSemanticIndex)
    await index.add("p", "k", "a question", _vector(1, 0))
    assert [key for key, _, _ in await index.search("p", _vector(1, 0.1), 1)] == ["k"]
    await index.close()  # the caller owns the index
    await storage.close()  # writes what the ledger and the cache hold

    again = open_storage(_settings(sqlite_path=str(db)), existing=True)
    assert [r.request_id for r in (await again.ledger()).query()] == ["r1"]
    assert (await again.cache_figures())["entries"] == 1
    assert (await again.cache_figures())["semantic_entries"] == 1
    assert await again.ledger_figures() == LedgerFigures(1, 1, 0, 0.5, {})
    await again.close()


async def test_a_given_ledger_replaces_the_configured_one(tmp_path: Path) -> None:
    mine = MemoryLedger()
    storage = open_storage(_settings(sqlite_path=str(tmp_path / "s.db")), ledger=mine)
    assert await storage.ledger() is mine
    await storage.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no ledger table needed a file


async def test_an_existing_storage_that_is_not_there_is_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "skinflint.db"
    storage = open_storage(_settings(sqlite_path=str(missing)), existing=True)
    for opening in (storage.ledger, storage.cache, storage.cache_figures):
        with pytest.raises(FileNotFoundError) as raised:
            await opening()
        assert raised.value.filename == str(missing)
    assert await storage.ledger_figures() is None
    with pytest.raises(FileNotFoundError):
        await storage.semantic_index("space", 2)
    await storage.close()
    assert list(tmp_path.iterdir()) == []


def _ledger_only(path: Path) -> list[str]:
    """A file with a ledger and no cache (as an older version or another tool wrote it);
    returns its schema."""
    ledger = SQLiteLedger(str(path))
    ledger.record(LedgerRecord("r1", 1.0, cache_status="bypass", cache_reason="client-bypass"))
    ledger.close()
    return _schema(path)


def _schema(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return sorted(str(r[0]) for r in conn.execute("SELECT sql FROM sqlite_master"))
    finally:
        conn.close()


async def test_an_existing_file_without_a_cache_has_none_opened(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    schema = _ledger_only(db)
    storage = open_storage(_settings(sqlite_path=str(db)), existing=True)
    with pytest.raises(NotStoredError):
        await storage.cache()
    assert await storage.cache_figures() == {"entries": 0, "expired": 0, "bytes": 0, "tags": 0}
    figures = await storage.ledger_figures()
    assert figures is not None and figures.bypassed == {"client-bypass": 1}
    await storage.close()
    assert _schema(db) == schema


def test_commands_read_an_existing_file_as_it_is(tmp_path: Path) -> None:
    """cache stats and cache invalidate change nothing in a file without a cache; a missing
    file is named, never created."""
    db = tmp_path / "ledger.db"
    schema = _ledger_only(db)
    figures = stats(Settings(), str(db))
    assert (figures["entries"], figures["requests"], figures["hits"]) == (0, 1, 0)
    done = invalidate(Settings(), ["user:1"], db=str(db))
    assert (done.invalidated, done.running, done.where) == (0, 0, str(db))
    assert _schema(db) == schema
    assert [r.request_id for r in read_records(Settings(), db=str(db))] == ["r1"]
    missing = str(tmp_path / "missing.db")
    with pytest.raises(FileNotFoundError, match="no cache database"):
        stats(Settings(), missing)
    with pytest.raises(ValueError, match="no database at"):
        invalidate(Settings(), ["t"], db=missing)
    with pytest.raises(ConfigError, match="no ledger at"):
        read_records(_settings(sqlite_path=missing))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.db"]


def test_commands_invalidate_through_the_cache_store_and_its_log(tmp_path: Path) -> None:
    """The command's deletion is logged in the file, where a gateway's store finds it."""
    db = str(tmp_path / "skinflint.db")

    async def gateway_store() -> TieredCacheStore:
        store = TieredCacheStore(db)
        await store.set(CacheEntry("k1", b"v", 0.0, ("user:1",)))
        await store.set(CacheEntry("k2", b"v", 0.0, ("user:2",)))
        store.flush()
        await store.invalidations()  # up to date with the log before the command runs
        return store

    async def scenario() -> None:
        store = await gateway_store()
        done = await asyncio.to_thread(invalidate, Settings(), ["user:1"], db=db,
                                       confirm_seconds=0)
        assert (done.invalidated, done.running) == (1, 0)
        assert await store.invalidations() == [("user:1",)]
        assert await store.get("k1", time.time()) == b"v"  # in memory until it forgets
        await store.forget_tags(["user:1"])
        assert await store.get("k1", time.time()) is None
        await store.close()

    asyncio.run(scenario())
    assert stats(Settings(), db)["entries"] == 1


async def test_postgres_storage_holds_every_store(pg_url: str, tmp_path: Path) -> None:
    pg.import_or_skip("psycopg")
    from skinflint.storage.pg_ledger import PostgresLedger
    from skinflint.storage.pg_semantic import PgSemanticIndex
    from skinflint.storage.postgres import PostgresCacheStore

    settings = _settings(postgres_url=pg_url, sqlite_path=str(tmp_path / "local" / "s.db"))
    storage = open_storage(settings)
    ledger, cache = await storage.ledger(), await storage.cache()
    assert isinstance(ledger, PostgresLedger) and isinstance(cache, PostgresCacheStore)
    ledger.record(LedgerRecord("r1", time.time(), cache_status="hit-semantic", saved_usd=0.25))
    await cache.set(CacheEntry("k", b"value", 0.0, ("t",)))
    index = await storage.semantic_index("space-a", 2)
    assert isinstance(index, PgSemanticIndex)
    await index.add("p", "k", "a question", _vector(1, 0))
    assert await index.count() == 1
    await index.close()
    await storage.close()
    assert (tmp_path / "local").is_dir()  # where the ledger would spill

    reader = open_storage(Settings(), db=pg_url, existing=True)
    assert await reader.cache_figures() == {"entries": 1, "bytes": 5}
    assert await reader.ledger_figures() == LedgerFigures(1, 1, 1, 0.25, {})
    await reader.close()


async def test_redis_holds_the_cache_and_the_ledger_stays_local(
    redis_url: str, tmp_path: Path
) -> None:
    pg.import_or_skip("redis")
    from skinflint.storage.redis_cache import RedisCacheStore

    db = tmp_path / "s.db"
    settings = _settings(redis_url=redis_url, sqlite_path=str(db), redis_prefix="env:")
    storage = open_storage(settings)
    ledger, cache = await storage.ledger(), await storage.cache()
    assert isinstance(ledger, SQLiteLedger) and isinstance(cache, RedisCacheStore)
    await cache.set(CacheEntry("k", b"value", 0.0, ("t",)))
    ledger.record(LedgerRecord("r1", time.time()))
    await storage.close()

    configured = open_storage(settings, existing=True)  # entries from Redis, hits from SQLite
    assert await configured.cache_figures() == {"entries": 1}
    assert (await configured.ledger_figures()) == LedgerFigures(1, 0, 0, 0.0, {})
    await configured.close()
    target = open_storage(settings, db=redis_url, existing=True)  # the prefix still applies
    assert await target.cache_figures() == {"entries": 1}
    assert await target.ledger_figures() is None
    with pytest.raises(NotStoredError):
        await target.ledger()
    await target.close()


async def test_budget_counters_live_where_the_settings_share_them(
    tmp_path: Path, redis_url: str,
) -> None:
    from skinflint.storage.counters import MemoryBudgetCounters
    from skinflint.storage.redis_counters import RedisBudgetCounters
    from skinflint.storage.sqlite_counters import SQLiteBudgetCounters

    db = str(tmp_path / "s.db")
    for settings, expected in (
        (_settings(sqlite_path=db), SQLiteBudgetCounters),
        (_settings(sqlite_path=":memory:"), MemoryBudgetCounters),
        (_settings(sqlite_path=db, redis_url=redis_url), RedisBudgetCounters),
    ):
        storage = open_storage(settings)
        try:
            assert isinstance(await storage.budget_counters(), expected)
        finally:
            await storage.close()
    missing = open_storage(_settings(sqlite_path=str(tmp_path / "none.db")), existing=True)
    with pytest.raises(FileNotFoundError):
        await missing.budget_counters()
    assert not (tmp_path / "none.db").exists()


async def test_budget_counters_share_postgres_without_redis(tmp_path: Path, pg_url: str) -> None:
    from skinflint.storage.pg_counters import PostgresBudgetCounters

    storage = open_storage(_settings(sqlite_path=str(tmp_path / "s.db"), postgres_url=pg_url))
    try:
        assert isinstance(await storage.budget_counters(), PostgresBudgetCounters)
    finally:
        await storage.close()
