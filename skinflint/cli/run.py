"""``skinflint serve`` and ``skinflint demo``."""

from __future__ import annotations

import argparse
import os

from rich.table import Table

from skinflint.cli.output import describe_storage, new_console, print_json
from skinflint.config import Settings

__all__ = ["cmd_demo", "cmd_serve"]


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

    from skinflint.demo import format_demo_rows, run_demo

    console = new_console()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("replaying recorded traffic", total=None)

        def tick(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        result = run_demo(
            requests=args.requests, concurrency=args.concurrency, seed=args.seed, on_progress=tick
        )
    if args.json:
        print_json(result)
        return 0
    table = Table(title="skinflint demo: recorded real model outputs, replayed through the gateway")
    table.add_column("")
    table.add_column("value", justify="right")
    for label, value in format_demo_rows(result):
        table.add_row(label, value)
    console.print(table)
    return 0
