"""The cache-store contract: every store (memory, SQLite behind memory, PostgreSQL, Redis)
keeps one behaviour, tested against real servers; then what is particular to Redis."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from skinflint.errors import ConfigError
from skinflint.interfaces import CacheEntry, CacheStore
from skinflint.models import LedgerRecord
from skinflint.storage.cache import MemoryCacheStore, TieredCacheStore
from skinflint.storage.ledger import SQLiteLedger
from tests import pg
from tests.redis_server import spawn_redis

StoreFactory = Callable[[int], Awaitable[CacheStore]]


@pytest.fixture(params=["memory", "sqlite", "postgres", "redis"])
async def make_store(request: pytest.FixtureRequest,
                     tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Builds stores bounded to ``max_entries``; stores built in one test share their data, as
    replicas do (an in-process store stands for every replica by being one object)."""
    fixture = {"postgres": "pg_url", "redis": "redis_url"}.get(request.param)
    url = request.getfixturevalue(fixture) if fixture else ""
    memory = MemoryCacheStore()
    made: list[CacheStore] = [memory]
    tiered: list[TieredCacheStore] = []

    async def make(max_entries: int = 1000) -> CacheStore:
        if request.param == "sqlite":
            if not tiered:
                # a tiny memory tier, so reads exercise the disk
                tiered.append(TieredCacheStore(str(tmp_path / "c.db"), memory_entries=1,
                                               max_entries=max_entries, flush_interval=0.01))
                made.append(tiered[0])
            return tiered[0]
        if not url:
            memory.max_entries = max_entries
            return memory
        store: CacheStore
        if request.param == "redis":
            from skinflint.storage.redis_cache import RedisCacheStore

            store = await RedisCacheStore.create(url, max_entries=max_entries)
        else:
            pg.import_or_skip("psycopg")
            from skinflint.storage.postgres import PostgresCacheStore

            store = await PostgresCacheStore.create(
                url, max_entries=max_entries, sweep_every=10_000, pool_size=2)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


async def settle(store: CacheStore) -> None:
    """Let a store enforce its bound (the PostgreSQL store does so in occasional sweeps)."""
    if hasattr(store, "sweep"):  # PostgreSQL
        await store.sweep(now=1.0)
    if isinstance(store, TieredCacheStore):
        store.flush()


async def test_cache_set_get_round_trip(make_store: StoreFactory) -> None:
    store = await make_store(1000)
    value = bytes(range(256)) * 3
    await store.set(CacheEntry("k", value, 0.0))
    assert await store.get("k", 1e12) == value  # 0 never expires
    assert await store.get("absent", 1.0) is None
    assert (await store.stats())["entries"] == 1


async def test_cache_expiry(make_store: StoreFactory) -> None:
    store = await make_store(1000)
    await store.set(CacheEntry("k", b"v", 100.0))
    assert await store.get("k", 99.9) == b"v"
    assert await store.get("k", 100.0) is None


async def test_cache_tags_invalidate(make_store: StoreFactory) -> None:
    store = await make_store(1000)
    await store.set(CacheEntry("a", b"1", 0.0, ("user:1", "faq:v1")))
    await store.set(CacheEntry("b", b"2", 0.0, ("faq:v1",)))
    await store.set(CacheEntry("c", b"3", 0.0))
    assert await store.invalidate_tags([]) == 0
    assert await store.invalidate_tags(["user:1"]) == 1
    assert await store.get("a", 1.0) is None
    assert await store.get("b", 1.0) == b"2"
    assert await store.invalidate_tags(["faq:v1", "nothing"]) == 1
    assert await store.get("b", 1.0) is None
    assert await store.get("c", 1.0) == b"3"


