"""``skinflint report`` (spend from the ledger) and ``skinflint prices``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from rich import box
from rich.table import Table

from skinflint.cli.output import count, new_console, print_json, usd
from skinflint.config import Settings
from skinflint.errors import ConfigError

if TYPE_CHECKING:  # numpy must not load before main() has set its thread count
    from skinflint.analytics.caps import CapSuggestion
    from skinflint.analytics.report import Group, Report, WeekChange
    from skinflint.pricing import ModelPrice

__all__ = ["cmd_prices", "cmd_report", "format_caps", "format_compress_calls", "format_report",
           "format_shadow", "format_spend", "format_traffic", "format_week_over_week"]


def _table(title: str, first: str, columns: tuple[str, ...]) -> Table:
    """Figures right-aligned and never wrapped or cut; the group name wraps when the table
    would not fit the terminal (80 columns when piped)."""
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,
        title_justify="left",
        caption_justify="left",
    )
    table.add_column(first, overflow="fold", min_width=6)
    for col in columns:
        table.add_column(col, justify="right", no_wrap=True)
    return table


def _rows(report: Report) -> list[tuple[Group, dict[str, Any]]]:
    """Each group, then the total, set apart and in bold; with the row options of each."""
    rows: list[tuple[Group, dict[str, Any]]] = [(g, {}) for g in report.groups]
    if rows:
        rows[-1][1]["end_section"] = True
    return [*rows, (report.total, {"style": "bold"})]


def _ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def format_spend(report: Report) -> Table:
    columns = ("requests", "cost", "baseline", "saved", "% saved")
    table = _table(f"Spend by {report.by}", report.by, columns)
    for g, options in _rows(report):
        share = g.saved_usd / g.baseline_cost_usd if g.baseline_cost_usd else None
        table.add_row(
            g.key,
            f"{g.requests:,}",
            usd(g.cost_usd) + (" *" if g.unknown_cost else ""),
            usd(g.baseline_cost_usd),
            usd(g.saved_usd),
            "-" if share is None else f"{share:.0%}",
            **options,
        )
    if report.total.unknown_cost:
        n = report.total.unknown_cost
        table.caption = f"* without {n} call{'s' * (n != 1)} whose model has no known price"
    return table


def format_traffic(report: Report) -> Table:
    """Requests, tokens and latency; a ``cut short`` column (answers that reached their
    output-token limit) when any was, and ``tokens saved`` (prompt tokens compression
    removed, or packing items into one prompt saved) when any were. Latency is of requests
    answered in real time ("-": none)."""
    cut = bool(report.total.truncated)
    compressed = bool(report.total.tokens_saved)
    table = _table(
        f"Requests by {report.by}",
        report.by,
        ("requests", "cascade\nattempts", "errors", "cache\nhits", *(("cut\nshort",) * cut),
         "tokens\nin", *(("tokens\nsaved",) * compressed), "tokens\nout", "p50 ms"),
    )
    for g, options in _rows(report):
        s = g.summary()
        table.add_row(
            g.key,
            f"{g.requests:,}",
            f"{g.cascade_attempts:,}",
            f"{g.errors:,}",
            f"{s['cache_hit_rate']:.0%}",
            *((f"{g.truncated:,}",) * cut),
            count(g.input_tokens),
            *((count(g.tokens_saved),) * compressed),
            count(g.output_tokens),
            _ms(s["p50_latency_ms"]) if g.latency_ms else "-",
            **options,
        )
    if report.total.cascade_attempts:
        table.caption = ("cascade attempts: cheaper tiers called whose answer was not returned; "
                         "their tokens and cost are counted")
    return table


def format_shadow(report: Report) -> Table:
    """The shadow-evaluation guard's calls, their cost and mean score, per group with any."""
    table = _table(f"Shadow evaluation by {report.by}", report.by, ("calls", "cost", "score"))
    for g, options in _rows(report):
        if g.shadow_calls:
            score = g.summary()["shadow_score"]
            table.add_row(g.key, f"{g.shadow_calls:,}", usd(g.shadow_cost_usd),
                          "-" if score is None else f"{score:.2f}", **options)
    table.caption = ("score: how far the answers to compressed prompts agreed with the "
                     "answers to the prompts as sent, from 0 to 1")
    return table


