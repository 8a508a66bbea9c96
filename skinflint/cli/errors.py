"""The errors a command meets on bad input (a wrong path, an unreachable database, an invalid
configuration or dataset) and the one line each prints. Anything else is a bug and keeps its
traceback."""

from __future__ import annotations

import sqlite3
import sys

from skinflint.errors import SkinflintError

__all__ = ["describe", "input_errors"]

#: Errors of the optional storage drivers, by module: only looked up once that driver is loaded.
_DRIVER_ERRORS = {"psycopg": ("Error", "PostgreSQL"), "redis": ("RedisError", "Redis")}


def input_errors() -> tuple[type[BaseException], ...]:
    """The exception types :func:`describe` turns into one line (evaluated when an error is
    caught, so that a driver that was never imported is never imported for this)."""
    found: list[type[BaseException]] = [SkinflintError, ValueError, OSError, sqlite3.Error]
    for module, (name, _) in _DRIVER_ERRORS.items():
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def describe(exc: BaseException) -> str:
    """One line, without the exception's type or errno, naming the file when there is one."""
    if isinstance(exc, SkinflintError):
        text = exc.message
    elif isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        text = f"{exc.strerror}: {where}" if where else exc.strerror
    elif isinstance(exc, sqlite3.Error):
        text = f"SQLite: {exc}"
    else:
        text = _driver_prefix(exc) + str(exc)
    return " ".join(text.split()) or type(exc).__name__


def _driver_prefix(exc: BaseException) -> str:
    module = type(exc).__module__.split(".")[0]
    label = _DRIVER_ERRORS.get(module, ("", ""))[1]
    return f"{label}: " if label else ""
