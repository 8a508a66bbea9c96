"""``skinflint serve`` and ``skinflint demo``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from rich.console import RenderableType
from rich.table import Table

from skinflint.cli.output import count, describe_storage, new_console, print_json, signed_count, usd
from skinflint.config import Settings

__all__ = ["cmd_demo", "cmd_serve", "format_demo"]


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from skinflint.server.run import serve

    workers = args.workers or settings.server.workers
    if args.config and workers > 1:
        os.environ["SKINFLINT_CONFIG"] = args.config  # workers load it themselves
    storage = describe_storage(settings)

    def announce(url: str) -> None:
        print(f"skinflint listening on {url} (storage: {storage}, workers: {workers})", flush=True)

    started = serve(
        settings,
        host=args.host or settings.server.host,
        port=settings.server.port if args.port is None else args.port,
        workers=workers,
        on_listening=announce,
    )
    return 0 if started else 3


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from rich.progress import Progress

    from skinflint.demo import run_demo

    console = new_console()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("replaying recorded traffic", total=None)

        def tick(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        result = run_demo(
            requests=args.requests, concurrency=args.concurrency, seed=args.seed,
            on_progress=tick, ledger=Path(args.ledger) if args.ledger else None,
        )
    if args.json:
        print_json(result)
        return 0
    for part in format_demo(result):
        console.print(part)
    return 0


_STRATEGY_LABELS = {
    "batch": "batch API (deferred requests)",
    "exact_cache": "exact cache (same request)",
    "semantic_cache": "semantic cache (similar question)",
    "cascade": "cascades (cheapest model first)",
    "routed": "routing to one model",
}


def _usd(value: float) -> str:
    return f"-{usd(-value)}" if value < 0 else usd(value)


def format_demo(result: dict[str, Any]) -> list[RenderableType]:
    """The demo's summary, 80 columns wide: what ran, the saving by strategy, spend and
    quality, what answered the requests the caches did not, and what the latencies mean."""
    intro = (
        f"skinflint demo: {result['requests']} requests ({result['unique_prompts']} distinct"
        f" prompts, seed {result['seed']}): recorded real model answers, replayed offline"
        " through the gateway with route auto, the exact and the semantic cache;"
        f" {result['deferred']} of them, a nightly evaluation no one waits on, deferred"
        f" (202) to the provider's batch API with {result['baseline']['model']} and polled"
        " until answered."
    )
    note = (
        "Latency: each model answers after a simulated delay (its typical late-2023 time to"
        " first token, plus the answer's tokens at its typical speed), played"
        f" {result['latency_speedup']} times faster so that the demo takes seconds; cache"
        " hits take the gateway's own time. Deferred requests are left out: their answers"
        f" came {result['deferred_ms']['p50'] / 1000:.1f} s (median) after they were"
        " accepted, gathered for a batch window shortened to a fraction of a second."
    )
    return [intro, _saving_table(result), _totals_table(result), _answered_table(result), note]


def _saving_table(result: dict[str, Any]) -> Table:
    table = Table(title="Where the saving comes from")
    for name in ("strategy", "requests", "tokens", "saving", "share"):
        table.add_column(name, justify="left" if name == "strategy" else "right")
    for s in result["strategies"]:
        if s["requests"]:
            table.add_row(_STRATEGY_LABELS[s["name"]], str(s["requests"]),
                          signed_count(s["tokens_saved"]), _usd(s["saving_usd"]),
                          f"{s['share']:.1%}")
    return table


def _totals_table(result: dict[str, Any]) -> Table:
    base, ours, latency = result["baseline"], result["skinflint"], result["latency_ms"]
    table = Table(title="Spend and quality", show_header=False)
    table.add_column()
    table.add_column(justify="right")
    for row in (
        (f"baseline: every request to {base['model']}", _usd(base["cost_usd"])),
        ("through skinflint", _usd(ours["cost_usd"])),
        ("total cut", f"{result['cut']:.1%} ({_usd(result['saving_usd'])} saved)"),
        ("tokens processed: baseline / skinflint",
         f"{count(result['tokens']['baseline'])} / {count(result['tokens']['processed'])}"),
        ("answers correct: baseline / skinflint",
         f"{base['quality']:.1%} / {ours['quality']:.1%}"),
        ("quality retained", f"{result['quality_retained']:.1%}"),
        ("latency p50 / p95 (see below)", f"{latency['p50']:.0f} / {latency['p95']:.0f} ms"),
        ("wall time", f"{result['wall_seconds']:.1f} s"),
    ):
        table.add_row(*row)
    return table


def _answered_table(result: dict[str, Any]) -> Table:
    table = Table(title="Requests the caches did not answer, answered by")
    table.add_column("task: model (cascade tier)")
    table.add_column("share", justify="right")
    for a in result["answered_by"]:
        tier = f" (tier {a['tier']})" if a["tier"] else ""
        table.add_row(f"{a['task']}: {a['model']}{tier}", f"{a['share']:.1%}")
    return table
