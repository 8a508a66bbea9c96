"""The audit as one self-contained HTML page: inline CSS and SVG charts drawn here, nothing
fetched from anywhere. Every text from the log is escaped."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from skinflint.money import format_usd

__all__ = ["bar_chart", "column_chart", "render_html"]

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1000px;
padding:0 1rem;color:#1d2433;background:#fbfbfd}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid
#dde;padding-bottom:.3rem}.muted{color:#667}.cards{display:flex;flex-wrap:wrap;gap:.8rem;
margin:1rem 0}.card{background:#fff;border:1px solid #dde;border-radius:8px;padding:.7rem 1rem;
min-width:150px}.card b{display:block;font-size:1.3rem}table{border-collapse:collapse;width:100%;
margin:.5rem 0;background:#fff}th,td{border-bottom:1px solid #eef;padding:.35rem .5rem;
text-align:right;vertical-align:top}th:first-child,td:first-child{text-align:left}
th{background:#f1f2f8}svg{background:#fff;border:1px solid #dde;border-radius:8px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:1rem}
"""

_BAR_COLOURS = ("#3b6fd8", "#2f9e8f", "#d98c2b", "#8e5bd1", "#c9485b", "#5a8f29")
_ROW = 26


def _usd(value: float | None) -> str:
    return format_usd(value)


def bar_chart(title: str, rows: Sequence[tuple[str, float]], *, width: int = 460,
              money: bool = True) -> str:
    """A horizontal bar chart as inline SVG: one bar per ``(label, value)``."""
    label_w, value_w = 170, 90
    height = 34 + _ROW * max(len(rows), 1)
    top = max((v for _, v in rows), default=0.0) or 1.0
    span = width - label_w - value_w - 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
             f' role="img" aria-label="{escape(title)}">',
             f'<text x="10" y="20" font-weight="bold" font-size="14">{escape(title)}</text>']
    for i, (label, value) in enumerate(rows):
        y = 30 + i * _ROW
        w = max(value / top * span, 0.0)
        shown = _usd(value) if money else f"{value:,.0f}"
        colour = _BAR_COLOURS[i % len(_BAR_COLOURS)]
        parts += [
            f'<text x="10" y="{y + 15}" font-size="12">{escape(_clip(label or "(none)"))}'
            f'<title>{escape(label)}</title></text>',
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{_ROW - 8}" rx="3"'
            f' fill="{colour}"/>',
            f'<text x="{label_w + w + 6:.1f}" y="{y + 15}" font-size="12">{escape(shown)}</text>',
        ]
    if not rows:
        parts.append('<text x="10" y="45" font-size="12" fill="#667">nothing to show</text>')
    parts.append("</svg>")
    return "".join(parts)


