"""`skinflint cache invalidate` and the admin API reach every running gateway that shares the
storage, whatever port it listens on, and the command says what it did."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from skinflint.analytics.invalidation import describe, invalidate
from skinflint.config import Settings
from skinflint.interfaces import CacheEntry
from skinflint.storage import invalidations
from skinflint.storage.cache import TieredCacheStore
from skinflint.storage.ledger import open_sqlite
from tests.fake_upstream import FakeUpstream
from tests.pg import free_port
from tests.processes import wait_for_workers

_SKINFLINT = Path(sys.executable).with_name("skinflint")
_QUESTION = {"model": "gpt-4o-mini", "temperature": 0,
             "messages": [{"role": "user", "content": "what changed in v1?"}]}
#: Keeps no connection alive, so each request opens one of its own (and ``serve --workers``
#: spreads them); one client for all, since each new one loads the CA bundle (~60 ms).
_HTTP = httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0))


def _env(fake: FakeUpstream) -> dict[str, str]:
    """The README's environment: one upstream, no configuration file."""
    env = {**os.environ, "OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "sk-x"}
    env.pop("SKINFLINT_CONFIG", None)
    return env


def _cli(cwd: Path, fake: FakeUpstream, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(_SKINFLINT), *args], cwd=cwd, env=_env(fake), text=True,
                          capture_output=True, timeout=60, check=False)


def _wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "gateway exited"
        try:
            if _HTTP.get(url + "/health", timeout=0.5).json()["ready"]:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("gateway did not become ready")


@contextlib.contextmanager
def _serve(cwd: Path, fake: FakeUpstream, *extra: str) -> Iterator[str]:
    """``skinflint serve --port P`` as the README starts it, in ``cwd``; yields its URL."""
    port = free_port()
    with subprocess.Popen([str(_SKINFLINT), "serve", "--port", str(port), *extra], cwd=cwd,
                          env=_env(fake), stderr=subprocess.DEVNULL) as proc:
        try:
            _wait_healthy(f"http://127.0.0.1:{port}", proc)
            yield f"http://127.0.0.1:{port}"
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        finally:
            proc.kill()


@pytest.fixture
def served(fake: FakeUpstream, tmp_path: Path) -> Iterator[str]:
    with _serve(tmp_path, fake) as url:
        yield url


def _ask(url: str, tags: str = "docs:v1") -> httpx.Response:
    """One request on a connection of its own (so that ``serve --workers`` spreads them)."""
    resp = _HTTP.post(url + "/v1/chat/completions", json=_QUESTION,
                      headers={"x-skinflint-tags": tags})
    assert resp.status_code == 200
    return resp


def test_cli_invalidate_reaches_a_gateway_on_another_port(
    served: str, fake: FakeUpstream, tmp_path: Path
) -> None:
    """The gateway listens on a port of its own choosing, with no `server:` section: the
    command finds it through the database they share, and waits until it has dropped its
    in-memory copy."""
    assert _ask(served).headers["x-skinflint-cache"] == "miss"
    assert _ask(served).headers["x-skinflint-cache"] == "hit-exact"  # from memory
    done = _cli(tmp_path, fake, "cache", "invalidate", "--tag", "docs:v1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "invalidated 1 entry tagged docs:v1 in ./skinflint.db; "
        "1 running gateway dropped them from memory")
    assert _ask(served).headers["x-skinflint-cache"] == "miss"
    assert _ask(served).headers["x-skinflint-cache"] == "hit-exact"
    done = _cli(tmp_path, fake, "cache", "invalidate", "--tag", "docs:v1", "--json")
    assert json.loads(done.stdout) == {
        "invalidated": 1, "tags": ["docs:v1"], "where": "./skinflint.db", "running": 1,
        "unconfirmed": [], "gateway_error": ""}


