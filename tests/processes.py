"""Helpers for tests that run ``skinflint`` as a subprocess."""

from __future__ import annotations

import signal
import subprocess
from typing import Any

__all__ = ["stop"]


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
