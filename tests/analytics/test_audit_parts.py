"""Prompt bloat, output length and the compression, token-budget and batching projections on a
small hand-made log whose answers can be worked out by hand."""

from __future__ import annotations

import json
from typing import Any

import pytest

from skinflint.analytics.audit import run_audit
from skinflint.analytics.audit_bloat import compact
from skinflint.analytics.audit_projection import compound, monthly_factor
from skinflint.config import settings_from_dict
from skinflint.tokens import TokenCounter

MODEL = "gpt-4o-mini"
SYSTEM = "Be brief.\nBe brief.\n\nAnswer   in   English,  please."
T0 = 1_767_225_600.0
RATE_IN, RATE_OUT = 1.0, 2.0  # USD per million


def _line(i: int, ts: float, *, out: int = 10, prompt: int = 1000, finish: str = "stop",
          examples: bool = False) -> dict[str, Any]:
    turns = [{"role": "user", "content": "What is 2 + 2?"},
             {"role": "assistant", "content": "4"}] if examples else []
    body = {"model": MODEL, "max_tokens": 1000, "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM}, *turns,
                         {"role": "user", "content": f"Tell me about case {i} of file {i * 7}"}]}
    return {"request": body, "timestamp": ts, "feature": "bulk", "user": f"u{i % 3}",
            "response": {"model": MODEL, "choices": [{"index": 0, "finish_reason": finish,
                                                      "message": {"role": "assistant",
                                                                  "content": "..."}}],
                         "usage": {"prompt_tokens": prompt, "completion_tokens": out}}}


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    lines = [_line(i, T0 + i) for i in range(10)]  # ten calls in the first minute
    lines += [_line(10 + k, T0 + 120 * (k + 1)) for k in range(25)]  # one a minute apart
    lines += [_line(40, T0 + 5000, out=500, finish="length"),
              _line(41, T0 + 5200, out=1000, finish="length"),
              _line(42, T0 + 5400, examples=True), _line(43, T0 + 5600, examples=True),
              _line(44, T0 + 5800, prompt=50_000)]
    path = tmp_path_factory.mktemp("log") / "calls.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    settings = settings_from_dict({"models": {MODEL: {
        "provider": "openai", "price": {"input": RATE_IN, "output": RATE_OUT}}}})
    return run_audit(path, settings)


def _strategy(result: dict[str, Any], name: str) -> float:
    found: float = next(s for s in result["strategies"] if s["name"] == name)["log_saving_usd"]
    return found


def test_compact_drops_repeated_lines_and_whitespace_only() -> None:
    assert compact(SYSTEM) == "Be brief.\nAnswer in English, please."
    assert compact("One.\nTwo.") == "One.\nTwo."


def test_repeated_system_prompt_and_its_compression(result: dict[str, Any]) -> None:
    counter = TokenCounter()
    each = counter.count_text(MODEL, SYSTEM)
    trimmed = each - counter.count_text(MODEL, compact(SYSTEM))
    assert trimmed > 0
    prompts = result["bloat"]["system_prompts"]
    assert (prompts["distinct"], prompts["repeated"], prompts["calls"]) == (1, 1, 40)
    assert prompts["tokens"] == 40 * each
    assert prompts["share_of_input_tokens"] == pytest.approx(40 * each / (39 * 1000 + 50_000))
    assert _strategy(result, "compression") == pytest.approx(40 * trimmed * RATE_IN / 1e6)


def test_example_turns_and_oversized_prompts(result: dict[str, Any]) -> None:
    few = result["bloat"]["few_shot"]
    assert (few["examples"], few["calls"]) == (1, 2)
    big = result["bloat"]["oversized"]
    assert big["requests"] == 1 and big["input_tokens"] == 50_000


def test_output_length_and_token_budgets(result: dict[str, Any]) -> None:
    [row] = result["output_length"]
    assert (row["feature"], row["requests"], row["p50"], row["max_tokens"]) == ("bulk", 40, 10,
                                                                                 1000)
    assert (row["p95"], row["p99"]) == (500, 1000)  # nearest rank of 40 answers
    assert (row["cut"], row["cut_share"]) == (2, 2 / 40)
    # capped at the p95, 500 tokens: only the 1000-token answer loses 500
    assert _strategy(result, "token_budgets") == pytest.approx(500 * RATE_OUT / 1e6)


def test_batching_saves_the_instructions_of_calls_in_the_same_minute(
        result: dict[str, Any]) -> None:
    each = TokenCounter().count_text(MODEL, SYSTEM)
    assert _strategy(result, "batching") == pytest.approx(9 * each * RATE_IN / 1e6)


def test_no_duplicates_among_numbered_cases(result: dict[str, Any]) -> None:
    assert result["exact_duplicates"]["requests"] == 0
    assert result["near_duplicates"]["requests"] == 0


def test_compound_never_exceeds_the_spend() -> None:
    assert compound([0.5, 0.5]) == pytest.approx(0.75)
    assert compound([1.2, 0.3]) == 1.0
    assert compound([]) == 0.0


def test_monthly_factor_needs_every_call_timed(result: dict[str, Any]) -> None:
    assert result["monthly_factor"] == pytest.approx(30 * 86400 / 5800)
    assert monthly_factor([]) == (None, 0.0)


def test_spend_over_time_adds_up_to_the_total(result: dict[str, Any]) -> None:
    assert result["bucket"] == "hour"  # the log spans less than two days
    assert [p["start"] for p in result["series"]] == [
        "2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z"]
    assert sum(p["requests"] for p in result["series"]) == result["requests"] == 40
    assert sum(p["cost_usd"] for p in result["series"]) == pytest.approx(result["cost_usd"])
