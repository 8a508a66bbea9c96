"""``skinflint serve``: where it listens, with which storage, and the same process settings in
every worker."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from skinflint.cli.output import describe_storage, mask_url
from skinflint.config import settings_from_dict
from skinflint.server.run import GC_THRESHOLDS
from tests.pg import free_port
from tests.processes import stop

LINE = re.compile(
    r"skinflint listening on http://127\.0\.0\.1:(\d+) \(storage: (.+), workers: (\d+)\)\n"
)

#: Imported by every Python process of a test's ``serve`` (PYTHONPATH): each process that has
#: loaded the server keeps writing its parent's id and its garbage-collector thresholds to a file
#: named after it (a worker ends by re-raising SIGTERM, so it cannot record at exit).
RECORDER = """
import gc, json, os, sys, threading, time

def _record():
    path = os.path.join(os.environ["GC_RECORD_DIR"], str(os.getpid()))
    while True:
        if "skinflint.server.run" in sys.modules:
            with open(path + ".tmp", "w") as f:
                json.dump({"ppid": os.getppid(), "thresholds": gc.get_threshold()}, f)
            os.replace(path + ".tmp", path)
        time.sleep(0.1)

threading.Thread(target=_record, daemon=True).start()
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKINFLINT_")}
    env.update(OPENAI_BASE_URL="http://127.0.0.1:9/v1", OPENAI_API_KEY="sk-x", **extra)
    return env


@contextmanager
def _serving(cwd: Path, *argv: str, env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen(
        [sys.executable, "-m", "skinflint.cli", *argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            yield proc
        finally:
            stop(proc)


def _first_line(proc: subprocess.Popen[str], timeout: float = 60.0) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError("serve printed nothing")
    return proc.stdout.readline()


def test_port_0_prints_the_port_it_listens_on(tmp_path: Path) -> None:
    with _serving(tmp_path, "serve", "--port", "0", env=_env()) as proc:
        line = _first_line(proc)
        found = LINE.fullmatch(line)
        assert found, line
        port = int(found.group(1))
        assert port != 0 and found.group(2) == "sqlite ./skinflint.db" and found.group(3) == "1"
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200


def test_a_port_in_use_is_one_line_and_no_listening_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "skinflint.cli", "serve", "--port", str(port)],
            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
        )
    assert run.returncode != 0 and run.stdout == ""
    assert run.stderr == f"skinflint: cannot listen on 127.0.0.1:{port}: Address already in use\n"


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"cache": {"semantic": {"enabled": True, "embedder": "hashing"}}},
         "skinflint: cache.semantic.threshold: the calibrated default is for the 'local' "
         "embedder"),
        ({"storage": {"postgres_url": "postgresql://app:s3cret-pw@127.0.0.1:1/ledger"}},
         "skinflint: storage: PostgreSQL at 127.0.0.1:1: connection failed"),
    ],
)
def test_a_configuration_that_cannot_start_is_one_line(
    config: dict[str, object], expected: str, tmp_path: Path
) -> None:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [sys.executable, "-m", "skinflint.cli", "--config", "c.yaml", "serve", "--port", "0"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
    )
    assert run.returncode != 0 and run.stdout == ""  # never said it was listening
    assert run.stderr.startswith(expected) and run.stderr.count("\n") == 1, run.stderr
    assert "s3cret-pw" not in run.stderr


def test_the_listening_line_masks_credentials(tmp_path: Path, redis_url: str) -> None:
    secret_url = redis_url.replace("redis://", "redis://default:s3cret-pw@")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"storage": {"redis_url": secret_url}}))
    with _serving(tmp_path, "--config", "c.yaml", "serve", "--port", "0", env=_env()) as proc:
        line = _first_line(proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    found = LINE.fullmatch(line)
    assert found, line
    masked = redis_url.replace("redis://", "redis://default:***@")
    assert found.group(2) == f"sqlite ./skinflint.db, cache {masked}"
    assert "s3cret-pw" not in line + err


def test_storage_descriptions() -> None:
    def described(storage: dict[str, str]) -> str:
        return describe_storage(settings_from_dict({"storage": storage}, env={}))

    assert described({"sqlite_path": "/var/lib/sf.db"}) == "sqlite /var/lib/sf.db"
    assert (
        described({"postgres_url": "postgresql://app:pw@db:5432/ledger?sslpassword=k&x=1"})
        == "postgresql://app:***@db:5432/ledger?sslpassword=***&x=1"
    )
    assert (
        described({"redis_url": "rediss://:pw@cache:6380/1"})
        == "sqlite ./skinflint.db, cache rediss://***@cache:6380/1"
    )
    assert mask_url("redis://token@cache:6379") == "redis://***@cache:6379"
    assert mask_url("postgresql://db/ledger") == "postgresql://db/ledger"


def test_every_worker_runs_with_the_servers_gc_thresholds(tmp_path: Path) -> None:
    hooks, records = tmp_path / "hooks", tmp_path / "records"
    hooks.mkdir()
    records.mkdir()
    (hooks / "sitecustomize.py").write_text(RECORDER)
    env = _env(PYTHONPATH=str(hooks), GC_RECORD_DIR=str(records))
    port = free_port()
    argv = ("serve", "--port", str(port), "--workers", "2")
    with _serving(tmp_path, *argv, env=env) as proc:
        line = _first_line(proc)
        assert line == f"skinflint listening on http://127.0.0.1:{port} (storage: sqlite " \
            "./skinflint.db, workers: 2)\n"
        deadline = time.monotonic() + 60
        while True:
            found = [json.loads(p.read_text()) for p in records.glob("[0-9]*[0-9]")]
            workers = [r for r in found if r["ppid"] == proc.pid]
            configured = [r for r in workers if tuple(r["thresholds"]) == GC_THRESHOLDS]
            if len(configured) == 2:
                break
            assert time.monotonic() < deadline and proc.poll() is None, found
            time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
