"""``skinflint cache stats | invalidate | calibrate | eval``."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from skinflint.cli.output import new_console, print_json
from skinflint.config import Settings

__all__ = ["cmd_cache", "cmd_cache_calibrate", "cmd_cache_eval", "format_curve"]


def cmd_cache(args: argparse.Namespace, settings: Settings) -> int:
    from skinflint.analytics import cachestats

    st = settings.storage
    path = args.db or st.redis_url or st.postgres_url or st.sqlite_path
    if args.cache_command == "stats":
        # Redis keeps no ledger: hit figures come from where the gateway writes it
        ledger = (st.postgres_url or st.sqlite_path) if args.db is None else None
        stats = cachestats.stats(path, redis_prefix=st.redis_prefix, ledger=ledger)
        if args.json:
            print_json(stats)
        else:
            table = Table(title="Cache")
            table.add_column("figure")
            table.add_column("value", justify="right")
            for reason, n in stats.pop("bypassed", {}).items():
                stats[f"bypassed: {reason}"] = n
            for k, v in stats.items():
                shown = f"{v:,.4f}" if isinstance(v, float) else f"{v:,}"
                table.add_row(k.replace("_", " "), shown)
            new_console().print(table)
        return 0
    from skinflint.analytics.invalidation import describe, invalidate

    result = invalidate(
        path, args.tag, url=args.url, admin_key=args.admin_key, redis_prefix=st.redis_prefix
    )
    if args.json:
        print_json(result.as_dict())
    else:
        new_console().print(describe(result), soft_wrap=True)
    return 0


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
    from skinflint.gateway import semantic_setting
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
