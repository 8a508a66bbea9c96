"""``skinflint audit``: a traffic log's spend, waste and the saving each strategy would bring."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich import box
from rich.console import RenderableType
from rich.table import Table

from skinflint.cli.output import count, new_console, print_json, usd
from skinflint.config import Settings

__all__ = ["cmd_audit", "format_audit"]

_TOP = 10
_BAD_SHOWN = 5


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    from rich.progress import Progress

    from skinflint.analytics.audit import run_audit
    from skinflint.analytics.audit_html import render_html

    console = new_console()
    quiet = args.json or not console.is_terminal
    with Progress(console=console, transient=True, disable=quiet) as progress:
        task = progress.add_task("reading", total=None)

        def tick(stage: str, done: int, total: int | None) -> None:
            progress.update(task, description=stage, completed=done, total=total)

        result = run_audit(args.file, settings, since=args.since, until=args.until,
                           on_progress=tick)
    if args.html:
        Path(args.html).write_text(render_html(result), encoding="utf-8")
    if args.json:
        print_json(result)
        return 0
    for part in format_audit(result):
        console.print(part)
    if args.html:
        console.print(f"HTML report written to {args.html}")
    return 0


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, title_justify="left")
    table.add_column(columns[0], overflow="fold")
    for col in columns[1:]:
        table.add_column(col, justify="right", no_wrap=True)
    return table


def format_audit(result: dict[str, Any]) -> list[RenderableType]:
    """The audit as printed: what was read, spend by group, waste, alerts, and the saving of
    each strategy with its assumptions."""
    parts: list[RenderableType] = [_intro(result)]
    for key, label in (("by_feature", "feature"), ("by_model", "model"), ("by_user", "user")):
        parts.append(_spend(result[key], label))
    parts += [_duplicates(result), _bloat(result["bloat"]), _lengths(result["output_length"]),
              _overpowered(result["overpowered"]), _alerts(result),
              _strategies(result)]
    parts += [f"note: {n}" for n in result["notes"]]
    return parts


def _intro(result: dict[str, Any]) -> str:
    lines = result["lines"]
    text = (f"Audit of {result['file']}: {lines['calls']:,} calls, {result['requests']:,}"
            f" requests, {usd(result['cost_usd'])} ({result['input_tokens']:,} input and"
            f" {result['output_tokens']:,} output tokens)")
    if result["start"]:
        text += f", from {result['start']} to {result['end']}"
    if result["unpriced"]["requests"]:
        models = ", ".join(result["unpriced"]["models"][:5])
        text += (f"; {result['unpriced']['requests']:,} calls to models without a known price"
                 f" ({models}) are counted at no cost")
    if lines["outside_time_range"]:
        text += f"; {lines['outside_time_range']:,} calls outside --since/--until left out"
    if lines["bad"]:
        bad = lines["bad_lines"][:_BAD_SHOWN]
        shown = "; ".join(f"line {b['line']}: {b['reason']}" for b in bad)
        text += f"\n{lines['bad']:,} lines skipped as unreadable ({shown})"
    return text


def _spend(groups: list[dict[str, Any]], label: str) -> Table:
    table = _table(f"Spend by {label}", label, "requests", "cost", "input tokens",
                   "output tokens")
    for g in groups[:_TOP]:
        cost = usd(g["cost_usd"]) + (" *" if g["unpriced"] else "")
        table.add_row(g["name"] or "(none)", f"{g['requests']:,}", cost,
                      f"{g['input_tokens']:,}", f"{g['output_tokens']:,}")
    if len(groups) > _TOP:
        table.caption = f"and {len(groups) - _TOP} more"
    return table


def _duplicates(result: dict[str, Any]) -> Table:
    table = _table("Duplicates", "kind", "requests", "share", "cost")
    near = result["near_duplicates"]
    rows = (("exact (same request)", result["exact_duplicates"]),
            (f"near (similarity >= {near['threshold']}"
             f"{', verified' if near['verifier'] else ''})", near))
    for label, d in rows:
        table.add_row(label, f"{d['requests']:,}", f"{d['share']:.1%}", usd(d["cost_usd"]))
    return table


def _bloat(bloat: dict[str, Any]) -> Table:
    table = _table("Prompt bloat", "what", "calls", "tokens", "share of input")
    sp, fs, big = bloat["system_prompts"], bloat["few_shot"], bloat["oversized"]
    table.add_row(f"{sp['repeated']:,} system prompts sent more than once", f"{sp['calls']:,}",
                  f"{sp['tokens']:,}", f"{sp['share_of_input_tokens']:.1%}")
    table.add_row(f"{fs['examples']:,} example turns repeated across calls",
                  f"{fs['calls']:,}", f"{fs['tokens']:,}", f"{fs['share_of_input_tokens']:.1%}")
    table.add_row(f"oversized prompts ({big['rule']})", f"{big['requests']:,}",
                  f"{big['input_tokens']:,}", "")
    return table


def _lengths(rows: list[dict[str, Any]]) -> Table:
    table = _table("Output length (tokens) per feature", "feature", "p50", "p95", "p99",
                   "max_tokens", "cut")
    for r in rows[:_TOP]:
        limit = "" if r["max_tokens"] is None else f"{r['max_tokens']:,}"
        table.add_row(r["feature"] or "(none)", f"{r['p50']:,.0f}", f"{r['p95']:,.0f}",
                      f"{r['p99']:,.0f}", limit, f"{r['cut_share']:.1%}")
    return table


def _overpowered(figures: dict[str, Any]) -> RenderableType:
    if figures["route"] is None:
        return f"Over-powered model use: {figures['note']}"
    table = _table(f"Over-powered model use (route {figures['route']}'s classifier)",
                   "from -> to", "requests", "saving")
    for m in figures["moves"][:_TOP]:
        table.add_row(f"{m['from']} -> {m['to']}", f"{m['requests']:,}", usd(m["saving_usd"]))
    return table


def _alerts(result: dict[str, Any]) -> RenderableType:
    if not result["alerts"]:
        return f"Alerts: none would have fired ({result['alerts_note']})"
    table = _table("Alerts that would have fired", "rule", "scope", "name", "start", "end")
    for a in result["alerts"][:_TOP * 2]:
        table.add_row(a["rule"], a["scope"], a["name"] or "(all)", a["start"], a["end"] or "-")
    return table


def _strategies(result: dict[str, Any]) -> Table:
    monthly = result["monthly_factor"] is not None
    title = "Projected monthly saving" if monthly else "Saving on this log"
    table = _table(title, "strategy (assumptions)", "prompt tok", "answer tok", "saving",
                   "share")
    for s in result["strategies"]:
        table.add_row(f"{s['name']}: {s['assumptions']}", count(s["input_tokens_saved"]),
                      count(s["output_tokens_saved"]), usd(s["saving_usd"]),
                      f"{s['saving_share']:.1%}", end_section=True)
    c = result["compound"]
    table.add_row(f"all together: {c['assumptions']}", "", "", usd(c["saving_usd"]),
                  f"{c['saving_share']:.1%}", style="bold")
    return table
