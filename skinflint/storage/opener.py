"""Opening storage: the one place that decides, from validated settings, which backend holds
each store. The gateway, the commands and the analytics all open storage here.

* the ledger: PostgreSQL when ``storage.postgres_url`` is set, else the SQLite file;
* the exact cache's store: Redis when ``storage.redis_url`` is set, else PostgreSQL, else the
  SQLite file with an in-process LRU in front (shared stores get no in-process tier: replicas
  could not see each other's invalidations);
* the semantic index: PostgreSQL (pgvector) when ``postgres_url`` is set, else the SQLite file,
  searched in process;
* the alert store (the alerts raised; spend per window is read from the ledger): beside the
  ledger, in PostgreSQL or the SQLite file (none for ``:memory:``);
* the job store (deferred requests, provider batches, the pass-through API's files and
  batches): beside the ledger, in PostgreSQL or the SQLite file (in memory for ``:memory:``);
* the budget counters: Redis when ``redis_url`` is set, else PostgreSQL when
  ``postgres_url`` is, else the SQLite file (shared by ``serve --workers N``), in memory when
  that file is ``:memory:``.

A command that reads or edits what gateways wrote opens it with ``existing=True`` and may name
another storage with ``db`` (its ``--db``): a SQLite path holds every store, a
``postgresql://`` URL the ledger and the cache, a ``redis://`` URL the cache only. Then nothing
is created: a SQLite file that is not there raises FileNotFoundError.

The PostgreSQL and Redis drivers are optional extras, imported only when a URL names them.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from skinflint.config import Settings
from skinflint.interfaces import BudgetCounters, CacheStore, JobStore, Ledger, SemanticIndex
from skinflint.storage import sqlite_queries
from skinflint.storage.alert_store import AlertStore, SQLiteAlertStore
from skinflint.storage.cache import TieredCacheStore
from skinflint.storage.counters import MemoryBudgetCounters
from skinflint.storage.ledger import SQLiteLedger
from skinflint.storage.semantic import LocalSemanticIndex
from skinflint.storage.spend import Spend, SpendSource
from skinflint.storage.spill import SPILL_NAME
from skinflint.storage.sqlite_counters import SQLiteBudgetCounters

__all__ = [
    "LedgerFigures",
    "Location",
    "NotStoredError",
    "Storage",
    "kind",
    "locate",
    "open_storage",
]

log = logging.getLogger("skinflint.storage")

Kind = Literal["sqlite", "postgres", "redis"]


def kind(target: str) -> Kind:
    """The backend a storage setting or ``--db`` names: a URL's scheme, else a SQLite path."""
    if target.startswith(("postgres://", "postgresql://")):
        return "postgres"
    if target.startswith(("redis://", "rediss://", "unix://")):
        return "redis"
    return "sqlite"


@dataclass(frozen=True, slots=True)
class Location:
    """Where each store lives: a SQLite path or a server URL. ``ledger`` and ``index`` are
    None for a Redis target, which holds the cache only."""

    ledger: str | None
    cache: str
    index: str | None


def locate(settings: Settings, db: str | None = None) -> Location:
    """Where the storage settings put each store or, when given, the storage ``db`` names."""
    if db is not None:
        return Location(None, db, None) if kind(db) == "redis" else Location(db, db, db)
    st = settings.storage
    home = st.postgres_url or st.sqlite_path
    return Location(home, st.redis_url or home, home)


class NotStoredError(LookupError):
    """The storage holds no such store: a SQLite file no gateway has kept a cache in, or a
    Redis target's ledger."""


@dataclass(frozen=True, slots=True)
class LedgerFigures:
    """Client requests (chat and embeddings, not the cascade or retried calls within one),
    those served by a cache and by the semantic cache, the USD those hits saved, and the calls
    the cache neither served nor stored by reason ("" for rows written before reasons were
    recorded)."""

    requests: int
    hits: int
    semantic_hits: int
    saved_usd: float
    bypassed: dict[str, int]


