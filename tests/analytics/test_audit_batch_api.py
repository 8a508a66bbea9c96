"""The audit's ``batch_api`` projection: background calls (no end user, not streamed, a burst of
at least ten calls of one tenant, feature and model within a minute) at the batch price, on a
hand-made log whose figures can be worked out by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from skinflint.analytics.audit import run_audit
from skinflint.analytics.audit_projection import BURST_CALLS
from skinflint.config import settings_from_dict

T0 = 1_767_225_600.0  # the start of a minute
PROMPT, ANSWER = 1000, 200
# gpt-4o-mini in the price catalog: 0.15/0.60 real time, 0.075/0.30 at its listed batch price
CATALOG_SAVING = (PROMPT * (0.15 - 0.075) + ANSWER * (0.60 - 0.30)) / 1e6
OWN = "house-model"  # priced by the configuration; its provider's batch_discount is 0.4
OWN_COST = (PROMPT * 2.0 + ANSWER * 8.0) / 1e6


def line(i: int, ts: float, *, feature: str = "nightly", model: str = "gpt-4o-mini",
         user: str = "", stream: bool = False, tenant: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [
        {"role": "user", "content": f"Summarise ticket {i}."}]}
    if stream:
        body["stream"] = True
    return {"request": body, "timestamp": ts, "feature": feature, "user": user,
            "tenant": tenant,
            "response": {"model": model, "choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant",
                                                                  "content": "..."}}],
                         "usage": {"prompt_tokens": PROMPT, "completion_tokens": ANSWER}}}


def burst(first: int, n: int, start: float, **kw: Any) -> list[dict[str, Any]]:
    """``n`` calls two seconds apart from ``start``."""
    return [line(first + k, start + 2 * k, **kw) for k in range(n)]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    lines = [
        *burst(0, 10, T0),  # counted: ten in one minute, exactly the burst
        *burst(100, 25, T0 + 600, feature="reindex", model=OWN),  # counted, configured price
        *burst(200, 9, T0 + 1200),  # one short of a burst
        *burst(300, 12, T0 + 1800, user="ana"),  # someone is waiting
        *burst(400, 12, T0 + 2400, stream=True),  # streamed: someone reads it as it comes
        *burst(500, 12, T0 + 3000 + 40),  # from 40 s on: 10 in one minute, 2 in the next
        *burst(600, 6, T0 + 3600, tenant="a"),  # two tenants' six calls are not one burst
        *burst(700, 6, T0 + 3600, tenant="b"),
        *burst(800, 5, T0 + 4200, feature="x"), *burst(900, 5, T0 + 4200, feature="y"),
    ]
    lines[-1]["timestamp"] = T0 + 30 * 86400  # the log spans 30 days: no scaling to a month
    path = tmp_path_factory.mktemp("log") / "calls.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    settings = settings_from_dict({
        "providers": {"house": {"base_url": "http://127.0.0.1:9/v1", "batch_discount": 0.4}},
        "models": {OWN: {"provider": "house", "price": {"input": 2.0, "output": 8.0}}}})
    return run_audit(path, settings)


def strategies(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in result["strategies"]}


def test_background_bursts_are_priced_at_the_batch_price(result: dict[str, Any]) -> None:
    s = strategies(result)["batch_api"]
    assert BURST_CALLS == 10
    # the ten-call burst and the 25 configured calls; the 12 calls straddling two minutes
    # have 10 in their first minute (at 40 s + 2 s * k, k >= 10 falls in the next one)
    assert s["log_requests"] == 10 + 25 + 10
    expected = 20 * CATALOG_SAVING + 25 * OWN_COST * (1 - 0.4)
    assert s["log_saving_usd"] == pytest.approx(expected, rel=1e-9)
    assert (s["log_input_tokens_saved"], s["log_output_tokens_saved"]) == (0, 0)
    assert s["effect"] == "price only"
    assert "no end user" in s["assumptions"] and "batch_discount" in s["assumptions"]


def test_batch_api_comes_last_and_joins_the_compound(result: dict[str, Any]) -> None:
    names = [s["name"] for s in result["strategies"]]
    assert names[-2:] == ["batching", "batch_api"]
    shares = [s["saving_share"] for s in result["strategies"]]
    assert strategies(result)["batch_api"]["saving_share"] == pytest.approx(
        strategies(result)["batch_api"]["log_saving_usd"] / result["cost_usd"])
    assert result["compound"]["saving_share"] == pytest.approx(
        1 - math.prod(1 - x for x in shares))
    assert result["compound"]["saving_share"] >= strategies(result)["batch_api"]["saving_share"]
    assert "batch API" in result["compound"]["assumptions"]
    assert strategies(result)["batching"]["assumptions"].startswith("in-prompt batching")


def test_a_month_long_log_is_not_scaled(result: dict[str, Any]) -> None:
    s = strategies(result)["batch_api"]
    assert result["monthly_factor"] == pytest.approx(1.0)
    assert s["saving_usd"] == pytest.approx(s["log_saving_usd"], abs=1e-6)


def test_a_log_of_people_saves_nothing_by_batch_api(tmp_path: Path) -> None:
    lines = burst(0, 30, T0, user="ana")
    path = tmp_path / "calls.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    s = strategies(run_audit(path, settings_from_dict({})))["batch_api"]
    assert (s["log_requests"], s["log_saving_usd"]) == (0, 0.0)
