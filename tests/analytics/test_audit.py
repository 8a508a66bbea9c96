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
                       "token_budgets", "batching", "batch_api"]
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


def _p95(values: list[int]) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * 0.95), len(ordered) - 1)]


def test_each_strategy_counts_the_tokens_it_saves(built: Built, audited: dict[str, Any]) -> None:
    """Caches save every prompt and answer token of the calls they serve (the semantic cache
    only its calibrated share), token budgets the answer tokens beyond each feature's p95,
    routing none; the projection scales them as it scales dollars."""
    s = {x["name"]: x for x in audited["strategies"]}
    factor = audited["monthly_factor"]
    t = built.truth
    exact_in, exact_out = map(sum, zip(*t.exact_tokens, strict=True))
    assert (s["exact_cache"]["log_input_tokens_saved"],
            s["exact_cache"]["log_output_tokens_saved"]) == (exact_in, exact_out)
    assert s["exact_cache"]["input_tokens_saved"] == round(exact_in * factor)
    assert s["exact_cache"]["output_tokens_saved"] == round(exact_out * factor)
    assert s["exact_cache"]["log_requests"] == len(t.exact)
    precision = semantic_defaults()["precision"]
    near_in, near_out = map(sum, zip(*t.near_tokens, strict=True))
    assert s["semantic_cache"]["log_input_tokens_saved"] == round(near_in * precision)
    assert s["semantic_cache"]["log_output_tokens_saved"] == round(near_out * precision)
    lengths: dict[str, list[int]] = {}
    for line in built.lines:
        lengths.setdefault(line["feature"], []).append(line["response"]["usage"]
                                                       ["completion_tokens"])
    beyond = sum(int(n - _p95(v)) for v in lengths.values() for n in v if n > _p95(v))
    budgets = s["token_budgets"]
    assert (budgets["log_input_tokens_saved"], budgets["log_output_tokens_saved"]) == (0, beyond)
    assert budgets["effect"] == "tokens removed from the call"
    assert s["routing"]["input_tokens_saved"] == s["routing"]["output_tokens_saved"] == 0
    assert s["exact_cache"]["effect"] == "whole call not made"


def test_compression_batching_and_budgets_count_the_tokens_they_remove(tmp_path: Path) -> None:
    """21 calls, ten seconds apart, with a system prompt that says each line three times and
    one long answer: compression saves what deduplication removes from each prompt; batching
    the whole system prompt of all but the first call of each minute (at gpt-4o's input
    rate); a token budget the long answer's tokens beyond the p95 (at the output rate)."""
    from skinflint.analytics.audit_bloat import compact
    from skinflint.tokens import TokenCounter

    system = "\n".join(["Answer in English.", "Be   brief.", "Cite the manual."] * 3)
    t0, n = 1_767_225_600, 21
    answers = [20] * (n - 1) + [500]

    def line(i: int) -> dict[str, Any]:
        return {"request": {"model": "gpt-4o", "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"Question number {i}?"}]},
                "timestamp": t0 + 10 * i, "feature": "help",
                "response": {"id": "x", "object": "chat.completion", "model": "gpt-4o",
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": "ok"}}],
                             "usage": {"prompt_tokens": 300, "completion_tokens": answers[i],
                                       "total_tokens": 300 + answers[i]}}}

    result = run_audit(_write(tmp_path / "calls.jsonl", [line(i) for i in range(n)]),
                       settings_from_dict({"models": _models()}))
    counter = TokenCounter()
    whole = counter.count_text("gpt-4o", system)
    trimmed = whole - counter.count_text("gpt-4o", compact(system))
    assert 0 < trimmed < whole
    later = n - len({(t0 + 10 * i) // 60 for i in range(n)})  # not first in their minute
    s = {x["name"]: x for x in result["strategies"]}
    rate_in, rate_out = (p / 1e6 for p in PRICES["gpt-4o"])
    compression, batching, budgets = s["compression"], s["batching"], s["token_budgets"]
    assert (compression["log_input_tokens_saved"], compression["log_output_tokens_saved"]) == (
        n * trimmed, 0)
    assert compression["log_saving_usd"] == pytest.approx(n * trimmed * rate_in, abs=1e-9)
    assert (batching["log_input_tokens_saved"], batching["log_requests"]) == (
        later * whole, later)
    assert batching["log_saving_usd"] == pytest.approx(later * whole * rate_in, abs=1e-9)
    assert (budgets["log_input_tokens_saved"], budgets["log_output_tokens_saved"]) == (0, 480)
    assert budgets["log_saving_usd"] == pytest.approx(480 * rate_out, abs=1e-9)
    factor = result["monthly_factor"]
    assert budgets["output_tokens_saved"] == round(480 * factor)
