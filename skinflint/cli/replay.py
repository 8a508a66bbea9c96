"""``skinflint replay`` (the evaluation harness) and ``skinflint train-router``."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from skinflint.cli.output import new_console, print_json, savings_table, usd
from skinflint.config import Settings

__all__ = ["cmd_replay", "cmd_train_router", "format_replay_rows"]


def format_replay_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    base = result["baseline"]

    def row(label: str, cost: float, quality: float) -> tuple[str, str, str, str]:
        share = cost / base["cost_usd"] if base["cost_usd"] else 0.0
        q = quality / base["quality"] if base["quality"] else 0.0
        return label, f"{usd(cost)} ({share:.1%})", f"{quality:.1%}", f"{q:.1%}"

    rows = [
        row(
            f"skinflint route {result['route']}",
            result["skinflint"]["cost_usd"],
            result["skinflint"]["quality"],
        ),
        row(f"always {base['model']} (baseline)", base["cost_usd"], base["quality"]),
    ]
    for key, label in (("cheapest", "cheapest"), ("best_single", "best single model")):
        r = result[key]
        rows.append(row(f"{label}: {r['model']}", r["cost_usd"], r["quality"]))
    for point in result.get("curve", ()):
        rows.append(row(f"  curve: route {point['route']}", point["cost_usd"], point["quality"]))
    return rows


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    import yaml
    from rich.progress import Progress

    from skinflint.analytics.evaluation import evaluate

    raw = None
    if args.config:
        raw = yaml.safe_load(Path(args.config).read_text()) or {}
    console = new_console()
    quiet = args.json or not console.is_terminal
    with Progress(console=console, transient=True, disable=quiet) as progress:
        task = progress.add_task("replaying", total=None)
        result = evaluate(
            Path(args.dataset) if args.dataset else None,
            raw,
            model=args.route,
            curve=not args.no_curve,
            on_progress=lambda d, t: progress.update(task, completed=d, total=t),
        )
    if args.json:
        print_json(result)
        return 0
    table = Table(title=f"Replay of {result['requests']} recorded requests")
    for col in ("configuration", "cost (share of baseline)", "quality", "quality retained"):
        first = col == "configuration"
        table.add_column(col, justify="left" if first else "right", overflow="fold")
    for r in format_replay_rows(result):
        table.add_row(*r)
    console.print(table)
    traffic = Table(title="Traffic per model and tier")
    traffic.add_column("answered by")
    traffic.add_column("share", justify="right")
    for name, share in result["traffic"].items():
        traffic.add_row(name, f"{share:.1%}")
    console.print(traffic)
    console.print(_savings(result))
    return 0


def _savings(result: dict[str, Any]) -> Table:
    """Each strategy's tokens and dollars saved against the ledger's baseline (the tokens
    sent, at the baseline's prices), and how that baseline differs from the recorded one."""
    base, ledger = result["baseline"], result["ledger_baseline_usd"]
    table = savings_table(result["strategies"], "Saved by each strategy")
    table.caption = (
        f"Against {base['model']} answering the same tokens: {usd(ledger)}. Always"
        f" {base['model']} cost {usd(base['cost_usd'])} (its own answers' lengths). Tokens"
        " below zero: sent on top of the baseline's (cascade tiers escalated from).")
    return table


def cmd_train_router(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from skinflint.analytics.training import train_router

    summary = train_router(Path(args.dataset), Path(args.out))
    if args.json:
        print_json(summary)
    else:
        new_console().print(
            f"trained on {summary['samples']} samples: task classifier "
            f"({', '.join(summary['tasks'])}, cross-validated accuracy "
            f"{summary['classifier_cv_accuracy']:.1%})"
            + (
                f", correctness scorer (AUC {summary['scorer_auc']:.3f})"
                if "scorer_auc" in summary
                else ""
            )
            + f" -> {args.out}"
        )
    return 0
