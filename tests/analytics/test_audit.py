"""The audit's figures on a constructed log whose true costs and duplicates are known."""

from __future__ import annotations

import gzip
import importlib
import json
import math
from pathlib import Path
from typing import Any

import pytest

from skinflint.analytics.audit import LEDGER_NOTE, iso, run_audit
from skinflint.config import Settings, load_settings, settings_from_dict
from skinflint.pipeline.cache import semantic_defaults
from tests.analytics.auditlog import CONFIG, PRICES, UNPRICED, Built, build_log, ledger_line


def _write(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def built() -> Built:
    return build_log(seed=7)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    path = tmp_path_factory.mktemp("cfg") / "skinflint.yaml"
    path.write_text(CONFIG)
    return load_settings(path)


@pytest.fixture(scope="module")
def audited(built: Built, settings: Settings, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, Any]:
    log = _write(tmp_path_factory.mktemp("log") / "calls.jsonl", built.lines)
    return run_audit(log, settings)


def _groups(rows: list[dict[str, Any]]) -> dict[str, tuple[int, float]]:
    return {r["name"]: (r["requests"], round(r["cost_usd"], 9)) for r in rows}


def _truth_groups(built: Built, by: str) -> dict[str, tuple[int, float]]:
    return {name: (int(v[0]), round(v[1], 9)) for name, v in built.truth.by[by].items()}


def test_spend_in_total_and_by_group_is_the_truth(built: Built, audited: dict[str, Any]) -> None:
    t = built.truth
    assert audited["requests"] == t.requests == len(built.lines)
    assert audited["cost_usd"] == pytest.approx(t.cost, abs=1e-9)
    for by in ("feature", "model", "user"):
        assert _groups(audited[f"by_{by}"]) == _truth_groups(built, by)
    assert audited["unpriced"] == {"requests": 1, "models": [UNPRICED]}
    costs = [g["cost_usd"] for g in audited["by_model"]]
    assert costs == sorted(costs, reverse=True)


def test_exact_and_near_duplicates_are_the_truth(built: Built, audited: dict[str, Any]) -> None:
    t = built.truth
    exact, near = audited["exact_duplicates"], audited["near_duplicates"]
    assert (exact["requests"], near["requests"]) == (len(t.exact), len(t.near)) == (7, 6)
    assert exact["cost_usd"] == pytest.approx(sum(t.exact), abs=1e-9)
    assert near["cost_usd"] == pytest.approx(sum(t.near), abs=1e-9)
    assert exact["share"] == pytest.approx(7 / t.requests)
    assert near["share"] == pytest.approx(6 / t.requests)
    assert near["threshold"] == semantic_defaults()["threshold"] and near["verifier"] is True


def test_without_the_verifier_a_near_miss_counts(built: Built, tmp_path: Path) -> None:
    """"convert a string to an int" vs "an int to a string": 0.99 cosine, refused only by the
    verifier; turning the verifier off in the configuration lets it through."""
    log = _write(tmp_path / "calls.jsonl", built.lines)
    settings = settings_from_dict({"models": _models(), "cache": {"semantic": {"verifier": False}}})
    assert run_audit(log, settings)["near_duplicates"]["requests"] == len(built.truth.near) + 1


def _models() -> dict[str, Any]:
    return {m: {"provider": "openai", "price": {"input": i, "output": o}}
            for m, (i, o) in PRICES.items()}


def test_strategies_project_the_log_to_a_month(built: Built, audited: dict[str, Any]) -> None:
    span = max(built.times) - min(built.times)
    factor = 30 * 86400 / span
    assert audited["monthly_factor"] == pytest.approx(factor)
    assert audited["start"] == iso(min(built.times)) and audited["end"] == iso(max(built.times))
    s = {x["name"]: x for x in audited["strategies"]}
    assert list(s) == ["exact_cache", "semantic_cache", "compression", "routing",
                       "token_budgets", "batching"]
    assert s["exact_cache"]["log_saving_usd"] == pytest.approx(sum(built.truth.exact), abs=1e-9)
    assert s["exact_cache"]["saving_usd"] == pytest.approx(sum(built.truth.exact) * factor,
                                                           abs=1e-5)
    precision = semantic_defaults()["precision"]
    assert s["semantic_cache"]["log_saving_usd"] == pytest.approx(
        sum(built.truth.near) * precision, abs=1e-9)
    assert "not estimated" in s["routing"]["assumptions"] and s["routing"]["saving_usd"] == 0
    assert all(x["assumptions"] for x in s.values())
    expected = 1 - math.prod(1 - x["saving_share"] for x in s.values())
    assert audited["compound"]["saving_share"] == pytest.approx(expected)
    assert audited["compound"]["log_saving_usd"] <= audited["cost_usd"]


def test_gzipped_log_reads_the_same(built: Built, settings: Settings, audited: dict[str, Any],
                                    tmp_path: Path) -> None:
    path = tmp_path / "calls.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(line) + "\n" for line in built.lines)
    again = run_audit(path, settings)
    assert {**again, "file": ""} == {**audited, "file": ""}


def test_ledger_export_gives_figures_and_exact_duplicates(built: Built, settings: Settings,
                                                          tmp_path: Path) -> None:
    rows = [ledger_line(line) for line in built.lines]
    attempt = ledger_line(built.lines[0], strategy="cascade_escalated", cost_usd=0.5,
                          request_id="r.0", user="tiers")
    result = run_audit(_write(tmp_path / "ledger.jsonl", [*rows, attempt]), settings)
    t = built.truth
    assert result["requests"] == t.requests  # the escalated tier is not a request...
    assert result["cost_usd"] == pytest.approx(t.cost + 0.5, abs=1e-9)  # ...but it cost
    assert result["exact_duplicates"]["requests"] == len(t.exact)
    assert result["exact_duplicates"]["cost_usd"] == pytest.approx(sum(t.exact), abs=1e-9)
    assert result["near_duplicates"]["requests"] == 0
    assert result["lines"]["ledger"] == len(rows) + 1
    assert LEDGER_NOTE in result["notes"]
    assert _groups(result["by_user"]) == {**_truth_groups(built, "user"), "tiers": (0, 0.5)}


def test_since_and_until_keep_the_calls_in_between(built: Built, settings: Settings,
                                                   tmp_path: Path) -> None:
    times = sorted(built.times)
    since, until = times[5], times[20]
    result = run_audit(_write(tmp_path / "calls.jsonl", built.lines), settings,
                       since=since, until=until)
    assert result["requests"] == 15
    assert result["lines"]["outside_time_range"] == len(times) - 15
    assert result["start"] == iso(since) and result["end"] == iso(times[19])


def test_bad_lines_are_skipped_and_reported_by_number(built: Built, settings: Settings,
                                                      tmp_path: Path) -> None:
    bad = ["{not json", json.dumps({"feature": "x"}),
           json.dumps({"request": {"model": "gpt-4o"}}),
           json.dumps({"request": {"model": "gpt-4o", "messages": []}, "timestamp": "soon"})]
    lines: list[Any] = [*built.lines[:3], bad[0], *built.lines[3:10], bad[1], bad[2],
                        *built.lines[10:], "", bad[3]]
    result = run_audit(_write(tmp_path / "calls.jsonl", lines), settings)
    assert result["requests"] == built.truth.requests
    assert result["lines"]["bad"] == 4
    numbers = [b["line"] for b in result["lines"]["bad_lines"]]
    assert numbers == [4, 12, 13, len(lines)]
    reasons = " ".join(b["reason"] for b in result["lines"]["bad_lines"])
    assert "not JSON" in reasons and "messages" in reasons and "soon" in reasons


def test_over_powered_calls_by_the_routes_rules(built: Built, tmp_path: Path) -> None:
    """A route sends questions about Python to the cheaper model: the logged gpt-4o calls
    about Python are over-powered by exactly the price difference."""
    settings = settings_from_dict({"models": _models(), "routes": {"auto": {
        "rules": [{"task": "cheap", "keywords": ["python"]}],
        "tasks": {"default": {"model": "gpt-4o"}, "cheap": {"model": "gpt-4o-mini"}}}}})
    result = run_audit(_write(tmp_path / "calls.jsonl", built.lines), settings)
    expected = 0.0
    count = 0
    for line in built.lines:
        body, usage = line["request"], line["response"]["usage"]
        text = body["messages"][-1]["content"].lower()
        if body["model"] == "gpt-4o" and "python" in text:
            p, c = usage["prompt_tokens"], usage["completion_tokens"]
            expected += (p * 2.5 + c * 10 - p * 0.15 - c * 0.6) / 1e6
            count += 1
    o = result["overpowered"]
    assert count > 0 and o["requests"] == count and o["route"] == "auto"
    assert o["saving_usd"] == pytest.approx(expected, abs=1e-9)
    assert o["moves"] == [{"from": "gpt-4o", "to": "gpt-4o-mini", "requests": count,
                           "saving_usd": pytest.approx(expected, abs=1e-9)}]
    routing = next(s for s in result["strategies"] if s["name"] == "routing")
    assert routing["log_saving_usd"] == pytest.approx(expected, abs=1e-9)


def test_alerts_are_the_engines_replay_of_the_log(built: Built, audited: dict[str, Any]) -> None:
    try:
        alerts: Any = importlib.import_module("skinflint.alerts")
    except ImportError:
        pytest.skip("alerts engine not merged yet")
    events = alerts.replay(alerts.DEFAULT_RULES, [
        (c.ts, {"tenant": c.tenant, "feature": c.feature, "model": c.model, "user": c.user},
         c.cost) for c in _calls(built)])
    assert audited["alerts"] == [
        {"rule": e.rule, "scope": e.per, "name": e.name, "start": iso(e.start), "end": iso(e.end),
         "spend_usd": e.spend_usd, "baseline_usd": e.baseline_usd} for e in events]


def _calls(built: Built) -> list[Any]:
    from skinflint.analytics.audit_input import parse_time

    class C:
        def __init__(self, line: dict[str, Any]) -> None:
            usage, model = line["response"]["usage"], line["request"]["model"]
            i, o = PRICES[model]
            self.ts = parse_time(line["timestamp"])
            self.tenant = line.get("tenant", "default")
            self.feature, self.user, self.model = line["feature"], line["user"], model
            self.cost = (usage["prompt_tokens"] * i + usage["completion_tokens"] * o) / 1e6

    calls = [C(line) for line in built.lines if line["request"]["model"] in PRICES]
    return sorted(calls, key=lambda c: c.ts)
