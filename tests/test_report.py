"""``skinflint report`` and ``cache stats`` as people read them: money with significant digits,
80 columns when piped, and client requests counted apart from cascade attempts."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import openai
import pytest
from rich.console import Console

from skinflint.cli import main
from skinflint.cli.cache import format_cache_stats
from skinflint.models import LedgerRecord
from skinflint.money import format_usd
from skinflint.server.run import BackgroundServer
from skinflint.storage.ledger import SQLiteLedger
from tests.conftest import GatewayFactory, ledger_rows

LONG_FEATURE = "summarise-long-documents-for-the-legal-and-compliance-teams"
ROUTES: dict[str, Any] = {
    "smart": {
        "baseline": "gpt-4o",
        "default_task": "chat",
        "tasks": {
            # the echoed answer is never a choice letter: tier 1 is called, then escalated
            "chat": {"cascade": [
                {"model": "gpt-4o-mini", "gate": {"format": "choice"}}, {"model": "gpt-4o"}]},
            "plain": {"cascade": [{"model": "gpt-4o-mini"}, {"model": "gpt-4o"}]},
        },
    }
}


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, "unknown"),
        (0.0, "$0"),
        (-0.0, "$0"),
        (-1.7e-17, "$0"),  # float noise of a difference of sums
        (2.55e-6, "$0.00000255"),
        (4.25e-5 - 2.55e-6, "$0.0000400"),
        (0.0009996, "$0.00100"),
        (0.123456, "$0.123"),
        (0.9996, "$1.00"),
        (12.345, "$12.35"),
        (1234.5, "$1,234.50"),
        (-0.00123, "-$0.00123"),
    ],
)
def test_money(value: float | None, shown: str) -> None:
    assert format_usd(value) == shown


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def _piped(cwd: Path, *argv: str) -> str:
    """The CLI's output into a pipe, as a person sees it in ``skinflint report | less``."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    run = subprocess.run([sys.executable, "-m", "skinflint.cli", *argv], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    return run.stdout


def _fits(text: str) -> list[str]:
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, text
    assert "…" not in text and "..." not in text, text
    return [line.rstrip() for line in lines]


def _figures(lines: list[str], title: str, label: str) -> list[str]:
    """The cells of the row ``label`` in the table titled ``title``."""
    start = lines.index(title)
    row = next(line for line in lines[start:] if line.split()[:1] == [label])
    return row.split()[1:]


def _send_cascaded(gw: BackgroundServer) -> None:
    """15 client requests through a cascade route: 8 escalate from tier 1 (8 attempts), 4 are
    accepted at tier 1, 3 repeat an earlier question and are served from the cache."""
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as client:

        def ask(text: str, task: str) -> None:
            client.chat.completions.create(
                model="smart",
                temperature=0,
                messages=[{"role": "user", "content": text}],
                extra_headers={"x-skinflint-task": task, "x-skinflint-feature": LONG_FEATURE},
            )

        for i in range(8):
            ask(f"tell me about topic {i} at some length", "chat")
        for i in range(4):
            ask(f"plain question {i}", "plain")
        time.sleep(0.3)  # the cache writer batches every 0.1 s
        for i in range(3):
            ask(f"tell me about topic {i} at some length", "chat")


@pytest.fixture
def cascaded(
    make_gateway: GatewayFactory, tmp_path: Path
) -> tuple[Path, list[dict[str, Any]]]:
    _send_cascaded(make_gateway(routes=ROUTES))
    db = tmp_path / "skinflint.db"
    return db, ledger_rows(db, expect=15 + 8)


