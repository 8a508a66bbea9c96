"""``skinflint report`` with the shadow-evaluation guard's calls in the ledger: counted apart
from client requests, with their cost and mean score, in JSON and as a table."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from skinflint.models import SHADOW_CALL, LedgerRecord
from tests.test_report import _cli, _figures, _fits, _ledger_file, _piped


def test_report_shows_the_shadow_calls_and_the_guards_score(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    db = _ledger_file(tmp_path / "l.db", [
        LedgerRecord("a", now, feature="docs", cost_usd=0.5),
        LedgerRecord("a.shadow", now, feature="docs", strategy=SHADOW_CALL, cost_usd=0.75,
                     similarity=1.0),
        LedgerRecord("b", now, feature="docs", cost_usd=0.5),
        LedgerRecord("b.shadow", now, feature="docs", strategy=SHADOW_CALL, cost_usd=0.75,
                     similarity=0.5),
        LedgerRecord("b.shadow.judge", now, feature="docs", strategy=SHADOW_CALL,
                     cost_usd=0.125),
        LedgerRecord("c", now, feature="quiz", cost_usd=0.25)])
    report = _cli(capsys, "report", "--db", str(db), "--by", "strategy", "--json")
    shadow = {g["key"]: g for g in report["groups"]}[SHADOW_CALL]
    assert (shadow["requests"], shadow["cascade_attempts"], shadow["shadow_calls"]) == (0, 0, 3)
    assert shadow["shadow_cost_usd"] == pytest.approx(1.625)
    assert shadow["shadow_score"] == pytest.approx(0.75)  # the judge's row holds no score
    assert report["total"]["requests"] == 3
    by_feature = {g["key"]: g for g in _cli(capsys, "report", "--db", str(db), "--json")["groups"]}
    assert by_feature["quiz"]["shadow_score"] is None
    lines = _fits(_piped(tmp_path, "report", "--db", str(db)))
    assert _figures(lines, "Shadow evaluation by feature", "docs") == ["3", "$1.62", "0.75"]
    table = lines[lines.index("Shadow evaluation by feature"):]
    table = table[:table.index("")]
    assert [line.split()[0] for line in table[3:5]] == ["docs", "total"]
    assert table[5].startswith("score:")


def test_report_leaves_the_shadow_table_out_without_shadow_calls(tmp_path: Path) -> None:
    db = _ledger_file(tmp_path / "l.db", [LedgerRecord("a", time.time(), cost_usd=0.5)])
    assert "Shadow evaluation" not in _piped(tmp_path, "report", "--db", str(db))
