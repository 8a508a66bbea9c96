"""A gateway killed (SIGKILL) in the middle of a job: the one started after it on the same
SQLite file takes the batches over at once, and every job completes, sent once and ledgered
once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from skinflint.jobs.service import LEASE_SECONDS
from tests.conftest import base_config, ledger_rows
from tests.fake_upstream import FakeUpstream
from tests.pg import free_port
from tests.processes import stop

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "survive a crash"}]}


@contextmanager
def serving(config: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKINFLINT_")}
    argv = [sys.executable, "-m", "skinflint.cli", "serve", "--config", str(config),
            "--port", str(port)]
    with subprocess.Popen(argv, cwd=config.parent, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) as proc:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        with httpx.Client(timeout=1) as http:  # one client: each new one loads the CA bundle
            while True:
                try:
                    if http.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        try:
            yield url, proc
        finally:
            stop(proc)


@pytest.mark.timeout(120)
def test_a_killed_gateway_is_taken_over_at_once(fake: FakeUpstream, tmp_path: Path) -> None:
    fake.batches.hold()
    config = tmp_path / "skinflint.yaml"
    config.write_text(yaml.safe_dump(base_config(
        fake, tmp_path / "skinflint.db", batching={"window_seconds": 0.1, "poll_seconds": 0.05})))
    with serving(config) as (url, proc):
        replies = [httpx.post(f"{url}/v1/chat/completions", json=BODY,
                              headers={"x-skinflint-priority": "batch"}) for _ in range(5)]
        assert {r.status_code for r in replies} == {202}
        deadline = time.monotonic() + 10
        while fake.batches.submitted < 5:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # past the window between the provider's answer and its id being written (a kill
        # inside it sends that batch again: see skinflint.jobs.service, and test_service)
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    fake.batches.release()
    started = time.monotonic()
    with serving(config) as (url, _), httpx.Client() as http:
        for reply in replies:
            while http.get(f"{url}/v1/skinflint/jobs/{reply.json()['id']}").json()[
                    "status"] != "completed":
                assert time.monotonic() - started < LEASE_SECONDS / 2, "waited for the lease"
                time.sleep(0.05)
    assert fake.batches.submitted == 5
    rows = ledger_rows(tmp_path / "skinflint.db", expect=5)
    assert sorted(r["request_id"] for r in rows) == sorted(r.json()["request_id"]
                                                           for r in replies)