def format_compress_calls(report: Report) -> Table:
    """The compress stage's cheap-model calls (rewrites, summaries) and their cost, per
    group with any."""
    table = _table(f"Compression model calls by {report.by}", report.by, ("calls", "cost"))
    for g, options in _rows(report):
        if g.compress_calls:
            table.add_row(g.key, f"{g.compress_calls:,}", usd(g.compress_cost_usd), **options)
    table.caption = "system-prompt rewrites and summaries of trimmed text; counted in spend"
    table.min_width = 48  # the title on one line
    return table


def format_week_over_week(changes: list[WeekChange]) -> Table:
    """Each feature's spend in the last 7 days against the 7 days before."""
    from skinflint.analytics.report import change_text

    table = _table("Spend by feature, week over week", "feature",
                   ("last 7 days", "7 days before", "change"))
    for w in changes:
        table.add_row(w.feature, usd(w.this_week_usd), usd(w.last_week_usd), change_text(w))
    return table


def _tokens(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def format_caps(suggestions: list[CapSuggestion]) -> Table:
    """Each feature's output lengths and the cap they suggest."""
    table = _table("Output-token caps by feature", "feature",
                   ("answers", "cut\nshort", "p50", "p95", "p99", "suggested\ncap",
                    "current\ncap", "would\ncut"))
    for c in suggestions:
        table.add_row(c.feature, f"{c.answers:,}", f"{c.truncated:,}", _tokens(c.p50),
                      _tokens(c.p95), _tokens(c.p99), _tokens(c.suggested), _tokens(c.current),
                      "-" if c.would_cut is None else f"{c.would_cut:.1%}")
    table.caption = ("percentiles of the output tokens of answers not cut short; suggested: "
                     "p99 rounded up to a multiple of 16; would cut: the share of those "
                     "answers longer than it")
    return table


def format_report(report: Report) -> list[Table]:
    """The report as tables that each fit 80 columns: spend, then requests and tokens, then
    (when the guard made any) shadow calls, then (when compression made any) its model calls,
    then (when the last two weeks saw spend) each
    feature's week over week."""
    tables = [format_spend(report), format_traffic(report)]
    if report.total.shadow_calls:
        tables.append(format_shadow(report))
    if report.total.compress_calls:
        tables.append(format_compress_calls(report))
    if report.week_over_week:
        tables.append(format_week_over_week(report.week_over_week))
    return tables


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from skinflint.analytics.report import WEEK, build_report, parse_since, read_records

    now = time.time()
    since = parse_since(args.since, now) if args.since else 0.0
    if args.export:
        return _export(args, settings, since)
    if args.suggest_caps:
        return _suggest_caps(args, settings, since)
    # two full weeks for the week-over-week comparison, whatever the report's window
    records = read_records(settings, db=args.db, since=min(since, now - 2 * WEEK))
    report = build_report(records, by=args.by, since=since, now=now)
    if args.json:
        print_json(report.to_json())
    else:
        console = new_console()
        for i, table in enumerate(format_report(report)):
            if i:
                console.print()
            console.print(table)
    return 0


def _suggest_caps(args: argparse.Namespace, settings: Settings, since: float) -> int:
    from skinflint.analytics.caps import suggest_caps
    from skinflint.analytics.report import read_records

    records = read_records(settings, db=args.db, since=since)
    found = suggest_caps(records, since=since, budgets=settings.token_budgets)
    if args.json:
        print_json({"since": since, "features": [c.to_json() for c in found]})
    else:
        new_console().print(format_caps(found))
    return 0


def _export(args: argparse.Namespace, settings: Settings, since: float) -> int:
    from skinflint.analytics.export import write_export
    from skinflint.analytics.report import each_record

    written = each_record(settings, lambda records: write_export(records, args.export),
                          db=args.db, since=since)
    if args.export != "-":
        if args.json:
            print_json({"exported": written, "path": args.export})
        else:
            new_console().print(f"{written:,} ledger rows written to {args.export}",
                                markup=False)
    return 0


# ---- prices


def cmd_prices(args: argparse.Namespace, settings: Settings) -> int:
    from skinflint.gateway import price_catalog

    catalog = price_catalog(settings)
    models = [args.model] if args.model else sorted(settings.models) or ["gpt-4o-mini"]
    rows = []
    for name in models:
        price, batch = catalog.price(name), catalog.price(name, batch=True)
        if price is None or batch is None:
            raise ConfigError(f"no price known for {name!r}: add models.{name}.price to the config")
        rows.append({"model": name, **_price_row(price), **_price_row(batch, "batch_"),
                     "batch_price": batch.batch})  # catalog | discount
    if args.json:
        print_json(rows)
        return 0
    new_console().print(_price_table(rows))
    return 0


def _price_row(price: ModelPrice, prefix: str = "") -> dict[str, Any]:
    return {f"{prefix}input_per_mtok": price.input,
            f"{prefix}output_per_mtok": price.output,
            f"{prefix}cached_input_per_mtok": price.cached_input,
            **{f"{prefix}{label}_per_mtok": rate for label, rate in _part_rates(price).items()},
            f"{prefix}source": price.source}


def _price_table(rows: list[dict[str, Any]]) -> Table:
    """Each model's real-time price, and beneath it its batch price and where that comes
    from."""
    table = Table(title="Prices (USD per million tokens)")
    table.add_column("model", overflow="fold")  # a name is wrapped, never cut short
    for col in ("input", "output", "cached"):
        table.add_column(col, justify="right", no_wrap=True)
    others = [(_other_rates(r), _other_rates(r, "batch_")) for r in rows]
    with_other = any(o for pair in others for o in pair)  # rates for parts of a call
    if with_other:
        table.add_column("other", overflow="fold")
    table.add_column("source", overflow="fold")
    for r, pair in zip(rows, others, strict=True):
        lines = (("", pair[0], str(r["model"])), ("batch_", pair[1], "  batch"))
        for prefix, other, label in lines:
            table.add_row(
                label,
                f"{r[prefix + 'input_per_mtok']:g}",
                _rate(r[prefix + "output_per_mtok"]),
                f"{r[prefix + 'cached_input_per_mtok']:g}",
                *([other or "-"] if with_other else []),
                _batch_note(r) if prefix else str(r["source"]),
            )
    return table


#: The parts of a call a price may bill at rates of their own, as ``skinflint prices`` names them.
_PARTS = {"cache_write_tokens": "cache_write", "input_audio_tokens": "input_audio",
          "output_audio_tokens": "output_audio", "reasoning_tokens": "reasoning"}


def _batch_note(row: dict[str, Any]) -> str:
    """Where the batch price comes from, short: a discounted price's source is the real-time
    price's followed by the discount and its setting."""
    if row["batch_price"] == "catalog":
        return str(row["batch_source"])
    return "real-time " + str(row["batch_source"]).removeprefix(str(row["source"])).strip()


def _rate(rate: object) -> str:
    return "-" if rate is None else f"{rate:g}"  # None: not billed


def _part_rates(price: ModelPrice) -> dict[str, float | None]:
    """Each part's own rate, None for a part billed at the rate of its whole."""
    own = {part.usage: part.rate for part in price.parts}
    return {label: own.get(usage) for usage, label in _PARTS.items()}


def _other_rates(row: dict[str, Any], prefix: str = "") -> str:
    rates = [(label, row[f"{prefix}{label}_per_mtok"]) for label in _PARTS.values()]
    return ", ".join(f"{label.replace('_', ' ')} {rate:g}" for label, rate in rates
                     if rate is not None)
