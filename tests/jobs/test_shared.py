"""Processes sharing a job store: ``serve --workers 2`` on one SQLite file and two replicas on
one PostgreSQL database accept deferred requests in every process, and one of them sends each
job exactly once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from skinflint.config import settings_from_dict
from skinflint.server.run import BackgroundServer
from tests.conftest import base_config, ledger_rows
from tests.fake_upstream import FakeUpstream
from tests.pg import free_port
from tests.test_budgets_workers import _serving, _worker

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "later, please"}]}
FAST = {"window_seconds": 0.2, "poll_seconds": 0.05}


async def _defer(urls: list[str], n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        return list(await asyncio.gather(*(
            http.post(f"{urls[i % len(urls)]}/v1/chat/completions", json=BODY,
                      headers={"x-skinflint-priority": "batch"}) for i in range(n))))


def _all_done(urls: list[str], jobs: list[str], wait: float = 20) -> list[dict[str, Any]]:
    deadline = time.monotonic() + wait
    with httpx.Client(timeout=10) as http:
        while True:
            found = [http.get(f"{urls[i % len(urls)]}/v1/skinflint/jobs/{j}").json()
                     for i, j in enumerate(jobs)]
            if all(f["status"] == "completed" for f in found):
                return found
            assert time.monotonic() < deadline, [f["status"] for f in found]
            time.sleep(0.1)


@pytest.mark.timeout(180)
def test_two_workers_send_each_job_once(fake: FakeUpstream, tmp_path: Path) -> None:
    config = tmp_path / "skinflint.yaml"
    config.write_text(yaml.safe_dump(base_config(fake, tmp_path / "skinflint.db",
                                                 batching=FAST)))
    with _serving(config, free_port(), workers=2) as url:
        replies = asyncio.run(_defer([url], 60))
        assert {r.status_code for r in replies} == {202}
        assert len({_worker(r) for r in replies}) == 2  # both processes accepted some
        jobs = [r.json()["id"] for r in replies]
        _all_done([url], jobs)
    assert fake.batches.submitted == 60
    deadline = time.monotonic() + 5
    while True:  # the warm-up's rows are there too, with no strategy
        rows = [r for r in ledger_rows(tmp_path / "skinflint.db") if r["strategy"]]
        if len(rows) >= 60 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert sorted(r["request_id"] for r in rows) == sorted(r.json()["request_id"]
                                                           for r in replies)


def test_two_replicas_on_postgres_send_each_job_once(fake: FakeUpstream, tmp_path: Path,
                                                     pg_url: str) -> None:
    servers: list[BackgroundServer] = []
    try:
        for i in range(2):
            config = base_config(fake, tmp_path / f"local-{i}.db", batching=FAST)
            config["storage"]["postgres_url"] = pg_url
            servers.append(BackgroundServer(settings_from_dict(config, env={})).__enter__())
        urls = [s.root_url for s in servers]
        replies = asyncio.run(_defer(urls, 30))
        assert {r.status_code for r in replies} == {202}
        done = _all_done(urls, [r.json()["id"] for r in replies])
        assert len(done) == 30
        assert fake.batches.submitted == 30
        leaders = [s.app.gateway.batches.leading for s in servers
                   if s.app.gateway is not None and s.app.gateway.batches is not None]
        assert sorted(leaders) == [False, True]
    finally:
        for server in servers:
            server.__exit__(None, None, None)
