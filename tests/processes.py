"""Helpers for tests that run ``skinflint`` as a subprocess."""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Any

import httpx

__all__ = ["stop", "wait_for_workers"]


def stop(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """Stop a gateway as an operator would (SIGTERM), killing it if it does not exit in time."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def wait_for_workers(url: str, workers: int, proc: subprocess.Popen[Any] | None,
                     body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    """Until chat requests (``body``, each on a new connection) have been answered by every
    one of ``workers`` processes: the kernel hands a connection to a worker that is up, so a
    test that needs them all waits for the last to start. A request id starts with its
    process's own prefix."""
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    while len(seen) < workers:
        assert proc is None or proc.poll() is None, "the gateway exited"
        assert time.monotonic() < deadline, "workers did not start"
        try:
            with httpx.Client(timeout=5) as http:
                for _ in range(4):
                    r = http.post(f"{url}/v1/chat/completions", json=body,
                                  headers={**(headers or {}), "connection": "close"})
                    seen.add(r.headers["x-skinflint-request-id"][:12])
        except httpx.TransportError:
            time.sleep(0.1)