async def test_cache_overwrite_replaces_value_and_tags(make_store: StoreFactory) -> None:
    store = await make_store(1000)
    await store.set(CacheEntry("k", b"old", 0.0, ("v1",)))
    await store.set(CacheEntry("k", b"new", 0.0, ("v2",)))
    assert await store.get("k", 1.0) == b"new"
    assert await store.invalidate_tags(["v1"]) == 0
    assert await store.invalidate_tags(["v2"]) == 1


async def test_cache_evicts_oldest_writes_first(make_store: StoreFactory) -> None:
    store = await make_store(3)
    for i in range(5):
        await store.set(CacheEntry(f"k{i}", b"v", 0.0))
    await settle(store)
    assert [await store.get(f"k{i}", 1.0) for i in range(5)] == [None, None, b"v", b"v", b"v"]
    assert (await store.stats())["entries"] == 3


async def test_cache_shared_between_replicas(make_store: StoreFactory) -> None:
    one, two = await make_store(1000), await make_store(1000)
    await one.set(CacheEntry("k", b"v", 0.0, ("t",)))
    assert await two.get("k", 1.0) == b"v"
    assert await two.invalidate_tags(["t"]) == 1
    assert await one.get("k", 1.0) is None


async def test_tiered_stores_learn_what_another_process_wrote(tmp_path: Path) -> None:
    """Two processes on one file (``serve --workers 2``): an entry one writes after the other
    opened the file is served by the other once it has polled the file."""
    path = str(tmp_path / "cache.db")
    one, two = TieredCacheStore(path, flush_interval=0.01), TieredCacheStore(path)
    try:
        await one.set(CacheEntry("k", b"v", 0.0))
        await settle(one)
        assert await two.get("k", 1.0) is None  # not known yet: a miss costs no disk read
        assert await two.invalidations() == []
        assert await two.get("k", 1.0) == b"v"
    finally:
        await one.close()
        await two.close()


# ---------------------------------------------------------------- Redis specifics


async def test_tiered_lookup_during_an_invalidation_never_revives_the_entry(
    tmp_path: Path,
) -> None:
    """After a restart the entry is on disk only; a lookup while its tag is being invalidated
    must not read it back into memory, where it would outlive the invalidation."""
    path = str(tmp_path / "cache.db")
    for trial in range(5):
        store = TieredCacheStore(path)
        await store.set(CacheEntry(f"k{trial}", b"stale", 0.0, ("doc:1",)))
        await store.close()
        store = TieredCacheStore(path, flush_interval=60)  # memory empty, the key on disk
        try:
            for i in range(2000):  # pending writes the invalidation flushes first
                await store.set(CacheEntry(f"other{trial}-{i}", b"x" * 200, 0.0))
            invalidation = asyncio.ensure_future(store.invalidate_tags(["doc:1"]))
            await asyncio.sleep(0)
            assert await store.get(f"k{trial}", 1.0) is None
            assert await invalidation == 1
            assert await store.get(f"k{trial}", 1.0) is None
        finally:
            await store.close()


async def test_redis_prefixes_keep_environments_apart(redis_url: str) -> None:
    from skinflint.storage.redis_cache import RedisCacheStore

    staging = await RedisCacheStore.create(redis_url, prefix="staging:")
    prod = await RedisCacheStore.create(redis_url, prefix="prod:")
    try:
        await staging.set(CacheEntry("k", b"staging", 0.0, ("t",)))
        assert await prod.get("k", 1.0) is None
        await prod.set(CacheEntry("k", b"prod", 0.0, ("t",)))
        assert await prod.invalidate_tags(["t"]) == 1
        assert await staging.get("k", 1.0) == b"staging"
    finally:
        await staging.close()
        await prod.close()


async def test_redis_tag_sets_forget_evicted_entries(redis_url: str) -> None:
    from skinflint.storage.redis_cache import RedisCacheStore

    store = await RedisCacheStore.create(redis_url, max_entries=2)
    try:
        for i in range(4):
            await store.set(CacheEntry(f"k{i}", b"v", 0.0, ("all",)))
        assert store.evictions == 2
        assert await store.invalidate_tags(["all"]) == 2  # only the live entries count
        assert (await store.stats())["entries"] == 0
    finally:
        await store.close()