def column_chart(title: str, rows: Sequence[tuple[str, float]], *, width: int = 940) -> str:
    """Spend over time as inline SVG: one column per ``(label, value)``, labels underneath
    (a few of them when there are many)."""
    height, top_pad, base = 220, 34, 190
    top = max((v for _, v in rows), default=0.0) or 1.0
    step = (width - 80) / max(len(rows), 1)
    every = max(1, len(rows) // 8)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
             f' role="img" aria-label="{escape(title)}">',
             f'<text x="10" y="20" font-weight="bold" font-size="14">{escape(title)}</text>',
             f'<text x="10" y="{top_pad + 10}" font-size="11" fill="#667">{_usd(top)}</text>']
    for i, (label, value) in enumerate(rows):
        h = value / top * (base - top_pad)
        x = 70 + i * step
        parts.append(f'<rect x="{x:.1f}" y="{base - h:.1f}" width="{max(step - 2, 1):.1f}"'
                     f' height="{h:.1f}" fill="{_BAR_COLOURS[0]}"><title>{escape(label)}:'
                     f" {escape(_usd(value))}</title></rect>")
        if i % every == 0:
            parts.append(f'<text x="{x:.1f}" y="{base + 16}" font-size="10">'
                         f"{escape(label)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _clip(text: str, limit: int = 24) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cell(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(_cell(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cards(r: dict[str, Any]) -> str:
    c = r["compound"]
    period = "a month" if r["monthly_factor"] is not None else "this log"
    cards = (
        ("spend in the log", _usd(r["cost_usd"])), ("requests", f"{r['requests']:,}"),
        ("exact duplicates", f"{r['exact_duplicates']['share']:.1%}"),
        ("near duplicates", f"{r['near_duplicates']['share']:.1%}"),
        (f"saving, all strategies, {period}", f"{_usd(c['saving_usd'])} ({c['saving_share']:.1%})"),
    )
    inner = "".join(f'<div class="card"><span class="muted">{escape(k)}</span><b>{escape(v)}</b>'
                    "</div>" for k, v in cards)
    return f'<div class="cards">{inner}</div>'


def _spend_charts(r: dict[str, Any]) -> str:
    charts = [bar_chart(f"Spend by {label}", [(g["name"], g["cost_usd"]) for g in r[key][:10]])
              for key, label in (("by_feature", "feature"), ("by_model", "model"),
                                 ("by_user", "user"))]
    period = "a month" if r["monthly_factor"] is not None else "on the log"
    charts.append(bar_chart(f"Saving by strategy, {period}",
                            [(s["name"], s["saving_usd"]) for s in r["strategies"]]))
    cut = 13 if r["bucket"] == "hour" else 10  # "2026-01-01T05" or "2026-01-01"
    over_time = column_chart(f"Spend by {r['bucket']} (UTC)",
                             [(p["start"][:cut], p["cost_usd"]) for p in r["series"]])
    return over_time + '<div class="grid">' + "".join(charts) + "</div>"


def _waste(r: dict[str, Any]) -> str:
    near = r["near_duplicates"]
    dups = _table(("kind", "requests", "share", "cost"), [
        ("exact: same request", r["exact_duplicates"]["requests"],
         f"{r['exact_duplicates']['share']:.1%}", _usd(r["exact_duplicates"]["cost_usd"])),
        (f"near: similarity >= {near['threshold']}", near["requests"], f"{near['share']:.1%}",
         _usd(near["cost_usd"])),
    ])
    b = r["bloat"]
    sp, fs, big = b["system_prompts"], b["few_shot"], b["oversized"]
    bloat = _table(("what", "calls", "tokens", "share of input tokens"), [
        (f"{sp['repeated']} system prompts sent more than once", sp["calls"], sp["tokens"],
         f"{sp['share_of_input_tokens']:.1%}"),
        (f"{fs['examples']} example turns repeated", fs["calls"], fs["tokens"],
         f"{fs['share_of_input_tokens']:.1%}"),
        (f"oversized prompts ({big['rule']})", big["requests"], big["input_tokens"], ""),
    ])
    prompts = _table(("repeated system prompt", "calls", "tokens each", "features"),
                     [(p["preview"], p["calls"], p["tokens_each"], ", ".join(p["features"]))
                      for p in sp["top"]])
    return f"<h2>Duplicates</h2>{dups}<h2>Prompt bloat</h2>{bloat}{prompts}"


def _lengths_and_routing(r: dict[str, Any]) -> str:
    lengths = _table(("feature", "p50", "p95", "p99", "max_tokens", "cut"), [
        (x["feature"] or "(none)", f"{x['p50']:,.0f}", f"{x['p95']:,.0f}", f"{x['p99']:,.0f}",
         "" if x["max_tokens"] is None else x["max_tokens"], f"{x['cut_share']:.1%}")
        for x in r["output_length"]])
    o = r["overpowered"]
    routing = (f'<p class="muted">{escape(o["note"])}</p>' if o["route"] is None else
               _table(("from → to", "requests", "saving"),
                      [(f"{m['from']} → {m['to']}", m["requests"], _usd(m["saving_usd"]))
                       for m in o["moves"]]))
    return (f"<h2>Output length (tokens) per feature</h2>{lengths}"
            f"<h2>Over-powered model use</h2>{routing}")


def _alerts(r: dict[str, Any]) -> str:
    note = f'<p class="muted">{escape(r["alerts_note"])}</p>'
    if not r["alerts"]:
        return f"<h2>Alerts</h2><p>None would have fired.</p>{note}"
    rows = [(a["rule"], a["scope"], a["name"] or "(all)", a["start"], a["end"] or "still firing")
            for a in r["alerts"]]
    return "<h2>Alerts that would have fired</h2>" + _table(
        ("rule", "scope", "name", "start", "end"), rows) + note


def _strategies(r: dict[str, Any]) -> str:
    rows = [(s["name"], s["input_tokens_saved"], s["output_tokens_saved"], _usd(s["saving_usd"]),
             f"{s['saving_share']:.1%}", s["assumptions"]) for s in r["strategies"]]
    c = r["compound"]
    rows.append(("all together", "", "", _usd(c["saving_usd"]), f"{c['saving_share']:.1%}",
                 c["assumptions"]))
    title = "Projected monthly saving" if r["monthly_factor"] is not None else "Saving on the log"
    return f"<h2>{title}</h2>" + _table(
        ("strategy", "prompt tokens saved", "answer tokens saved", "saving", "share",
         "assumptions"), rows)


def _footer(r: dict[str, Any]) -> str:
    notes = "".join(f"<li>{escape(n)}</li>" for n in r["notes"])
    bad = "".join(f"<li>line {b['line']}: {escape(b['reason'])}</li>"
                  for b in r["lines"]["bad_lines"][:20])
    parts = []
    if notes:
        parts.append(f"<h2>Notes</h2><ul>{notes}</ul>")
    if r["lines"]["bad"]:
        parts.append(f"<h2>{r['lines']['bad']} unreadable lines skipped</h2><ul>{bad}</ul>")
    return "".join(parts)


def render_html(r: dict[str, Any]) -> str:
    """The whole page for an audit result (:func:`skinflint.analytics.audit.run_audit`)."""
    when = f"{r['start']} to {r['end']}" if r["start"] else "no timestamps"
    intro = (f'<p class="muted">{escape(r["file"])}: {r["lines"]["calls"]:,} calls, {when}</p>')
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>skinflint audit</title><style>{_CSS}</style></head><body>"
        f"<h1>skinflint audit</h1>{intro}{_cards(r)}{_spend_charts(r)}{_waste(r)}"
        f"{_lengths_and_routing(r)}{_alerts(r)}{_strategies(r)}{_footer(r)}"
        "</body></html>\n"
    )
