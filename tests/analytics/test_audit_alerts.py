"""The alerts the configured rules would have fired over a log's history."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest

from skinflint.analytics.audit import iso, run_audit
from skinflint.config import load_settings

T0 = 1_767_225_600.0
HOUR = 3600.0
ALERTS = """alerts:
  - {name: spend-spike, per: feature, window: hour, baseline_windows: 24, rise: 2,
     for_windows: 2, min_usd: 0.5, resolve_below: 1.5}
"""


@pytest.fixture(autouse=True)
def _engine() -> None:
    try:
        importlib.import_module("skinflint.alerts")
    except ImportError:
        pytest.skip("alerts engine not merged yet")


def _line(hour: int, prompt: int, feature: str) -> dict[str, Any]:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": f"Job {hour} of 99"}]}
    return {"request": body, "timestamp": T0 + hour * HOUR + 60, "feature": feature,
            "response": {"model": "gpt-4o", "usage": {"prompt_tokens": prompt,
                                                      "completion_tokens": 0}}}


def _audit(tmp_path: Path, config: str) -> dict[str, Any]:
    # $0.10 an hour for 30 hours, $5 an hour for 3 hours, then $0.10 again for 6 hours
    prompts = [100_000] * 30 + [5_000_000] * 3 + [100_000] * 6
    lines = [_line(h, p, "batch") for h, p in enumerate(prompts)]
    lines += [_line(h, 100_000, "steady") for h in range(len(prompts))]
    log = tmp_path / "calls.jsonl"
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = tmp_path / "alerts.yaml"
    cfg.write_text("models: {gpt-4o: {provider: openai, price: {input: 1, output: 1}}}\n"
                   + config)
    return run_audit(log, load_settings(cfg))


def test_a_spike_fires_the_configured_rule_once_and_resolves(tmp_path: Path) -> None:
    result = _audit(tmp_path, ALERTS)
    [alert] = result["alerts"]
    assert (alert["rule"], alert["scope"], alert["name"]) == ("spend-spike", "feature", "batch")
    assert iso(T0 + 30 * HOUR) <= alert["start"] <= iso(T0 + 33 * HOUR)
    assert alert["end"] is not None and alert["end"] > alert["start"]
    assert "configuration" in result["alerts_note"]


def test_an_empty_section_fires_nothing(tmp_path: Path) -> None:
    result = _audit(tmp_path, "alerts: []\n")
    assert result["alerts"] == [] and "empty" in result["alerts_note"]