async def test_redis_connections_are_bounded(redis_url: str) -> None:
    import redis

    from skinflint.storage.redis_cache import RedisCacheStore

    with redis.Redis.from_url(redis_url) as admin:
        before = len(admin.client_list())
        store = await RedisCacheStore.create(redis_url, pool_size=2)
        try:
            await asyncio.gather(*(store.set(CacheEntry(f"k{i}", b"v", 0.0)) for i in range(50)))
            got = await asyncio.gather(*(store.get(f"k{i}", 1.0) for i in range(50)))
            assert got == [b"v"] * 50
            assert len(admin.client_list()) - before <= 2
        finally:
            await store.close()


@pytest.mark.parametrize("url", ["redis://:secret@127.0.0.1:1/0",
                                 "redis://127.0.0.1:1/0?password=secret"])
async def test_unreachable_redis_is_a_config_error(url: str) -> None:
    from skinflint.storage.redis_cache import RedisCacheStore

    with pytest.raises(ConfigError, match=r"storage\.redis_url") as raised:
        await RedisCacheStore.create(url, timeout=1.0)
    assert "secret" not in str(raised.value) and "127.0.0.1:1/0" in str(raised.value)


async def test_redis_tags_may_hold_any_character(redis_url: str) -> None:
    from skinflint.storage.redis_cache import RedisCacheStore

    store = await RedisCacheStore.create(redis_url)
    try:
        odd = ("a\x1fb", "", "ünï:cödé", '"quoted" \\ tag')
        await store.set(CacheEntry("k", b"v", 0.0, odd))
        await store.set(CacheEntry("k", b"w", 0.0, ("c",)))  # rewritten: the old tags let go
        assert await store.invalidate_tags(list(odd)) == 0
        assert await store.get("k", 1.0) == b"w"
        await store.set(CacheEntry("j", b"v", 0.0, odd))
        assert await store.invalidate_tags(["a\x1fb"]) == 1
        import redis

        with redis.Redis.from_url(redis_url) as admin:
            assert not [k for k in admin.keys("skinflint:t:*") if k != b"skinflint:t:c"]
    finally:
        await store.close()