def test_cli_says_when_no_gateway_runs(fake: FakeUpstream, tmp_path: Path) -> None:
    with _serve(tmp_path, fake) as url:
        _ask(url)
    # the gateway has stopped (and said so in the file): nothing but the file to edit
    done = _cli(tmp_path, fake, "cache", "invalidate", "--tag", "docs:v1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "invalidated 1 entry tagged docs:v1 in ./skinflint.db; no running gateway uses this file")
    missing = _cli(tmp_path, fake, "cache", "invalidate", "--tag", "x", "--db", "elsewhere.db")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip() == (
        "skinflint: no database at elsewhere.db: give --db, or the --config the gateway runs with")
    assert not (tmp_path / "elsewhere.db").exists()


def test_workers_follow_each_others_invalidations(fake: FakeUpstream, tmp_path: Path) -> None:
    """With `serve --workers 2` each worker keeps its own copies in memory: an invalidation
    through one worker's admin API, or by the command, reaches both. Each upstream answer has
    an id of its own, so a stale copy would show its old id."""
    with _serve(tmp_path, fake, "--workers", "2") as url:
        wait_for_workers(url, 2, None, {"model": "gpt-4o-mini", "messages": [
            {"role": "user", "content": "warm-up"}]})

        def answers(n: int) -> tuple[set[str], set[str]]:
            """The answers' ids, and the workers that answered (a request id starts with its
            process's prefix): ``n`` requests, and more until both workers answered (the
            kernel may hand many connections in a row to the same one), 500 at most."""
            ids, workers = set(), set()
            for i in range(500):
                if i >= n and len(workers) == 2:
                    break
                resp = _ask(url)
                ids.add(resp.json()["id"])
                workers.add(resp.headers["x-skinflint-request-id"][:12])
            return ids, workers

        before, workers = answers(30)
        assert len(workers) == 2, "the requests all went to one worker"
        # each worker holds an answer in memory (the first one it saw, or its own)
        resp = _HTTP.post(url + "/api/cache/invalidate", json={"tags": ["docs:v1"]})
        assert resp.json() == {"invalidated": 1, "tags": ["docs:v1"]}
        time.sleep(3 * invalidations.POLL_SECONDS)  # the other worker reads the log
        after, workers = answers(30)
        assert len(workers) == 2 and not after & before
        done = _cli(tmp_path, fake, "cache", "invalidate", "--tag", "docs:v1", "--json")
        assert json.loads(done.stdout) == {
            "invalidated": 1, "tags": ["docs:v1"], "where": "./skinflint.db", "running": 2,
            "unconfirmed": [], "gateway_error": ""}
        again, workers = answers(30)  # no wait: both confirmed before the command returned
        assert len(workers) == 2 and not again & after


def test_a_worker_serves_what_another_worker_paid_for(fake: FakeUpstream, tmp_path: Path) -> None:
    """With `serve --workers 2`, an answer one worker stored is served by the other: the
    upstream is called once, however the requests are spread."""
    with _serve(tmp_path, fake, "--workers", "2") as url:
        wait_for_workers(url, 2, None, {"model": "gpt-4o-mini", "messages": [
            {"role": "user", "content": "warm-up"}]})
        assert _ask(url).headers["x-skinflint-cache"] == "miss"
        time.sleep(3 * invalidations.POLL_SECONDS)  # written, and learnt by the other worker
        workers: set[str] = set()
        for _ in range(500):  # until both answered: the kernel may favour one for a while
            workers.add(_ask(url).headers["x-skinflint-request-id"][:12])
            if len(workers) == 2:
                break
        assert len(workers) == 2, "the requests all went to one worker"
    assert len([r for r in fake.requests if b"warm-up" not in r.raw]) == 1


def test_a_gateway_that_does_not_confirm_is_named(tmp_path: Path) -> None:
    """A gateway that registered but stopped reading the log (hung, or killed moments ago)
    is reported, not counted as done."""
    db = str(tmp_path / "skinflint.db")

    async def store_one() -> None:
        store = TieredCacheStore(db)
        await store.set(CacheEntry("k", b"v", 0.0, ("t",)))
        await store.close()

    asyncio.run(store_one())
    conn = open_sqlite(db)
    invalidations.register(conn, invalidations.gateway_id(), invalidations.latest(conn))
    conn.close()  # a gateway that registered, then never read the log again
    result = invalidate(Settings(), ["t"], db=db, confirm_seconds=0.2)
    assert (result.invalidated, result.running, len(result.unconfirmed)) == (1, 1, 1)
    assert describe(result, 0.2) == (
        f"invalidated 1 entry tagged t in {db}; 0 of 1 running gateway dropped them from "
        f"memory; {result.unconfirmed[0]} did not confirm within 0.2 s (stopped, or too busy "
        "to read the file: it drops them when it next does)")
    assert result.unconfirmed[0] == f"pid {os.getpid()} on {socket.gethostname()}"


async def test_an_entry_written_during_another_process_invalidation_is_dropped(
    tmp_path: Path,
) -> None:
    """A store's writes reach the file in batches: an entry answered before another process
    invalidated its tag, and written after, is deleted when the store applies the log."""
    db = str(tmp_path / "skinflint.db")
    a, b = TieredCacheStore(db, flush_interval=60), TieredCacheStore(db)
    try:
        await a.set(CacheEntry("stale", b"old answer", 0.0, ("docs:v1",)))
        await a.set(CacheEntry("other", b"kept", 0.0, ("docs:v2",)))
        assert await b.invalidate_tags(["docs:v1"]) == 0  # not on disk yet
        assert await a.invalidations() == [("docs:v1",)]
        await a.forget_tags(["docs:v1"])
        assert await a.get("stale", time.time()) is None
        assert await a.get("other", time.time()) == b"kept"
        a.flush()
        conn = open_sqlite(db)
        keys = {r[0] for r in conn.execute("SELECT key FROM cache_entries")}
        conn.close()
        assert keys == {"other"}
        assert await b.invalidations() == []  # its own invalidation is not applied twice
    finally:
        await a.close()
        await b.close()


async def test_a_gateway_that_missed_pruned_invalidations_drops_everything(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "skinflint.db")
    store = TieredCacheStore(db)
    try:
        await store.set(CacheEntry("k", b"v", 0.0, ("a",)))
        conn = open_sqlite(db)
        for tag in ("b", "c"):
            invalidations.invalidate(conn, [tag])
        conn.execute("DELETE FROM cache_invalidations WHERE tags = 'b'")  # pruned meanwhile
        conn.close()
        assert await store.invalidations() is None
        await store.forget_tags(None)
        assert (await store.stats())["memory_entries"] == 0
    finally:
        await store.close()
