"""A throwaway Redis server for the tests, as pytest fixtures.

``redis_server`` (session) starts ``redis-server`` on a free loopback port with persistence off;
``redis_url`` (per test) gives its URL and empties the server afterwards. Without the binary or
the ``redis`` package the fixtures skip, except under CI (``CI=true``), where they fail so that a
missing install step cannot pass unnoticed (``apt-get install redis-server``).

``tests/conftest.py`` registers the fixtures for every test, so that one server serves the
whole run.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.pg import free_port, unavailable

__all__ = ["redis_server_fixture", "redis_url_fixture", "spawn_redis"]


def _client(url: str) -> object:
    try:
        import redis
    except ImportError as exc:
        unavailable(f"{exc} (pip install redis)", "Redis")
    return redis.Redis.from_url(url, socket_timeout=2)


def spawn_redis(port: int) -> subprocess.Popen[bytes]:
    """A ``redis-server`` on ``127.0.0.1:port`` with persistence off (not yet answering)."""
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("no redis-server binary; apt-get install redis-server", "Redis")
    return subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


@pytest.fixture(scope="session", name="redis_server")
def redis_server_fixture() -> Iterator[str]:
    port = free_port()
    proc = spawn_redis(port)
    url = f"redis://127.0.0.1:{port}/0"
    client = _client(url)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()  # type: ignore[attr-defined]
                break
            except Exception as exc:  # any failure means: not up yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    unavailable(f"redis-server did not start: {exc}", "Redis")
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(name="redis_url")
def redis_url_fixture(redis_server: str) -> Iterator[str]:
    yield redis_server
    _client(redis_server).flushall()  # type: ignore[attr-defined]
