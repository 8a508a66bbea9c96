"""The ``skinflint`` command: its parser and the entry point; each command lives in a module of
this package. The only package (with the dashboard) that imports rich."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from skinflint.cli.args import existing_path, fraction, moment, port_number, positive_int
from skinflint.cli.audit import cmd_audit
from skinflint.cli.budgets import cmd_budgets
from skinflint.cli.cache import cmd_cache, cmd_cache_calibrate, cmd_cache_eval
from skinflint.cli.errors import describe, input_errors
from skinflint.cli.replay import cmd_replay, cmd_train_router
from skinflint.cli.run import cmd_demo, cmd_serve
from skinflint.cli.shadow import cmd_shadow
from skinflint.cli.spend import cmd_prices, cmd_report
from skinflint.config import load_settings

__all__ = ["build_parser", "main"]


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
    s.add_argument("--port", type=port_number, help="0 to 65535 (0: any free port)")
    s.add_argument("--workers", type=positive_int)
    s.set_defaults(func=cmd_serve)

    d = add("demo", help="replay recorded traffic through the gateway, offline")
    d.add_argument("--requests", type=positive_int, default=1000)
    d.add_argument("--concurrency", type=positive_int, default=16)
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--json", action="store_true")
    d.add_argument("--ledger", metavar="PATH",
                   help="keep the run's ledger in this SQLite file (for skinflint report --db)")
    d.set_defaults(func=cmd_demo)

    r = add("report", help="spend, tokens and savings from the ledger")
    r.add_argument("--db", help="SQLite path or postgresql:// URL (default: storage settings)")
    r.add_argument("--since", help="only requests newer than this, e.g. 7d, 12h")
    r.add_argument(
        "--by", default="feature", choices=["feature", "model", "user", "strategy", "tenant"]
    )
    r.add_argument("--export", metavar="FILE.jsonl",
                   help="write the ledger rows (of --since) as JSON lines instead of the report"
                   " (- for standard output, a .gz name for gzip)")
    r.add_argument("--suggest-caps", action="store_true",
                   help="per feature: output tokens p50/p95/p99 of answers not cut short, and"
                   " the cap they suggest (p99 rounded up to a multiple of 16)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_report)

    b = add("budgets", help="budgets in their current window: spent, reserved, remaining")
    b.add_argument("--db", help="SQLite path (default: storage settings)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_budgets)

    au = add("audit", help="where a traffic log's money went and what would save it")
    au.add_argument("file", type=existing_path,
                    help="JSON Lines, plain or gzipped: calls ({request, response, ...}) or a"
                    " ledger export")
    au.add_argument("--since", type=moment, help="only calls at or after this time"
                    " (ISO 8601 or epoch seconds)")
    au.add_argument("--until", type=moment, help="only calls before this time")
    au.add_argument("--html", metavar="OUT.html", help="also write a self-contained HTML page")
    au.add_argument("--json", action="store_true")
    au.set_defaults(func=cmd_audit)

    pr = add("prices", help="the price the gateway charges for a model")
    pr.add_argument("model", nargs="?")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_prices)

    rp = add("replay", help="evaluate a configuration on a recorded dataset")
    rp.add_argument(
        "dataset",
        nargs="?",
        type=existing_path,
        help="RouterBench CSV file or directory, or a replay extract"
        " (default: the RouterBench extract shipped with skinflint)",
    )
    rp.add_argument("--route", default="auto", help="route (or model) to evaluate")
    rp.add_argument(
        "--no-curve",
        action="store_true",
        help="skip the cost-quality points of the configuration's other routes",
    )
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(func=cmd_replay)

    tr = add("train-router", help="train the task classifier and correctness scorer")
    tr.add_argument(
        "dataset", type=existing_path, help="RouterBench CSV(s), or JSONL of {prompt, task}"
    )
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
    ci.add_argument("--url", help="a running gateway to do it through its admin API"
                    " (default: edit the storage; running gateways follow)")
    ci.add_argument("--admin-key", default=None)
    ci.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_cache)
    for name, func, help_text in (
        ("calibrate", cmd_cache_calibrate, "choose the similarity threshold from labelled pairs"),
        ("eval", cmd_cache_eval, "precision and recall of the configured semantic cache"),
    ):
        sp = csub.add_parser(name, parents=[common], help=help_text)
        sp.add_argument("pairs", type=existing_path, help="JSONL of {text_a, text_b, label}")
        sp.add_argument("--feature", help="a feature's own threshold")
        sp.add_argument("--route", help="a route's or model's own threshold")
        sp.add_argument("--limit", type=positive_int, help="read only the first N pairs")
        sp.add_argument("--json", action="store_true")
        sp.set_defaults(func=func)
        if name == "calibrate":
            sp.add_argument("--precision", type=fraction, default=0.95)
            sp.set_defaults(creates_config=True)

    sh = add("shadow", help="the shadow-evaluation guard's switches")
    shsub = sh.add_subparsers(dest="shadow_command", required=True)
    se = shsub.add_parser("enable", parents=[common],
                          help="switch a strategy the guard switched off back on for a feature")
    se.add_argument("--feature", required=True)
    se.add_argument("--strategy", required=True)
    se.add_argument("--db", help="the ledger's SQLite path or postgresql:// URL"
                    " (default: storage settings)")
    se.add_argument("--url", help="a running gateway to do it through its admin API, at once")
    se.add_argument("--admin-key", default=None)
    se.add_argument("--json", action="store_true")
    se.set_defaults(func=cmd_shadow)
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
    except input_errors() as exc:
        sys.stderr.write(f"skinflint: {describe(exc)}\n")
        return 2
    except KeyboardInterrupt:
        return 130

