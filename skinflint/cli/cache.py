"""``skinflint cache stats | invalidate | calibrate | eval``."""

from __future__ import annotations

import argparse
from typing import Any

from rich import box
from rich.table import Table

from skinflint.cli.output import new_console, print_json, usd
from skinflint.config import Settings

__all__ = [
    "cmd_cache",
    "cmd_cache_calibrate",
    "cmd_cache_eval",
    "format_cache_stats",
    "format_curve",
    "format_figure",
]


def cmd_cache(args: argparse.Namespace, settings: Settings) -> int:
    from skinflint.analytics import cachestats

    if args.cache_command == "stats":
        stats = cachestats.stats(settings, db=args.db)
        if args.json:
            print_json(stats)
        else:
            new_console().print(format_cache_stats(stats))
        return 0
    from skinflint.analytics.invalidation import describe, invalidate

    result = invalidate(settings, args.tag, db=args.db, url=args.url, admin_key=args.admin_key)
    if args.json:
        print_json(result.as_dict())
    else:
        new_console().print(describe(result), soft_wrap=True)
    return 0


def format_figure(name: str, value: Any) -> str:
    """A figure as people read it, from its name: ``*_usd`` is money, ``*_rate`` and
    ``*_share`` a percentage, ``bytes`` a size; other numbers with thousands separators."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if name.endswith("_usd"):
        return usd(value)
    if name.endswith(("_rate", "_share")):
        return f"{value:.1%}"
    if name.endswith("bytes"):
        return _size(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:,.4g}"


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GB"


def _label(name: str) -> str:
    return name.removesuffix("_usd").replace("_", " ")


def format_cache_stats(stats: dict[str, Any]) -> Table:
    """Every figure of ``skinflint cache stats`` on a row of its own, in the order given; a
    figure that is a mapping (e.g. counts per reason) gets an indented row per entry."""
    table = Table(title="Cache", box=box.SIMPLE_HEAD, show_edge=False, title_justify="left")
    table.add_column("figure", overflow="fold")
    table.add_column("value", justify="right", no_wrap=True)
    for name, value in stats.items():
        if isinstance(value, dict):
            table.add_row(_label(name), "")
            for key, inner in value.items():
                table.add_row(f"  {_label(str(key))}", format_figure(name, inner))
        else:
            table.add_row(_label(name), format_figure(name, value))
    return table


def format_curve(points: list[dict[str, Any]], chosen: float) -> Table:
    table = Table(title="Precision / recall by similarity threshold")
    for col in ("threshold", "hits", "precision", "precision (95% lower)", "recall"):
        table.add_column(col, justify="right")
    step = max(1, len(points) // 20)
    for p in points[::step]:
        mark = " <" if abs(p["threshold"] - chosen) < 1e-9 else ""
        table.add_row(
            f"{p['threshold']:.3f}{mark}",
            str(int(p["hits"])),
            f"{p['precision']:.3f}",
            f"{p['precision_lower']:.3f}",
            f"{p['recall']:.3f}",
        )
    return table


def cmd_cache_calibrate(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from skinflint.config import update_config_file
    from skinflint.embed import load_embedder
    from skinflint.semantic.calibrate import calibrate, load_pairs

    pairs = load_pairs(Path(args.pairs), args.limit)
    result = calibrate(
        pairs, args.precision, embedder=load_embedder(settings.cache.semantic.embedder)
    )
    prefix = "cache.semantic"
    if args.feature or args.route:
        prefix += f".features.{args.feature}" if args.feature else f".routes.{args.route}"
    target = args.config or "skinflint.yaml"
    update_config_file(
        target,
        {
            f"{prefix}.threshold": round(float(result["threshold"]), 4),
            **(
                {}
                if prefix != "cache.semantic"
                else {"cache.semantic.verifier": bool(result["verifier"])}
            ),
        },
    )
    if args.json:
        print_json({k: v for k, v in result.items() if k != "curve"} | {"written_to": target})
        return 0
    console = new_console()
    console.print(format_curve(result["curve"], float(result["threshold"])))
    met = "meets" if result["met"] else "does NOT meet"
    console.print(
        f"threshold {result['threshold']:.4f} (verifier {'on' if result['verifier'] else 'off'}) "
        f"{met} precision {args.precision} with 95% confidence on {len(pairs)} pairs: "
        f"precision {result['precision']:.3f}, recall {result['recall']:.3f}; "
        f"written to {target}"
    )
    return 0


def cmd_cache_eval(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from skinflint.embed import load_embedder
    from skinflint.pipeline.cache import semantic_setting
    from skinflint.semantic.calibrate import evaluate, load_pairs

    threshold, verifier = semantic_setting(settings, args.feature or "", args.route or "")
    result = evaluate(
        load_pairs(Path(args.pairs), args.limit),
        threshold,
        verifier,
        embedder=load_embedder(settings.cache.semantic.embedder),
    )
    if args.json:
        print_json(result)
    else:
        new_console().print(
            f"{result['pairs']} pairs at threshold {threshold:.4f} "
            f"(verifier {'on' if verifier else 'off'}): precision "
            f"{result['precision']:.3f}, recall {result['recall']:.3f}, "
            f"false-hit rate {result['false_hit_rate']:.4f}"
        )
    return 0
