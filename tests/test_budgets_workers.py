"""Budgets hold across processes: ``skinflint serve --workers 2`` shares one counter store
(the SQLite file), ``skinflint budgets`` reads it, and replicas share Redis."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from skinflint.cli import main
from skinflint.config import settings_from_dict
from skinflint.server.run import BackgroundServer
from tests.conftest import base_config
from tests.fake_upstream import FakeUpstream
from tests.pg import free_port
from tests.processes import stop, wait_for_workers

BUDGET = {"name": "limited-daily", "per": "feature", "match": "limited", "window": "day",
          "limit": {"requests": 10}}
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


@contextmanager
def _serving(config: Path, port: int, workers: int) -> Iterator[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKINFLINT_")}
    argv = [sys.executable, "-m", "skinflint.cli", "serve", "--config", str(config),
            "--port", str(port), "--workers", str(workers)]
    with subprocess.Popen(argv, cwd=config.parent, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE) as proc:
        url = f"http://127.0.0.1:{port}"
        try:
            # of a feature no budget counts
            wait_for_workers(url, workers, proc, BODY, {"x-skinflint-feature": "warm-up"})
            yield url
        finally:
            stop(proc)


def _worker(response: httpx.Response) -> str:
    return response.headers["x-skinflint-request-id"][:12]  # each process's own prefix


async def _burst(url: str, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        return list(await asyncio.gather(*(
            http.post(f"{url}/v1/chat/completions", json=BODY,
                      headers={"x-skinflint-feature": "limited"}) for _ in range(n))))


@pytest.mark.timeout(180)
def test_two_workers_admit_exactly_the_budget(
    fake: FakeUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "skinflint.yaml"
    config.write_text(yaml.safe_dump(
        base_config(fake, tmp_path / "skinflint.db", budgets=[BUDGET])))
    with _serving(config, free_port(), workers=2) as url:
        replies = asyncio.run(_burst(url, 200))
    statuses = [r.status_code for r in replies]
    assert statuses.count(200) == 10 and statuses.count(429) == 190
    assert len({_worker(r) for r in replies}) == 2  # both processes answered

    assert main(["budgets", "--json", "--config", str(config)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["name"], row["subject"]) == ("limited-daily", "limited")
    assert row["spent"]["requests"] == 10 and row["remaining"] == {"requests": 0}
    assert main(["budgets", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "limited-daily" in text and "10 req" in text and "100%" in text


async def _split_burst(urls: list[str], n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        return list(await asyncio.gather(*(
            http.post(f"{urls[i % len(urls)]}/chat/completions", json=BODY,
                      headers={"x-skinflint-feature": "limited"}) for i in range(n))))


def test_two_replicas_sharing_redis_admit_exactly_the_budget(
    fake: FakeUpstream, tmp_path: Path, redis_url: str,
) -> None:
    servers = []
    try:
        for i in range(2):  # each its own ledger file: only Redis is shared
            config = base_config(fake, tmp_path / f"ledger-{i}.db", budgets=[BUDGET])
            config["storage"]["redis_url"] = redis_url
            servers.append(BackgroundServer(settings_from_dict(config, env={})).__enter__())
        replies = asyncio.run(_split_burst([s.base_url for s in servers], 200))
        statuses = [r.status_code for r in replies]
        assert statuses.count(200) == 10 and statuses.count(429) == 190
        for server in servers:
            (row,) = httpx.get(f"{server.root_url}/api/budgets").json()["data"]
            assert row["spent"]["requests"] == 10 and row["reserved"]["requests"] == 0
    finally:
        for server in servers:
            server.__exit__(None, None, None)
