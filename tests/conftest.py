"""Shared fixtures: a fake upstream on loopback, the gateway in front of it, the openai SDK."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from skinflint.config import settings_from_dict
from skinflint.server.run import BackgroundServer
from tests.fake_upstream import FakeUpstream

# One PostgreSQL and one Redis server for the whole run, started when a test first asks for one
# (a module that imported these fixtures itself would start servers of its own).
from tests.pg import pg_server_fixture, pg_url_fixture  # noqa: F401  (fixtures)
from tests.redis_server import redis_server_fixture, redis_url_fixture  # noqa: F401  (fixtures)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def fake(upstream: FakeUpstream) -> FakeUpstream:
    upstream.reset()
    return upstream


def base_config(
    fake: FakeUpstream, db: Path, *, fake_opts: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "providers": {
            "fake": {
                "kind": "openai-compatible",
                "base_url": fake.base_url,
                "api_key": "sk-upstream-secret-123",
                "max_retries": 2,
                "backoff_base": 0.01,
                "backoff_max": 0.5,
                "timeout": 5,
            },
            "claude": {
                "kind": "anthropic",
                "base_url": fake.root_url,
                "api_key": "sk-ant-secret-456",
                "max_retries": 0,
                "timeout": 5,
            },
        },
        "models": {
            "gpt-4o-mini": {"provider": "fake"},
            "gpt-4o": {"provider": "fake"},
            "cheap": {
                "provider": "fake",
                "model": "qwen3-8b",
                "price": {"input": 0.01, "output": 0.02},
            },
            "claude-sonnet": {"provider": "claude", "model": "claude-3-5-sonnet-latest"},
            "primary": {"provider": "fake", "model": "gpt-4o-mini", "fallbacks": ["backup"]},
            "backup": {"provider": "claude", "model": "claude-3-5-haiku-latest"},
        },
        "default_provider": "fake",
        "storage": {"sqlite_path": str(db), "ledger_flush_interval": 0.05},
    }
    config["providers"]["fake"].update(fake_opts or {})
    config.update(extra)
    return config


class PromptServer(uvicorn.Server):
    """uvicorn's server, stopping as soon as it is asked to. uvicorn notices ``should_exit`` at
    its next 0.1 s tick, then pauses 0.1 s for open connections to close even when there are
    none: 0.2 s for each of the hundreds of gateways the tests start and stop. Otherwise this is
    uvicorn's shutdown: open connections are asked to close and given 0.1 s, running requests
    finish, then the lifespan shutdown runs (which writes the ledger)."""

    async def main_loop(self) -> None:
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864_000
            await asyncio.sleep(0.01)
            should_exit = await self.on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        if self.server_state.connections:
            await asyncio.sleep(0.1)
        try:
            await asyncio.wait_for(self._wait_tasks_to_complete(),
                                   timeout=self.config.timeout_graceful_shutdown)
        except TimeoutError:
            logging.getLogger("uvicorn.error").error(
                "Cancel %s running task(s), timeout graceful shutdown exceeded",
                len(self.server_state.tasks))
            for task in self.server_state.tasks:
                task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
        if not self.force_exit:
            await self.lifespan.shutdown()


GatewayFactory = Callable[..., BackgroundServer]


@pytest.fixture
def make_gateway(fake: FakeUpstream, tmp_path: Path) -> Iterator[GatewayFactory]:
    started: list[BackgroundServer] = []

    def start(**extra: Any) -> BackgroundServer:
        settings = settings_from_dict(base_config(fake, tmp_path / "skinflint.db", **extra), env={})
        server = BackgroundServer(settings, server_class=PromptServer).__enter__()
        started.append(server)
        return server

    yield start
    for server in started:
        server.__exit__(None, None, None)


@pytest.fixture
def gateway(make_gateway: GatewayFactory) -> BackgroundServer:
    return make_gateway()


@pytest.fixture
def client(gateway: BackgroundServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=gateway.base_url, api_key="client-key", max_retries=0, timeout=10
    ) as c:
        yield c


def budget_row(gw: BackgroundServer, ready: Callable[[dict[str, Any]], bool], *,
               headers: dict[str, str] | None = None, wait: float = 5.0) -> dict[str, Any]:
    """The one budget of ``GET /api/budgets``, once ``ready`` holds for it, or as it is after
    ``wait`` seconds (the caller's assertions then say what is wrong). A request's spend may
    be counted after its answer: settling runs once it is accounted."""
    deadline = time.monotonic() + wait
    while True:
        (row,) = httpx.get(gw.root_url + "/api/budgets", headers=headers or {},
                           timeout=5).json()["data"]
        if ready(row) or time.monotonic() > deadline:
            return row
        time.sleep(0.05)


def ledger_rows(db: Path, *, expect: int | None = None, wait: float = 3.0) -> list[dict[str, Any]]:
    """Rows of the ledger, waiting for the batched writer to catch up to ``expect`` rows."""
    deadline = time.monotonic() + wait
    while True:
        rows: list[dict[str, Any]] = []
        if db.exists():
            conn = sqlite3.connect(db)
            conn.row_factory = sqlite3.Row
            try:
                rows = [dict(r) for r in conn.execute("SELECT * FROM ledger ORDER BY ts")]
            except sqlite3.OperationalError:
                rows = []
            finally:
                conn.close()
        if expect is None or len(rows) >= expect or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("NO_COLOR", "1")
    os.environ["COLUMNS"] = "200"
