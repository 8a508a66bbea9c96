"""``skinflint report`` (spend from the ledger) and ``skinflint prices``."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from rich.table import Table

from skinflint.cli.output import new_console, print_json, usd
from skinflint.config import Settings
from skinflint.errors import ConfigError

if TYPE_CHECKING:  # numpy must not load before main() has set its thread count
    from skinflint.interfaces import Ledger

__all__ = ["cmd_prices", "cmd_report", "format_report"]


def format_report(report: Any) -> Table:
    table = Table(title=f"Spend by {report.by}")
    for col in (
        "group",
        "requests",
        "errors",
        "cache hits",
        "tokens in",
        "tokens out",
        "cost",
        "baseline",
        "saved",
        "p50 ms",
    ):
        table.add_column(col, justify="left" if col == "group" else "right")
    for g in [*report.groups, report.total]:
        s = g.summary()
        cost = usd(g.cost_usd) + (f" (+{g.unknown_cost} unpriced)" if g.unknown_cost else "")
        table.add_row(
            g.key,
            str(g.requests),
            str(g.errors),
            f"{s['cache_hit_rate']:.0%}",
            f"{g.input_tokens:,}",
            f"{g.output_tokens:,}",
            cost,
            usd(g.baseline_cost_usd),
            usd(g.saved_usd),
            f"{s['p50_latency_ms']:.1f}",
            style="bold" if g is report.total else None,
        )
    return table


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from skinflint.analytics.report import build_report, parse_since
    from skinflint.storage.ledger import SQLiteLedger

    since = parse_since(args.since) if args.since else 0.0
    path = args.db or settings.storage.postgres_url or settings.storage.sqlite_path
    ledger: Ledger
    if path.startswith(("postgres://", "postgresql://")):
        from skinflint.storage.pg_ledger import PostgresLedger

        ledger = PostgresLedger(path)
    elif os.path.isfile(path):
        ledger = SQLiteLedger(path)
    else:
        raise ConfigError(f"no ledger at {path}")
    try:
        report = build_report(ledger.query(since), by=args.by, since=since)
    finally:
        ledger.close()
    if args.json:
        print_json(report.to_json())
    else:
        new_console().print(format_report(report))
    return 0


# ---- prices


def cmd_prices(args: argparse.Namespace, settings: Settings) -> int:
    from skinflint.gateway import price_overrides
    from skinflint.pricing import PriceCatalog

    catalog = PriceCatalog(price_overrides(settings))
    models = [args.model] if args.model else sorted(settings.models) or ["gpt-4o-mini"]
    rows = []
    for name in models:
        cfg = settings.models.get(name)
        lookup = name if name in catalog.overrides or cfg is None else (cfg.model or name)
        price = catalog.price(lookup)
        if price is None:
            raise ConfigError(f"no price known for {name!r}: add models.{name}.price to the config")
        rows.append(
            {
                "model": name,
                "input_per_mtok": price.input,
                "output_per_mtok": price.output,
                "cached_input_per_mtok": price.cached_input,
                "source": price.source,
            }
        )
    if args.json:
        print_json(rows)
        return 0
    table = Table(title="Prices (USD per million tokens)")
    for col in ("model", "input", "output", "cached input", "source"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["model"]),
            f"{r['input_per_mtok']:g}",
            f"{r['output_per_mtok']:g}",
            f"{r['cached_input_per_mtok']:g}",
            str(r["source"]),
        )
    new_console().print(table)
    return 0