def test_report_counts_client_requests_apart_from_cascade_attempts(
    cascaded: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    db, rows = cascaded
    assert len(rows) == 23
    total = _cli(capsys, "report", "--db", str(db), "--json")["total"]
    assert total["requests"] == 15 and total["cascade_attempts"] == 8
    assert total["cache_hits"] == 3 and total["cache_hit_rate"] == pytest.approx(3 / 15)
    assert total["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in rows))  # attempts too
    by_model = {g["key"]: g for g in _cli(capsys, "report", "--db", str(db), "--by", "model",
                                          "--json")["groups"]}
    mini, premium = by_model["gpt-4o-mini"], by_model["gpt-4o"]
    assert (mini["requests"], mini["cascade_attempts"]) == (4, 8)  # answered 4, escalated 8
    assert (premium["requests"], premium["cascade_attempts"]) == (8 + 3, 0)  # with cache hits


def test_report_fits_80_columns_when_piped(
    cascaded: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    db, _ = cascaded
    total = _cli(capsys, "report", "--db", str(db), "--json")["total"]
    lines = _fits(_piped(db.parent, "report", "--db", str(db)))
    spend = _figures(lines, "Spend by feature", "total")
    assert spend[:4] == ["15", format_usd(total["cost_usd"]),
                         format_usd(total["baseline_cost_usd"]), format_usd(total["saved_usd"])]
    requests, attempts, errors, hits = _figures(lines, "Requests by feature", "total")[:4]
    assert (requests, attempts, errors, hits) == ("15", "8", "0", "20%")
    assert "\x1b[" not in "\n".join(lines)  # no colour codes in a pipe


def test_cache_stats_count_client_requests_and_fit(
    cascaded: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    db, _ = cascaded
    stats = _cli(capsys, "cache", "stats", "--db", str(db), "--json")
    assert stats["requests"] == 15 and stats["hits"] == 3
    assert stats["hit_rate"] == pytest.approx(0.2)
    lines = _fits(_piped(db.parent, "cache", "stats", "--db", str(db)))
    assert _figures(lines, "Cache", "hit") == ["rate", "20.0%"]
    assert _figures(lines, "Cache", "saved") == [format_usd(stats["saved_usd"])]


def test_cache_stats_table_renders_any_figure() -> None:
    stats = {
        "entries": 12345,
        "bytes": 5_234_567,
        "hit_rate": 1 / 3,
        "saved_usd": 0.00012755,
        "skipped": {"embedder_timeout": 3, "queue_full": 12},
        "a_new_figure": 0.5,
    }
    out = io.StringIO()
    Console(file=out, width=80, no_color=True).print(format_cache_stats(stats))
    lines = _fits(out.getvalue())
    assert _figures(lines, "Cache", "entries") == ["12,345"]
    assert _figures(lines, "Cache", "bytes") == ["5.0", "MB"]
    assert _figures(lines, "Cache", "hit") == ["rate", "33.3%"]
    assert _figures(lines, "Cache", "saved") == ["$0.000128"]
    assert _figures(lines, "Cache", "skipped") == []
    assert _figures(lines, "Cache", "queue") == ["full", "12"]
    assert _figures(lines, "Cache", "a") == ["new", "figure", "0.5"]


def test_postgres_figures_count_client_requests(
    make_gateway: GatewayFactory, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _send_cascaded(make_gateway(routes=ROUTES, storage={"postgres_url": pg_url}))
    deadline = time.monotonic() + 10
    while True:  # the gateway's ledger writes in batches
        total = _cli(capsys, "report", "--db", pg_url, "--json")["total"]
        if total["requests"] + total["cascade_attempts"] >= 23 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (total["requests"], total["cascade_attempts"]) == (15, 8)
    stats = _cli(capsys, "cache", "stats", "--db", pg_url, "--json")
    assert (stats["requests"], stats["hits"]) == (15, 3)


def test_replay_rows_use_the_money_formatter() -> None:
    from skinflint.cli.replay import format_replay_rows

    def point(model: str, cost: float, quality: float) -> dict[str, Any]:
        return {"model": model, "cost_usd": cost, "quality": quality}

    result = {
        "route": "auto",
        "skinflint": point("", 0.000255, 0.6),
        "baseline": point("gpt-4", 0.51, 0.7),
        "cheapest": point("mistral-7b", 0.0000034, 0.3),
        "best_single": point("gpt-4", 0.51, 0.7),
    }
    rows = format_replay_rows(result)
    assert [r[1] for r in rows] == ["$0.000255 (0.1%)", "$0.510 (100.0%)", "$0.00000340 (0.0%)",
                                    "$0.510 (100.0%)"]


# ---- strategies, the ledger export, week over week (from rows written to a ledger file)

DAY = 86400.0


def _ledger_file(path: Path, records: list[LedgerRecord]) -> Path:
    ledger = SQLiteLedger(str(path), flush_interval=60)
    for r in records:
        ledger.record(r)
    ledger.close()
    return path


def _every_field(i: int, ts: float) -> LedgerRecord:
    """A row whose every field differs from its default (and from the other rows')."""
    return LedgerRecord(
        f"req-{i}", ts, request_hash=f"{i:024x}", tenant=f"t{i}", feature=f"f\u00e9{i}",
        user=f"u{i}", requested_model="auto", model="gpt-4o", provider="fake",
        endpoint="embeddings", input_tokens=100 + i, output_tokens=7 + i, cached_tokens=3,
        cache_write_tokens=4, reasoning_tokens=5, input_audio_tokens=6, output_audio_tokens=1,
        cost_usd=0.1 / 3 + i, baseline_cost_usd=None if i % 2 else 1e-12, saved_usd=-0.25,
        cache_status="bypass", strategy="route", latency_ms=12.5, upstream_latency_ms=10.25,
        status=502, error_type="upstream_error", route="auto: chat -> gpt-4o",
        similarity=0.9375 if i % 2 else None, cache_reason="client-bypass", truncated=1)


def test_report_by_strategy_names_a_plain_call_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    db = _ledger_file(tmp_path / "l.db", [
        LedgerRecord("a", now, strategy="", cost_usd=0.5, status=502),
        LedgerRecord("b", now, strategy="", cost_usd=0.25),
        LedgerRecord("c", now, strategy="exact_cache", cache_status="hit-exact"),
        LedgerRecord("c.1", now, strategy="cascade_escalated", cost_usd=0.125)])
    report = _cli(capsys, "report", "--db", str(db), "--by", "strategy", "--json")
    groups = {g["key"]: g for g in report["groups"]}
    assert groups.keys() == {"none", "exact_cache", "cascade_escalated"}
    assert (groups["none"]["requests"], groups["none"]["errors"]) == (2, 1)
    assert groups["cascade_escalated"]["cascade_attempts"] == 1
    lines = _fits(_piped(tmp_path, "report", "--db", str(db), "--by", "strategy"))
    assert _figures(lines, "Spend by strategy", "none")[:2] == ["2", "$0.750"]


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.jsonl.gz", "-"])
def test_export_writes_every_field_of_the_rows_in_the_window(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes], name: str
) -> None:
    now = time.time()
    rows = [_every_field(i, now - (10 - i) * DAY + 3600) for i in range(10)]
    db = _ledger_file(tmp_path / "l.db", rows)
    target = name if name == "-" else str(tmp_path / name)
    assert main(["report", "--db", str(db), "--since", "5d", "--export", target]) == 0
    out = capsysbinary.readouterr().out
    if name == "-":
        data = out
    else:
        assert b"5 ledger rows written to" in out
        raw = Path(target).read_bytes()
        data = gzip.decompress(raw) if name.endswith(".gz") else raw
        assert raw[:2] == b"\x1f\x8b" if name.endswith(".gz") else raw[:1] == b"{"
    lines = [json.loads(line) for line in data.decode().splitlines()]
    assert all(line.pop("kind") == "skinflint.ledger" for line in lines)
    assert all(list(line) == [f.name for f in fields(LedgerRecord)] for line in lines)
    assert [LedgerRecord(**line) for line in lines] == rows[5:]  # exactly, oldest first


def test_export_json_says_how_many(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = _ledger_file(tmp_path / "l.db", [_every_field(1, time.time())])
    out = tmp_path / "x.jsonl"
    assert _cli(capsys, "report", "--db", str(db), "--export", str(out), "--json") == {
        "exported": 1, "path": str(out)}


def _weeks(now: float) -> list[LedgerRecord]:
    def spent(feature: str, days_ago: float, usd: float) -> LedgerRecord:
        return LedgerRecord(f"{feature}-{days_ago}", now - days_ago * DAY, feature=feature,
                            cost_usd=usd)

    return [
        spent("search", 1, 0.5), spent("search", 6.9, 0.68), spent("search", 8, 1.0),
        spent("chat", 2, 0.97), spent("chat", 13.9, 1.0),
        spent("summarise", 3, 0.2),  # new this week
        spent("legacy", 10, 0.3),  # nothing this week
        spent("steady", 1, 1.001), spent("steady", 9, 1.0),
        spent("old", 15, 9.0),  # before both weeks
        LedgerRecord("free", now - DAY, feature="cached", cost_usd=0.0),
        LedgerRecord("unpriced", now - DAY, feature="cached", cost_usd=None),
    ]


def test_week_over_week_per_feature() -> None:
    from skinflint.analytics.report import build_report, change_text

    now = 1_790_000_000.0
    report = build_report(_weeks(now), since=now - 30 * DAY, now=now)
    got = [(w.feature, round(w.this_week_usd, 6), round(w.last_week_usd, 6),
            None if w.change is None else round(w.change, 6), change_text(w))
           for w in report.week_over_week]
    assert got == [
        ("search", 1.18, 1.0, 0.18, "up 18%"),
        ("steady", 1.001, 1.0, 0.001, "flat"),
        ("chat", 0.97, 1.0, -0.03, "down 3%"),
        ("summarise", 0.2, 0.0, None, "new"),
        ("legacy", 0.0, 0.3, -1.0, "down 100%"),
    ]
    assert report.to_json()["week_over_week"][0] == {
        "feature": "search", "this_week_usd": pytest.approx(1.18), "last_week_usd": 1.0,
        "change": pytest.approx(0.18)}
    assert build_report(_weeks(now)).week_over_week == []  # no now, no comparison


def test_week_over_week_in_the_report_whatever_its_window(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = _ledger_file(tmp_path / "l.db", _weeks(time.time()))
    report = _cli(capsys, "report", "--db", str(db), "--since", "1d", "--json")
    assert report["total"]["requests"] == 0  # the rows of the window: none within a day
    weeks = {w["feature"]: w for w in report["week_over_week"]}
    assert weeks["search"]["change"] == pytest.approx(0.18)
    assert weeks["summarise"]["change"] is None
    lines = _fits(_piped(tmp_path, "report", "--db", str(db)))
    title = "Spend by feature, week over week"
    assert _figures(lines, title, "search") == ["$1.18", "$1.00", "up", "18%"]
    assert _figures(lines, title, "chat") == ["$0.970", "$1.00", "down", "3%"]
    assert _figures(lines, title, "summarise") == ["$0.200", "$0", "new"]


# ---- answers cut short, and the caps the ledger suggests


def _lengths(now: float) -> list[LedgerRecord]:
    """summarize: 200 whole answers (198 of 10 tokens, one of 500, one of 1000) and 3 cut at
    their limit, beside rows that are not answers; chat: only answers cut short."""
    rows = [LedgerRecord(f"s{i}", now, feature="summarize", output_tokens=10)
            for i in range(198)]
    rows += [LedgerRecord("s-500", now, feature="summarize", output_tokens=500),
             LedgerRecord("s-1000", now, feature="summarize", output_tokens=1000)]
    rows += [LedgerRecord(f"s-cut{i}", now, feature="summarize", output_tokens=150, truncated=1)
             for i in range(3)]
    rows += [  # none of these is an answer the provider gave a client request
        LedgerRecord("hit", now, feature="summarize", output_tokens=5000,
                     cache_status="hit-exact", strategy="exact_cache"),
        LedgerRecord("x.1", now, feature="summarize", output_tokens=5000,
                     strategy="cascade_escalated"),
        LedgerRecord("err", now, feature="summarize", output_tokens=5000, status=502),
        LedgerRecord("emb", now, feature="summarize", output_tokens=5000, endpoint="embeddings"),
        LedgerRecord("old", now - 40 * DAY, feature="summarize", output_tokens=5000)]
    rows += [LedgerRecord(f"c{i}", now, feature="chat", output_tokens=64, truncated=1)
             for i in range(2)]
    return rows


def test_suggest_caps_from_the_lengths_of_answers_not_cut_short() -> None:
    from skinflint.analytics.caps import suggest_caps
    from skinflint.config import TokenBudgets

    now = time.time()
    budgets = TokenBudgets.model_validate({"default": {"max_tokens": 300},
                                           "features": {"chat": {"max_tokens": 64}}})
    found = {c.feature: c for c in suggest_caps(_lengths(now), since=now - 30 * DAY,
                                                budgets=budgets)}
    s = found["summarize"]
    assert (s.answers, s.truncated, s.p50, s.p95, s.p99) == (200, 3, 10, 10, 500)
    assert s.suggested == 512  # p99 rounded up to a multiple of 16
    assert s.would_cut == pytest.approx(1 / 200)  # the answer of 1000 tokens
    assert s.current == 300  # the default's
    c = found["chat"]  # every answer cut: how long they would have been is unknown
    assert (c.answers, c.truncated, c.suggested, c.would_cut, c.current) == (0, 2, None, None, 64)
    with_old = {c.feature: c for c in suggest_caps(_lengths(now))}
    old = with_old["summarize"]  # the row of 40 days ago counts too
    assert (old.answers, old.would_cut) == (201, pytest.approx(2 / 201))


def test_report_suggest_caps_as_json_and_as_a_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = _ledger_file(tmp_path / "l.db", _lengths(time.time()))
    config = tmp_path / "c.yaml"
    config.write_text("token_budgets:\n  features:\n    summarize: {max_tokens: 256}\n")
    out = _cli(capsys, "report", "--config", str(config), "--db", str(db), "--since", "30d",
               "--suggest-caps", "--json")
    found = {c["feature"]: c for c in out["features"]}
    assert found["summarize"]["suggested"] == 512 and found["summarize"]["current"] == 256
    assert found["chat"]["suggested"] is None and found["chat"]["current"] is None
    lines = _fits(_piped(tmp_path, "report", "--config", str(config), "--db", str(db),
                         "--since", "30d", "--suggest-caps"))
    title = "Output-token caps by feature"
    assert _figures(lines, title, "summarize") == [
        "200", "3", "10", "10", "500", "512", "256", "0.5%"]
    assert _figures(lines, title, "chat") == ["0", "2", "-", "-", "-", "-", "-", "-"]


def test_report_counts_answers_cut_short_per_group(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = _ledger_file(tmp_path / "l.db", _lengths(time.time()))
    report = _cli(capsys, "report", "--db", str(db), "--json")
    groups = {g["key"]: g for g in report["groups"]}
    assert (groups["summarize"]["truncated"], groups["chat"]["truncated"]) == (3, 2)
    assert report["total"]["truncated"] == 5
    lines = _fits(_piped(tmp_path, "report", "--db", str(db)))
    assert "cut" in lines[lines.index("Requests by feature") + 1]
    assert _figures(lines, "Requests by feature", "chat")[4] == "2"


def test_report_shows_the_prompt_tokens_compression_saved_per_group(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    rows = [LedgerRecord("d1", now, feature="docs", input_tokens=400, tokens_saved=100),
            LedgerRecord("d2", now, feature="docs", input_tokens=300, tokens_saved=50),
            LedgerRecord("c1", now, feature="chat", input_tokens=20)]
    db = _ledger_file(tmp_path / "l.db", rows)
    report = _cli(capsys, "report", "--db", str(db), "--json")
    groups = {g["key"]: g for g in report["groups"]}
    assert (groups["docs"]["tokens_saved"], groups["chat"]["tokens_saved"]) == (150, 0)
    assert report["total"]["tokens_saved"] == 150
    lines = _fits(_piped(tmp_path, "report", "--db", str(db)))
    assert "saved" in lines[lines.index("Requests by feature") + 2]
    assert _figures(lines, "Requests by feature", "docs")[4:7] == ["700", "150", "0"]


def test_an_export_holds_a_few_thousand_rows_at_a_time(tmp_path: Path) -> None:
    """Rows are read and written a part at a time: exporting 40,000 allocates a fraction of
    what holding them all would."""
    now = time.time()
    rows = [_every_field(i, now - 40_000 + i) for i in range(40_000)]
    db = _ledger_file(tmp_path / "l.db", rows)
    ledger = SQLiteLedger(str(db))
    all_at_once = _peak(lambda: list(ledger.query()))
    ledger.close()
    out = tmp_path / "rows.jsonl"
    exported = _peak(lambda: main(["report", "--db", str(db), "--export", str(out)]))
    assert out.read_bytes().count(b"\n") == 40_000
    assert exported < all_at_once / 4, (exported, all_at_once)


def test_a_postgres_ledger_exports_every_row_oldest_first(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from skinflint.storage.pg_ledger import PostgresLedger

    now = time.time()
    rows = [_every_field(i, now - 12_000 + i) for i in range(12_000)]  # past one read's rows
    ledger = PostgresLedger(pg_url)
    for r in rows:
        ledger.record(r)
    ledger.close()
    out = tmp_path / "rows.jsonl"
    assert _cli(capsys, "report", "--db", pg_url, "--export", str(out), "--json") == {
        "exported": 12_000, "path": str(out)}
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["request_id"] for line in lines] == [r.request_id for r in rows]


def _peak(run: Callable[[], object]) -> int:
    """The most memory Python held at once while ``run`` ran, in bytes."""
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