class Storage:
    """The stores of one process, opened by :func:`open_storage`. Each is opened on its first
    use and kept (open each once before sharing the bundle between tasks); :meth:`close`
    closes those opened, the ledger last, after writing what it holds.

    The guard stage's budget and rate-limit counters are a fourth store (see
    :meth:`budget_counters`)."""

    def __init__(
        self, settings: Settings, location: Location, *, existing: bool,
        ledger: Ledger | None = None,
    ) -> None:
        self.settings = settings
        self.location = location
        self.existing = existing
        self._ledger = ledger
        self._cache: CacheStore | None = None
        self._counters: BudgetCounters | None = None
        self._alerts: AlertStore | None = None
        self._jobs: JobStore | None = None

    async def ledger(self) -> Ledger:
        """The request ledger. Raises ConfigError when its server cannot be reached."""
        if self._ledger is None:
            self._ledger = await self._open_ledger()
        return self._ledger

    async def cache(self) -> CacheStore:
        """The exact cache's store. Raises ConfigError when its server cannot be reached."""
        if self._cache is None:
            self._cache = await self._open_cache()
        return self._cache

    async def budget_counters(self) -> BudgetCounters:
        """The budget counters: in Redis when the cache is, else in PostgreSQL when the ledger
        is (both shared by replicas), else a table of the SQLite file, which every process
        opening it shares (``serve --workers N``, the ``budgets`` command); in memory for
        ``:memory:``. Raises ConfigError when a server cannot be reached."""
        if self._counters is None and kind(self.location.cache) == "redis":
            from skinflint.storage.redis_counters import RedisBudgetCounters

            self._counters = await RedisBudgetCounters.create(
                self.location.cache, prefix=self.settings.storage.redis_prefix)
        home = self.location.ledger
        if self._counters is None and home is not None and kind(home) == "postgres":
            from skinflint.storage.pg_counters import PostgresBudgetCounters

            self._counters = await PostgresBudgetCounters.create(home)
        if self._counters is None:
            path = home if home and kind(home) == "sqlite" else self.settings.storage.sqlite_path
            if path == ":memory:":
                self._counters = MemoryBudgetCounters()
            else:
                self._must_exist(path)
                self._counters = await asyncio.to_thread(SQLiteBudgetCounters, path)
        return self._counters

    async def job_store(self) -> JobStore:
        """Deferred requests and batches, wherever the ledger is (see the module docstring).
        Raises ConfigError when its server cannot be reached."""
        if self._jobs is None:
            where = self.location.ledger or self.settings.storage.sqlite_path
            if kind(where) == "postgres":
                from skinflint.storage.pg_jobs import PostgresJobStore

                self._jobs = await asyncio.to_thread(PostgresJobStore, where)
            else:
                from skinflint.storage.sqlite_jobs import SQLiteJobStore

                self._must_exist(where)
                self._jobs = await asyncio.to_thread(SQLiteJobStore, where)
        return self._jobs

    async def alert_store(self) -> AlertStore:
        """The alerts raised, and spend per window read from the ledger, wherever the ledger
        is. Raises NotStoredError for a ledger that is not shared (``:memory:``, a Redis
        target), ConfigError when its server cannot be reached."""
        if self._alerts is None:
            where = self.location.ledger
            if where is None or where == ":memory:":
                raise NotStoredError(f"{where or self.location.cache} keeps no shared ledger")
            await self.ledger()  # whose table the store reads
            if kind(where) == "postgres":
                from skinflint.storage.pg_alert_store import PostgresAlertStore

                self._alerts = await PostgresAlertStore.create(where)
            else:
                self._must_exist(where)
                self._alerts = await SQLiteAlertStore.create(where)
        return self._alerts

    async def semantic_index(self, space: str, dim: int) -> SemanticIndex:
        """A new handle on the semantic index for vectors of ``space`` (the embedder's name) of
        ``dim`` dimensions; the caller closes it. Opened once the embedder is known, since it
        loads in the background."""
        where, max_entries = self.location.index, self.settings.cache.semantic.max_entries
        if where is None:
            raise NotStoredError(f"{self.location.cache} keeps no semantic index")
        if kind(where) == "postgres":
            from skinflint.storage.pg_semantic import PgSemanticIndex

            return await PgSemanticIndex.create(
                where, space=space, dim=dim, max_entries=max_entries)
        self._must_exist(where)
        return await asyncio.to_thread(
            LocalSemanticIndex, where, space, dim, max_entries=max_entries)

    async def cache_figures(self) -> dict[str, int]:
        """What the cache holds: its entries and, in a SQLite file, those expired, their bytes,
        the distinct tags and the semantic entries. Reads only: a SQLite file must exist."""
        where = self.location.cache
        if kind(where) == "sqlite":
            _must_be_file(where)
            return await asyncio.to_thread(sqlite_queries.cache_figures, where, time.time())
        figures = dict(await (await self.cache()).stats())
        figures.pop("evictions", None)  # counted by a running store: always 0 here
        return figures

    async def ledger_figures(self) -> LedgerFigures | None:
        """Hit and bypass counts from the ledger; None when there is none (no ledger table in
        the SQLite file, no file, or a Redis target). Reads only, from a SQLite file."""
        where = self.location.ledger
        if where is None:
            return None
        if kind(where) == "sqlite":
            if not Path(where).is_file():
                return None
            hits = await asyncio.to_thread(sqlite_queries.hit_counts, where)
            if hits is None:
                return None
            bypassed = await asyncio.to_thread(sqlite_queries.bypass_counts, where)
            return LedgerFigures(*hits, bypassed)
        from skinflint.storage.pg_ledger import PostgresLedger

        ledger = await self.ledger()
        assert isinstance(ledger, PostgresLedger)  # what a PostgreSQL location opens
        counts = await asyncio.to_thread(ledger.hit_counts)
        return LedgerFigures(*counts, await asyncio.to_thread(ledger.bypass_counts))

    async def spend(self, by: str, since: float, until: float, bucket: str) -> Spend:
        """Spend by ``by`` (one of :data:`~skinflint.storage.rollup.DIMENSIONS`) per ``bucket``
        (``hour`` or ``day``) from ``since`` to ``until`` (unix seconds), from the ledger's
        rollups, in a worker thread. Raises NotStoredError for a ledger without them."""
        source = await self._spend_source()
        return await asyncio.to_thread(source.spend, by, since, until, bucket)

    async def recent(self, limit: int) -> list[dict[str, Any]]:
        """The ledger's newest ``limit`` rows, newest first (see
        :data:`~skinflint.storage.rollup.RECENT_COLUMNS`), read in a worker thread."""
        source = await self._spend_source()
        return await asyncio.to_thread(source.recent, limit)

    async def _spend_source(self) -> SpendSource:
        ledger = await self.ledger()
        if not isinstance(ledger, SpendSource):
            raise NotStoredError(f"a {type(ledger).__name__} keeps no spend figures")
        return ledger

    async def close(self) -> None:
        """Close the stores opened: the counters, the cache, then the ledger (which writes or
        spills what is pending). A store that fails to close is logged and never keeps the
        ledger from closing."""
        try:
            for store in (self._jobs, self._alerts, self._counters, self._cache):
                if store is not None:
                    try:
                        await store.close()
                    except Exception:
                        log.exception("storage: could not close %s", type(store).__name__)
        finally:
            if self._ledger is not None:
                await asyncio.to_thread(self._ledger.close)

    def _must_exist(self, path: str) -> None:
        if self.existing:
            _must_be_file(path)

    async def _open_ledger(self) -> Ledger:
        st, where = self.settings.storage, self.location.ledger
        if where is None:
            raise NotStoredError(f"{self.location.cache} keeps no ledger")
        if kind(where) == "postgres":
            from skinflint.storage.pg_ledger import PostgresLedger

            if self.existing:  # read by a command: it writes nothing
                return await PostgresLedger.create(where)
            # What the server does not take waits on local disk, beside the SQLite file.
            spill = Path(st.sqlite_path).parent / SPILL_NAME
            return await PostgresLedger.create(
                where, flush_interval=st.ledger_flush_interval, spill=spill)
        self._must_exist(where)
        if self.existing or where == ":memory:":
            return SQLiteLedger(where, flush_interval=st.ledger_flush_interval)
        # What the file cannot take waits on disk beside it; the constructor writes what an
        # earlier process left there, before the gateway serves.
        return await asyncio.to_thread(
            SQLiteLedger, where, flush_interval=st.ledger_flush_interval,
            spill=Path(where).parent / SPILL_NAME)

    async def _open_cache(self) -> CacheStore:
        where, ex = self.location.cache, self.settings.cache.exact
        if kind(where) == "redis":
            from skinflint.storage.redis_cache import RedisCacheStore

            return await RedisCacheStore.create(
                where, prefix=self.settings.storage.redis_prefix, max_entries=ex.max_entries)
        if kind(where) == "postgres":
            from skinflint.storage.postgres import PostgresCacheStore

            one = {"pool_size": 1} if self.existing else {}  # a command's one statement
            return await PostgresCacheStore.create(where, max_entries=ex.max_entries, **one)
        self._must_exist(where)
        if self.existing and not await asyncio.to_thread(sqlite_queries.holds_cache, where):
            raise NotStoredError(f"no gateway has kept a cache in {where}")
        return TieredCacheStore(
            where,
            memory_entries=ex.memory_entries,
            memory_bytes=ex.memory_bytes,
            max_entries=ex.max_entries,
        )


def _must_be_file(path: str) -> None:
    if not Path(path).is_file():  # opening it would create an empty database
        raise FileNotFoundError(errno.ENOENT, "no database", path)


def open_storage(
    settings: Settings, *, ledger: Ledger | None = None, db: str | None = None,
    existing: bool = False,
) -> Storage:
    """The storage ``settings`` name (or ``db``, see :func:`locate`); ``ledger`` replaces the
    configured one. Unless ``existing``, the SQLite file's directory is created, as is every
    store when first opened; with ``existing``, nothing is (see the module docstring)."""
    location = locate(settings, db)
    sqlite = settings.storage.sqlite_path
    if not existing and db is None and sqlite != ":memory:":
        Path(sqlite).parent.mkdir(parents=True, exist_ok=True)
    return Storage(settings, location, existing=existing, ledger=ledger)
