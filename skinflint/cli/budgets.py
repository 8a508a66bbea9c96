"""``skinflint budgets``: each budget's current window, as ``GET /api/budgets`` lists it."""

from __future__ import annotations

import argparse
from typing import Any

from rich import box
from rich.table import Table

from skinflint.cli.output import count, new_console, print_json, usd
from skinflint.config import Settings

__all__ = ["cmd_budgets", "format_budgets"]


def cmd_budgets(args: argparse.Namespace, settings: Settings) -> int:
    from skinflint.analytics.budgets import budget_rows

    rows = budget_rows(settings, db=args.db)
    if args.json:
        print_json(rows)
    elif not settings.budgets:
        new_console().print("no budgets configured")
    else:
        new_console().print(format_budgets(rows))
    return 0


def _amounts(values: dict[str, Any]) -> str:
    parts = []
    if "usd" in values:
        parts.append(usd(values["usd"]))
    if "requests" in values:
        parts.append(f"{count(values['requests'])} req")
    if "tokens" in values:
        parts.append(f"{count(values['tokens'])} tok")
    return " · ".join(parts)


def format_budgets(rows: list[dict[str, Any]]) -> Table:
    """One row per budget and subject; amounts are those the budget limits."""
    table = Table(title="Budgets", box=box.SIMPLE_HEAD, show_edge=False, title_justify="left")
    for name in ("budget", "subject", "window ends", "action"):
        table.add_column(name, overflow="fold")
    for name in ("limit", "spent", "reserved", "remaining", "used"):
        table.add_column(name, justify="right", no_wrap=True)
    for row in rows:
        limited = row["limit"].keys()
        only = {k: v for k, v in row["spent"].items() if k in limited}
        held = {k: v for k, v in row["reserved"].items() if k in limited}
        table.add_row(
            row["name"], row["subject"] or "(all)", row["window_end"], row["action"],
            _amounts(row["limit"]), _amounts(only), _amounts(held),
            _amounts(row["remaining"]), f"{row['used']:.0%}",
        )
    return table
