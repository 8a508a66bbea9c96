"""``skinflint report`` with the compress stage's cheap-model calls in the ledger: counted
apart from client requests and from cascade attempts, with their cost, in JSON and as a
table."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from skinflint.models import COMPRESS_CALL, LedgerRecord
from tests.test_report import _cli, _figures, _fits, _ledger_file, _piped


def test_report_counts_rewrites_and_summaries_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    db = _ledger_file(tmp_path / "l.db", [
        LedgerRecord("a", now, feature="docs", cost_usd=0.5, tokens_saved=400),
        LedgerRecord("a.rewrite", now, feature="docs", strategy=COMPRESS_CALL, cost_usd=0.25),
        LedgerRecord("b", now, feature="docs", cost_usd=0.5),
        LedgerRecord("b.summary.context", now, feature="docs", strategy=COMPRESS_CALL,
                     cost_usd=0.125),
        LedgerRecord("c", now, feature="quiz", cost_usd=0.25)])
    report = _cli(capsys, "report", "--db", str(db), "--json")
    docs = {g["key"]: g for g in report["groups"]}["docs"]
    assert (docs["requests"], docs["cascade_attempts"], docs["compress_calls"]) == (2, 0, 2)
    assert docs["compress_cost_usd"] == pytest.approx(0.375)
    assert docs["cost_usd"] == pytest.approx(1.375)  # counted in spend
    assert report["total"]["requests"] == 3
    lines = _fits(_piped(tmp_path, "report", "--db", str(db)))
    assert _figures(lines, "Compression model calls by feature", "docs") == ["2", "$0.375"]


def test_report_leaves_the_table_out_without_such_calls(tmp_path: Path) -> None:
    db = _ledger_file(tmp_path / "l.db", [LedgerRecord("a", time.time(), cost_usd=0.5)])
    assert "Compression model calls" not in _piped(tmp_path, "report", "--db", str(db))
