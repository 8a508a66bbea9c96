"""A request still running when the server stops for good (a second Ctrl-C, or the graceful
period is over) gets an OpenAI-shaped 503 ``shutdown`` and a ledger row that says so."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml

from skinflint.config import settings_from_dict
from skinflint.server.app import App
from tests.conftest import base_config, ledger_rows
from tests.fake_upstream import FakeUpstream
from tests.pg import free_port

SLOW = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "[[fault:delay=20]] hi"}]}


def _call_in_background(url: str) -> tuple[threading.Thread, dict[str, httpx.Response]]:
    answer: dict[str, httpx.Response] = {}

    def call() -> None:
        answer["r"] = httpx.post(url + "/v1/chat/completions", json=SLOW, timeout=30)

    thread = threading.Thread(target=call)
    thread.start()
    return thread, answer


def _wait_for(condition: Callable[[], Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _assert_shut_down(answer: httpx.Response, db: Path) -> None:
    assert answer.status_code == 503
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["error"]["code"] == "shutdown"
    assert answer.json()["error"]["type"] == "server_error"
    rows = ledger_rows(db, expect=1)
    assert [(r["status"], r["error_type"]) for r in rows] == [(503, "shutdown")]


@contextlib.contextmanager
def _serve(config: Path, cwd: Path, port: int) -> Iterator[subprocess.Popen[str]]:
    """``skinflint serve`` as a user starts it, once it says it is listening; killed if a test
    leaves it running."""
    with subprocess.Popen(
        [sys.executable, "-m", "skinflint.cli", "serve", "--config", str(config),
         "--port", str(port)],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert "listening" in proc.stdout.readline()
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def test_a_second_ctrl_c_answers_503_and_writes_the_row(fake: FakeUpstream, tmp_path: Path) -> None:
    db, config = tmp_path / "skinflint.db", tmp_path / "skinflint.yaml"
    config.write_text(yaml.safe_dump(base_config(fake, db)))
    port = free_port()
    with _serve(config, tmp_path, port) as proc:
        thread, answer = _call_in_background(f"http://127.0.0.1:{port}")
        _wait_for(lambda: fake.requests)
        proc.send_signal(signal.SIGINT)  # waits for the running request...
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # ...until the second Ctrl-C
        thread.join(timeout=20)
        proc.wait(timeout=20)
    _assert_shut_down(answer["r"], db)


@contextlib.contextmanager
def _server_with_a_short_grace(fake: FakeUpstream, db: Path) -> Iterator[uvicorn.Server]:
    """The gateway under uvicorn, whose graceful shutdown gives requests 0.5 s."""
    app = App(settings_from_dict(base_config(fake, db), env={}))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="critical",
                                           timeout_graceful_shutdown=0.5, port=0))
    server.config.port = sock.getsockname()[1]
    runner = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    runner.start()
    try:
        _wait_for(lambda: server.started)
        yield server
    finally:
        server.should_exit = True
        runner.join(timeout=20)
        sock.close()


def test_past_the_graceful_timeout_a_request_answers_503(fake: FakeUpstream, tmp_path: Path) -> None:
    db = tmp_path / "skinflint.db"
    with _server_with_a_short_grace(fake, db) as server:
        thread, answer = _call_in_background(f"http://127.0.0.1:{server.config.port}")
        _wait_for(lambda: fake.requests)
        server.should_exit = True
        thread.join(timeout=20)
    _assert_shut_down(answer["r"], db)


def test_past_the_graceful_timeout_a_stream_ends_with_a_shutdown_event(
    fake: FakeUpstream, tmp_path: Path,
) -> None:
    db = tmp_path / "skinflint.db"
    body = {**SLOW, "stream": True,
            "messages": [{"role": "user", "content": "[[fault:chunk_delay=0.3]] a long story"}]}
    lines: list[str] = []
    with _server_with_a_short_grace(fake, db) as server:
        def call() -> None:
            with httpx.stream("POST", f"http://127.0.0.1:{server.config.port}/v1/chat/completions",
                              json=body, timeout=30) as r:
                for line in r.iter_lines():  # a body cut short would raise here
                    lines.append(line)

        thread = threading.Thread(target=call)
        thread.start()
        _wait_for(lambda: len(lines) >= 2)
        server.should_exit = True
        thread.join(timeout=20)
    events = [line.removeprefix("data: ") for line in lines if line]
    assert json.loads(events[-1])["error"]["code"] == "shutdown"
    assert "[DONE]" not in events
    rows = ledger_rows(db, expect=1)
    assert [(r["status"], r["error_type"]) for r in rows] == [(503, "shutdown")]


def test_sigkill_loses_at_most_the_last_flush_interval(fake: FakeUpstream, tmp_path: Path) -> None:
    """A killed process cannot write what it holds: what is lost must be no more than the calls
    of the last ``ledger_flush_interval`` (0.2 s here, the default), plus scheduling slack."""
    db, config = tmp_path / "skinflint.db", tmp_path / "skinflint.yaml"
    settings = base_config(fake, db)
    settings["storage"]["ledger_flush_interval"] = 0.2
    config.write_text(yaml.safe_dump(settings))
    port = free_port()
    done: list[float] = []  # when each answer arrived
    with _serve(config, tmp_path, port) as proc:
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=10) as c:
                for i in range(100_000):
                    if stop.is_set():
                        return
                    body = {"model": "gpt-4o-mini",
                            "messages": [{"role": "user", "content": f"q {i}"}]}
                    try:
                        c.post("/chat/completions", json=body).raise_for_status()
                    except httpx.TransportError:
                        return  # killed
                    done.append(time.monotonic())

        client = threading.Thread(target=load)
        client.start()
        _wait_for(lambda: len(done) >= 50)
        time.sleep(1.0)
        killed = time.monotonic()
        proc.kill()
        proc.wait(timeout=10)
        stop.set()
        client.join(timeout=10)
    calls, rows = len(fake.requests), len(ledger_rows(db))
    window = 0.2 + 0.5  # the flush interval, and slack for a loaded machine
    recent = sum(1 for t in done if t > killed - window)
    print(f"SIGKILL: {calls} upstream calls, {rows} rows, {calls - rows} lost; "
          f"{recent} answers in the last {window} s")
    assert calls - rows <= recent + 1  # the one in flight when killed
