"""The ``skinflint`` command. The only module (with the dashboard) that imports rich."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import orjson
from rich.console import Console
from rich.table import Table

from skinflint.config import Settings, load_settings
from skinflint.errors import ConfigError

if TYPE_CHECKING:  # numpy must not load before main() has set its thread count
    from skinflint.interfaces import Ledger

__all__ = ["main"]


def _console() -> Console:
    return Console(no_color=bool(os.environ.get("NO_COLOR")), highlight=False)


def _usd(value: float | None) -> str:
    return "unknown" if value is None else f"${value:,.4f}"


def _print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


# ---- serve


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from skinflint.server.run import serve

    if args.config and args.workers > 1:
        os.environ["SKINFLINT_CONFIG"] = args.config  # workers load it themselves
    serve(
        settings,
        host=args.host or settings.server.host,
        port=args.port or settings.server.port,
        workers=args.workers or settings.server.workers,
    )
    return 0


# ---- report


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
        cost = _usd(g.cost_usd) + (f" (+{g.unknown_cost} unpriced)" if g.unknown_cost else "")
        table.add_row(
            g.key,
            str(g.requests),
            str(g.errors),
            f"{s['cache_hit_rate']:.0%}",
            f"{g.input_tokens:,}",
            f"{g.output_tokens:,}",
            cost,
            _usd(g.baseline_cost_usd),
            _usd(g.saved_usd),
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
    elif os.path.exists(path):
        ledger = SQLiteLedger(path)
    else:
        raise ConfigError(f"no ledger at {path}")
    try:
        report = build_report(ledger.query(since), by=args.by, since=since)
    finally:
        ledger.close()
    if args.json:
        _print_json(report.to_json())
    else:
        _console().print(format_report(report))
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
        _print_json(rows)
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
    _console().print(table)
    return 0


# ---- cache


def cmd_cache(args: argparse.Namespace, settings: Settings) -> int:
    from skinflint.analytics import cachestats

    st = settings.storage
    path = args.db or st.redis_url or st.postgres_url or st.sqlite_path
    if args.cache_command == "stats":
        # Redis keeps no ledger: hit figures come from where the gateway writes it
        ledger = (st.postgres_url or st.sqlite_path) if args.db is None else None
        stats = cachestats.stats(path, redis_prefix=st.redis_prefix, ledger=ledger)
        if args.json:
            _print_json(stats)
        else:
            table = Table(title="Cache")
            table.add_column("figure")
            table.add_column("value", justify="right")
            for k, v in stats.items():
                shown = f"{v:,.4f}" if isinstance(v, float) else f"{v:,}"
                table.add_row(k.replace("_", " "), shown)
            _console().print(table)
        return 0
    url = args.url or f"http://{settings.server.host}:{settings.server.port}"
    result = cachestats.invalidate(
        path, args.tag, url=url, admin_key=args.admin_key, redis_prefix=st.redis_prefix
    )
    if args.json:
        _print_json(result)
    else:
        _console().print(
            f"invalidated {result['invalidated']} entries tagged "
            f"{', '.join(args.tag)} ({result['where']})"
        )
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
        _print_json({k: v for k, v in result.items() if k != "curve"} | {"written_to": target})
        return 0
    console = _console()
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
        _print_json(result)
    else:
        _console().print(
            f"{result['pairs']} pairs at threshold {threshold:.4f} "
            f"(verifier {'on' if verifier else 'off'}): precision "
            f"{result['precision']:.3f}, recall {result['recall']:.3f}, "
            f"false-hit rate {result['false_hit_rate']:.4f}"
        )
    return 0


# ---- demo


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from rich.progress import Progress

    from skinflint.demo import format_demo_rows, run_demo

    console = _console()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("replaying recorded traffic", total=None)

        def tick(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        result = run_demo(
            requests=args.requests, concurrency=args.concurrency, seed=args.seed, on_progress=tick
        )
    if args.json:
        _print_json(result)
        return 0
    table = Table(title="skinflint demo: recorded real model outputs, replayed through the gateway")
    table.add_column("")
    table.add_column("value", justify="right")
    for label, value in format_demo_rows(result):
        table.add_row(label, value)
    console.print(table)
    return 0


# ---- replay (evaluation harness)


def format_replay_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    base = result["baseline"]

    def row(label: str, cost: float, quality: float) -> tuple[str, str, str, str]:
        share = cost / base["cost_usd"] if base["cost_usd"] else 0.0
        q = quality / base["quality"] if base["quality"] else 0.0
        return label, f"${cost:,.4f} ({share:.1%})", f"{quality:.1%}", f"{q:.1%}"

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
    with Progress(console=_console(), transient=True, disable=args.json) as progress:
        task = progress.add_task("replaying", total=None)
        result = evaluate(
            Path(args.dataset),
            raw,
            model=args.route,
            curve=not args.no_curve,
            on_progress=lambda d, t: progress.update(task, completed=d, total=t),
        )
    if args.json:
        _print_json(result)
        return 0
    table = Table(title=f"Replay of {result['requests']} recorded requests")
    for col in ("configuration", "cost (share of baseline)", "quality", "quality retained"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for r in format_replay_rows(result):
        table.add_row(*r)
    console = _console()
    console.print(table)
    traffic = Table(title="Traffic per model and tier")
    traffic.add_column("answered by")
    traffic.add_column("share", justify="right")
    for name, share in result["traffic"].items():
        traffic.add_row(name, f"{share:.1%}")
    console.print(traffic)
    return 0


# ---- train-router


def cmd_train_router(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from skinflint.analytics.training import train_router

    summary = train_router(Path(args.dataset), Path(args.out))
    if args.json:
        _print_json(summary)
    else:
        _console().print(
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


class _Parser(argparse.ArgumentParser):
    """Bad arguments get one line on stderr, as every other error does, and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="YAML configuration (default: $SKINFLINT_CONFIG or none)",
    )
    p = _Parser(
        prog="skinflint", description="LLM gateway that cuts the bill.", parents=[common]
    )
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    s = add("serve", help="run the gateway")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--workers", type=int, default=0)
    s.set_defaults(func=cmd_serve)

    d = add("demo", help="replay recorded traffic through the gateway, offline")
    d.add_argument("--requests", type=int, default=1000)
    d.add_argument("--concurrency", type=int, default=16)
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_demo)

    r = add("report", help="spend, tokens and savings from the ledger")
    r.add_argument("--db", help="SQLite path or postgresql:// URL (default: storage settings)")
    r.add_argument("--since", help="only requests newer than this, e.g. 7d, 12h")
    r.add_argument(
        "--by", default="feature", choices=["feature", "model", "user", "strategy", "tenant"]
    )
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_report)

    pr = add("prices", help="the price the gateway charges for a model")
    pr.add_argument("model", nargs="?")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_prices)

    rp = add("replay", help="evaluate a configuration on a recorded dataset")
    rp.add_argument("dataset", help="RouterBench CSV file or directory, or a replay extract")
    rp.add_argument("--route", default="auto", help="route (or model) to evaluate")
    rp.add_argument(
        "--no-curve",
        action="store_true",
        help="skip the cost-quality points of the configuration's other routes",
    )
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(func=cmd_replay)

    tr = add("train-router", help="train the task classifier and correctness scorer")
    tr.add_argument("dataset", help="RouterBench CSV(s), or JSONL of {prompt, task}")
    tr.add_argument("--out", default="router", help="directory for classifier.npz, scorer.npz")
    tr.add_argument("--json", action="store_true")
    tr.set_defaults(func=cmd_train_router)

    c = add("cache", help="cache figures and invalidation")
    csub = c.add_subparsers(dest="cache_command", required=True)
    cs = csub.add_parser("stats", parents=[common])
    cs.add_argument("--db")
    cs.add_argument("--json", action="store_true")
    ci = csub.add_parser("invalidate", parents=[common])
    ci.add_argument("--tag", action="append", required=True, help="tag to drop (repeatable)")
    ci.add_argument("--db")
    ci.add_argument("--url", help="running gateway to tell (default: the configured address)")
    ci.add_argument("--admin-key", default=None)
    ci.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_cache)
    for name, func, help_text in (
        ("calibrate", cmd_cache_calibrate, "choose the similarity threshold from labelled pairs"),
        ("eval", cmd_cache_eval, "precision and recall of the configured semantic cache"),
    ):
        sp = csub.add_parser(name, parents=[common], help=help_text)
        sp.add_argument("pairs", help="JSONL of {text_a, text_b, label}")
        sp.add_argument("--feature", help="a feature's own threshold")
        sp.add_argument("--route", help="a route's or model's own threshold")
        sp.add_argument("--limit", type=int, help="read only the first N pairs")
        sp.add_argument("--json", action="store_true")
        sp.set_defaults(func=func)
        if name == "calibrate":
            sp.add_argument("--precision", type=float, default=0.95)
            sp.set_defaults(creates_config=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # One BLAS thread: on small machines a second one made vector search 10-20x slower under
    # load. Set before anything imports numpy; an explicit setting wins.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    args = build_parser().parse_args(argv)
    try:
        args.config = getattr(args, "config", None)
        creating = getattr(args, "creates_config", False) and not (
            args.config and os.path.exists(args.config)
        )
        settings = load_settings(None if creating else args.config)
        result: int = args.func(args, settings)
        return result
    except (ConfigError, ValueError, OSError) as exc:
        message = exc.message if isinstance(exc, ConfigError) else str(exc)
        sys.stderr.write(f"skinflint: {message}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