async def test_redis_warns_when_the_server_may_evict_any_key(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    import redis

    from skinflint.storage.redis_cache import RedisCacheStore

    with redis.Redis.from_url(redis_url) as admin:
        admin.config_set("maxmemory-policy", "allkeys-lru")
        try:
            store = await RedisCacheStore.create(redis_url)
            await store.close()
        finally:
            admin.config_set("maxmemory-policy", "noeviction")
    assert "allkeys-lru" in caplog.text


def test_cli_invalidates_under_the_configured_prefix(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio
    import json

    import yaml

    from skinflint.cli import main
    from skinflint.storage.redis_cache import RedisCacheStore

    async def seed() -> None:
        store = await RedisCacheStore.create(redis_url, prefix="prod:")
        await store.set(CacheEntry("k", b"v", 0.0, ("user:42",)))
        await store.close()

    asyncio.run(seed())
    config = tmp_path / "skinflint.yaml"
    ledger_path = tmp_path / "ledger.db"
    config.write_text(yaml.safe_dump({"storage": {"redis_url": redis_url, "redis_prefix": "prod:",
                                                  "sqlite_path": str(ledger_path)}}))
    base = ["--config", str(config), "cache"]
    assert main([*base, "stats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"entries": 1}  # no ledger written yet
    ledger = SQLiteLedger(str(ledger_path))
    for n, status in enumerate(("miss", "hit-exact", "hit-semantic", "miss")):
        ledger.record(LedgerRecord(f"r{n}", 1.0, cache_status=status, saved_usd=0.5))
    ledger.close()
    assert main([*base, "stats", "--json"]) == 0  # entries from Redis, hits from the ledger
    assert json.loads(capsys.readouterr().out) == {
        "entries": 1, "requests": 4, "hits": 2, "semantic_hits": 1, "hit_rate": 0.5,
        "saved_usd": 1.0, "bypassed": {"client-bypass": 0, "cache-disabled": 0,
                                       "temperature-unset": 0, "temperature-above-max": 0}}
    assert main([*base, "invalidate", "--tag", "user:42", "--url", "http://127.0.0.1:9",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["invalidated"] == 1 and result["where"] == "redis"
    assert result["running"] is None  # replicas read Redis directly: none to wait for
    assert "http://127.0.0.1:9" in result["gateway_error"]


async def test_redis_failure_is_a_miss(tmp_path: Path) -> None:
    """A server that goes away turns reads and writes into misses instead of errors."""
    from skinflint.storage.redis_cache import RedisCacheStore

    port = pg.free_port()
    proc = spawn_redis(port)
    try:
        store = await _connect_when_up(RedisCacheStore, f"redis://127.0.0.1:{port}/0",
                                       cooldown=0.02)
        await store.set(CacheEntry("k", b"v", 0.0))
        assert await store.get("k", 1.0) == b"v"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    try:
        assert await store.get("k", 1.0) is None
        await store.set(CacheEntry("k2", b"v", 0.0))  # logged, not raised
        # a restarted (empty) server: the store reconnects and loads its scripts again
        proc = spawn_redis(port)
        for _ in range(100):
            await store.set(CacheEntry("k3", b"back", 0.0, ("t",)))
            if await store.get("k3", 1.0) == b"back":
                break
            await asyncio.sleep(0.05)
        assert await store.get("k3", 1.0) == b"back"
        assert await store.invalidate_tags(["t"]) == 1
    finally:
        await store.close()
        proc.terminate()
        proc.wait(timeout=10)


async def test_redis_that_hangs_is_skipped_until_a_probe_finds_it_back() -> None:
    """A stopped (not closed) server times every command out; after three failures in a row the
    store stops asking it, and after the cooldown one call finds it answering again."""
    import redis as sync_redis

    from skinflint.storage.redis_cache import RedisCacheStore

    port = pg.free_port()
    url = f"redis://127.0.0.1:{port}/0"
    proc = spawn_redis(port)
    now = [0.0]
    try:
        store = await _connect_when_up(RedisCacheStore, url, op_timeout=0.2, cooldown=5.0,
                                       clock=lambda: now[0])
        await store.set(CacheEntry("k", b"v", 0.0))
        proc.send_signal(signal.SIGSTOP)
        try:
            assert await store.get("k", 1.0) is None  # timed out
            await store.set(CacheEntry("late", b"v", 0.0))  # timed out, logged
            assert await store.get("k", 1.0) is None  # the third failure opens the breaker
        finally:
            proc.send_signal(signal.SIGCONT)
        direct = sync_redis.Redis.from_url(url, socket_timeout=2)
        direct.ping()
        # the server answers again, but within the cooldown the store does not ask it
        assert await store.get("k", 1.0) is None
        await store.set(CacheEntry("skipped", b"v", 0.0))
        now[0] += 4.9
        assert await store.get("k", 1.0) is None
        now[0] += 0.2  # past the cooldown: this call probes, succeeds and closes the breaker
        assert await store.get("k", 1.0) == b"v"
        await store.set(CacheEntry("after", b"w", 0.0))
        assert await store.get("after", 1.0) == b"w"
        assert not direct.exists("skinflint:c:skipped")  # never sent
        direct.close()
        await store.close()
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        proc.wait(timeout=10)


async def _connect_when_up(cls: type, url: str, **options: object) -> object:
    for _ in range(100):
        try:
            return await cls.create(url, timeout=1.0, **options)
        except ConfigError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"redis at {url} did not come up")
