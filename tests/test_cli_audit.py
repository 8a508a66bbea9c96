"""``skinflint audit`` run as users run it: a subprocess, JSON and HTML out, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from skinflint.cli.output import count, usd
from tests.analytics.auditlog import CONFIG, Built, build_log


def _skinflint(cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "skinflint.cli", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def built() -> Built:
    return build_log(seed=11)


@pytest.fixture
def files(built: Built, tmp_path: Path) -> Path:
    (tmp_path / "calls.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in built.lines) + "oops\n")
    (tmp_path / "skinflint.yaml").write_text(CONFIG)
    return tmp_path


def test_json_holds_the_contracted_fields(built: Built, files: Path) -> None:
    run = _skinflint(files, "audit", "calls.jsonl", "--config", "skinflint.yaml", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    t = built.truth
    assert out["requests"] == t.requests
    assert out["cost_usd"] == pytest.approx(t.cost, abs=1e-9)
    for key in ("by_feature", "by_model", "by_user"):
        assert all({"name", "requests", "cost_usd"} <= set(g) for g in out[key])
    by_feature = {g["name"]: g["requests"] for g in out["by_feature"]}
    assert by_feature == {name: v[0] for name, v in t.by["feature"].items()}
    for key, truth in (("exact_duplicates", t.exact), ("near_duplicates", t.near)):
        assert out[key]["requests"] == len(truth)
        assert out[key]["share"] == pytest.approx(len(truth) / t.requests)
        assert out[key]["cost_usd"] == pytest.approx(sum(truth), abs=1e-9)
    assert isinstance(out["alerts"], list)
    assert all({"scope", "name", "start", "end"} <= set(a) for a in out["alerts"])
    assert [s["name"] for s in out["strategies"]][:2] == ["exact_cache", "semantic_cache"]
    assert all({"name", "saving_usd", "saving_share", "assumptions"} <= set(s)
               for s in out["strategies"])
    assert out["lines"]["bad"] == 1 and out["lines"]["bad_lines"][0]["line"] == t.requests + 1


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.external += [v for k, v in attrs if k in ("src", "href") and v]


def test_html_is_one_self_contained_page_with_charts(files: Path) -> None:
    run = _skinflint(files, "audit", "calls.jsonl", "--config", "skinflint.yaml",
                     "--html", "audit.html")
    assert run.returncode == 0, run.stderr
    assert "Spend by feature" in run.stdout and "1 lines skipped" in run.stdout
    page = _Page()
    page.feed((files / "audit.html").read_text())
    page.close()
    assert page.tags.count("svg") >= 5 and "table" in page.tags and "style" in page.tags
    assert page.external == [] and "link" not in page.tags


def test_text_output_and_json_together_with_html(files: Path) -> None:
    run = _skinflint(files, "audit", "calls.jsonl", "--json", "--html", "out.html")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["requests"] > 0
    assert (files / "out.html").read_text().startswith("<!DOCTYPE html>")


@pytest.mark.parametrize(("argv", "expected"), [
    (["audit", "missing.jsonl"], "no such file or directory: missing.jsonl"),
    (["audit", "calls.jsonl", "--since", "last tuesday"], "--since"),
    (["audit", "broken.gz"], "skinflint: "),
])
def test_bad_input_is_one_line_and_exit_2(files: Path, argv: list[str], expected: str) -> None:
    (files / "broken.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    run = _skinflint(files, *argv)
    assert run.returncode == 2
    assert run.stderr.startswith("skinflint") and run.stderr.count("\n") == 1, run.stderr
    assert expected in run.stderr and "Traceback" not in run.stderr


def test_since_and_until_bound_the_calls(built: Built, files: Path) -> None:
    times = sorted(line["timestamp"] if isinstance(line["timestamp"], float) else
                   _epoch(line["timestamp"]) for line in built.lines)
    since, until = _iso(times[3]), _iso(times[10])
    run = _skinflint(files, "audit", "calls.jsonl", "--since", since, "--until", until,
                     "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["requests"] == 7 and (out["since"], out["until"]) == (since, until)


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_tokens_saved_per_strategy_in_json_text_and_html(built: Built, files: Path) -> None:
    """The exact cache saves every token of the exact duplicates; text and HTML print the
    same projected figures as the JSON."""
    run = _skinflint(files, "audit", "calls.jsonl", "--config", "skinflint.yaml", "--json")
    assert run.returncode == 0, run.stderr
    out = {s["name"]: s for s in json.loads(run.stdout)["strategies"]}
    exact = out["exact_cache"]
    assert exact["log_input_tokens_saved"] == sum(p for p, _ in built.truth.exact_tokens)
    assert exact["log_output_tokens_saved"] == sum(c for _, c in built.truth.exact_tokens)
    assert exact["input_tokens_saved"] > exact["log_input_tokens_saved"]  # a month > the log
    run = _skinflint(files, "audit", "calls.jsonl", "--config", "skinflint.yaml",
                     "--html", "audit.html")
    assert run.returncode == 0, run.stderr
    text = " ".join(run.stdout.split())
    assert "prompt tok answer tok saving share" in text
    row = next(line for line in run.stdout.splitlines() if "exact_cache:" in line)
    assert row.split()[-4:-2] == [count(exact["input_tokens_saved"]),
                                  count(exact["output_tokens_saved"])]
    html = (files / "audit.html").read_text()
    assert "<th>prompt tokens saved</th><th>answer tokens saved</th>" in html
    assert (f"<td>exact_cache</td><td>{exact['input_tokens_saved']:,}</td>"
            f"<td>{exact['output_tokens_saved']:,}</td>") in html


def test_batch_api_in_json_text_and_html(tmp_path: Path) -> None:
    """Fifteen background calls in one minute, fifteen a person made: the batch API saves the
    first fifteen's real-time price less their batch price, shown alike in the three outputs."""
    from tests.analytics.test_audit_batch_api import CATALOG_SAVING, T0, burst

    lines = [*burst(0, 15, T0), *burst(100, 15, T0 + 600, user="ana")]
    (tmp_path / "calls.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    run = _skinflint(tmp_path, "audit", "calls.jsonl", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    s = {x["name"]: x for x in out["strategies"]}["batch_api"]
    assert s["log_requests"] == 15
    assert s["log_saving_usd"] == pytest.approx(15 * CATALOG_SAVING, rel=1e-9)
    assert s["saving_usd"] == pytest.approx(s["log_saving_usd"] * out["monthly_factor"],
                                            rel=1e-6)
    run = _skinflint(tmp_path, "audit", "calls.jsonl", "--html", "audit.html")
    assert run.returncode == 0, run.stderr
    row = " ".join(run.stdout.split()).split("batch_api: provider batch API")[1]
    assert usd(s["saving_usd"]) in row.split("all together")[0]
    html = (tmp_path / "audit.html").read_text()
    assert "<td>batch_api</td><td>0</td><td>0</td>" in html
