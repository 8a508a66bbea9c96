"""PostgreSQL connections as the shared stores use them (:mod:`skinflint.storage.postgres`,
:mod:`~skinflint.storage.pg_semantic`, :mod:`~skinflint.storage.pg_ledger`): schema setup under
an advisory lock, pools whose statements the server cuts off after ``op_timeout``, maintenance
statements without that limit, and background jobs whose failures cost nothing but a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from skinflint.errors import ConfigError

__all__ = ["CONNECT_TIMEOUT", "SCHEMA_LOCK", "AsyncConn", "Every", "Pool", "as_miss", "bounded",
           "config_error", "open_pool", "setup", "unbounded", "where"]

log = logging.getLogger("skinflint.storage")

AsyncConn = psycopg.AsyncConnection[tuple[Any, ...]]
Pool = AsyncConnectionPool[AsyncConn]

CONNECT_TIMEOUT = 10  # seconds, libpq's connect_timeout
DEADLINE_GRACE = 0.5  # seconds past op_timeout before a cache or semantic call is abandoned
SCHEMA_LOCK = 0x5B1F_0001  # advisory lock key held while creating tables


def where(url: str) -> str:
    """The server ``url`` names, without credentials, for error messages."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return "an unparsable URL"
    return f"{params.get('host', 'localhost')}:{params.get('port', 5432)}"


def config_error(url: str, exc: psycopg.Error) -> ConfigError:
    return ConfigError(f"storage: PostgreSQL at {where(url)}: {str(exc).strip()}")


async def setup(url: str, statements: Sequence[str]) -> str:
    """Run the schema ``statements`` in one transaction; returns pgvector's version ("" when the
    extension is absent). Raises ConfigError when the server cannot be reached or refuses."""
    try:
        conn = await psycopg.AsyncConnection.connect(
            url, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        async with conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                for statement in statements:
                    await conn.execute(statement)
            cur = await conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            row = await cur.fetchone()
    except psycopg.Error as exc:
        raise config_error(url, exc) from exc
    return str(row[0]) if row else ""


async def open_pool(
    url: str, *, size: int, timeout: float, op_timeout: float,
    configure: Callable[[AsyncConn], Awaitable[None]] | None = None,
) -> Pool:
    """An opened pool of autocommit connections (each statement is its own transaction) whose
    statements the server cancels after ``op_timeout`` seconds (see :func:`unbounded`)."""
    options = conninfo_to_dict(url).get("options") or ""  # keep the URL's own, if any
    limit = f"-c statement_timeout={max(1, round(op_timeout * 1000))}"
    kwargs = {"autocommit": True, "connect_timeout": CONNECT_TIMEOUT,
              "options": f"{options} {limit}".strip()}
    pool: Pool = AsyncConnectionPool(
        url, min_size=1, max_size=size, open=False, timeout=timeout, configure=configure,
        kwargs=kwargs, name="skinflint")
    try:
        await pool.open(wait=True, timeout=timeout)
    except psycopg.Error as exc:
        await pool.close()
        raise config_error(url, exc) from exc
    return pool


def bounded(breaker: dict[str, Any], op_timeout: float) -> dict[str, Any]:
    """The breaker's settings, with a client-side deadline a little past the server's
    statement timeout: it ends a call that a hung server or a silent network never answers."""
    return {"deadline": op_timeout + DEADLINE_GRACE, **breaker}


async def unbounded(pool: Pool, statement: str, params: Any) -> tuple[int, list[Any]]:
    """``(rowcount, rows)`` of one maintenance statement run without the pool's statement
    timeout: sweeping or invalidating many rows may take longer than a cache read may."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SET LOCAL statement_timeout = 0")
        cur = await conn.execute(statement, params)
        return cur.rowcount, (await cur.fetchall() if cur.description else [])


@contextlib.contextmanager
def as_miss(what: str) -> Iterator[None]:
    """Swallow (and log) a database failure where a failure must only cost a cache miss."""
    try:
        yield
    except psycopg.Error as exc:
        log.warning("postgres: %s failed: %s", what, exc)


class Every:
    """Starts ``job`` in the background on every ``n``-th :meth:`tick`, one run at a time; the
    job's database failures are logged, never raised."""

    def __init__(self, n: int, job: Callable[[], Awaitable[object]], what: str) -> None:
        self.n = max(1, n)
        self._job = job
        self._what = what
        self._ticks = 0
        self._task: asyncio.Task[None] | None = None

    def tick(self) -> None:
        self._ticks += 1
        if self._ticks % self.n == 0 and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        with as_miss(self._what):
            await self._job()

    async def wait(self) -> None:
        """Wait for the run in progress, if any."""
        if self._task is not None:
            await self._task
