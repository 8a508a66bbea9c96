"""``skinflint report`` and ``cache stats`` as people read them: money with significant digits,
80 columns when piped, and client requests counted apart from cascade attempts."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from rich.console import Console

from skinflint.cli import main
from skinflint.cli.cache import format_cache_stats
from skinflint.money import format_usd
from skinflint.server.run import BackgroundServer
from tests.conftest import GatewayFactory, ledger_rows
from tests.pg import pg_server_fixture, pg_url_fixture  # noqa: F401  (fixtures)

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
