"""What every command prints with: a console that honours NO_COLOR, money, JSON, and storage
addresses without their credentials."""

from __future__ import annotations

import os
import sys
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from skinflint.config import Settings
from skinflint.money import format_usd

__all__ = ["count", "describe_storage", "mask_url", "new_console", "print_json", "savings_table",
           "signed_count", "signed_usd", "usd"]

_SECRET_PARAMS = ("pass", "secret", "token", "key")


def new_console() -> Console:
    return Console(no_color=bool(os.environ.get("NO_COLOR")), highlight=False)


def usd(value: float | None) -> str:
    return format_usd(value)


def count(n: int) -> str:
    """A count in at most five characters: ``9,999``, ``12.3k``, ``456k``, ``1.23M``."""
    if n < 10_000:
        return f"{n:,}"
    for size, unit in ((1e3, "k"), (1e6, "M"), (1e9, "B"), (1e12, "T")):
        text = f"{n / size:.3g}"
        if "e" not in text and float(text) < 1000:
            return text + unit
    return f"{n:,}"


def signed_count(n: int) -> str:
    """:func:`count` with a minus sign below zero."""
    return f"-{count(-n)}" if n < 0 else count(n)


def signed_usd(value: float) -> str:
    return f"-{usd(-value)}" if value < 0 else usd(value)


def savings_table(strategies: list[dict[str, Any]], title: str) -> Table:
    """Each strategy's requests, prompt and completion tokens saved and dollars saved (the
    ``strategies`` of :func:`skinflint.analytics.savings.savings_json`)."""
    table = Table(title=title)
    for name in ("strategy", "requests", "prompt tok", "answer tok", "saved"):
        table.add_column(name, justify="left" if name == "strategy" else "right")
    for s in strategies:
        table.add_row(s["name"], count(s["requests"]), signed_count(s["input_tokens_saved"]),
                      signed_count(s["output_tokens_saved"]), signed_usd(s["saved_usd"]))
    return table


def print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def mask_url(url: str) -> str:
    """``url`` with its password (or a user part that may be a token) and secret query
    parameters replaced by ``***``: ``postgresql://app:***@db:5432/ledger``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    head, qmark, query = rest.partition("?")
    userinfo, at, host = head.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        head = f"{user}:***@{host}" if colon and user else f"***@{host}"
    params = []
    for param in query.split("&") if query else ():
        name, eq, _ = param.partition("=")
        secret = eq and any(word in name.lower() for word in _SECRET_PARAMS)
        params.append(f"{name}=***" if secret else param)
    return f"{scheme}://{head}{qmark}{'&'.join(params)}"


def describe_storage(settings: Settings) -> str:
    """Where the ledger and the caches live: ``sqlite ./skinflint.db``, a PostgreSQL URL, and
    the Redis URL of the exact cache when there is one (credentials masked)."""
    from skinflint.storage.opener import kind, locate  # loads numpy: not before main()

    found = locate(settings)
    home = found.ledger or found.cache
    where = f"sqlite {home}" if kind(home) == "sqlite" else mask_url(home)
    return f"{where}, cache {mask_url(found.cache)}" if kind(found.cache) == "redis" else where
