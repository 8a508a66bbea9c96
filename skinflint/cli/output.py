"""What every command prints with: a console that honours NO_COLOR, money, JSON."""

from __future__ import annotations

import os
import sys
from typing import Any

import orjson
from rich.console import Console

__all__ = ["new_console", "print_json", "usd"]


def new_console() -> Console:
    return Console(no_color=bool(os.environ.get("NO_COLOR")), highlight=False)


def usd(value: float | None) -> str:
    return "unknown" if value is None else f"${value:,.4f}"


def print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
