"""Duplicates as the caches would serve them: within the TTL of the entry the first request
stored (stored again once expired), never for a feature the cache is off for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from skinflint.analytics.audit import run_audit
from skinflint.config import Settings, settings_from_dict
from tests.analytics.auditlog import BASES, PARAPHRASES, SYSTEMS

T0 = 1_767_225_600.0
HOUR = 3600.0


def _line(question: str, hours: float, feature: str = "faq") -> dict[str, Any]:
    body = {"model": "gpt-4o", "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEMS["faq"]},
                         {"role": "user", "content": question}]}
    return {"request": body, "timestamp": T0 + hours * HOUR, "feature": feature,
            "response": {"model": "gpt-4o", "choices": [{"index": 0, "finish_reason": "stop",
                                                         "message": {"role": "assistant",
                                                                     "content": "Paris."}}],
                         "usage": {"prompt_tokens": 100, "completion_tokens": 10}}}


def _audit(tmp_path: Path, lines: list[dict[str, Any]], cache: dict[str, Any]) -> dict[str, Any]:
    path = tmp_path / "calls.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    settings: Settings = settings_from_dict({"cache": cache})
    return run_audit(path, settings)


QUESTION = BASES[0][0]
TTL_2H = {"exact": {"ttl_seconds": 2 * HOUR}}


def test_an_exact_duplicate_is_served_only_while_its_entry_lives(tmp_path: Path) -> None:
    # stored at 0h (until 2h): 1h is served; 3h stores it again (until 5h): 4h is served
    lines = [_line(QUESTION, h) for h in (0, 1, 3, 4)]
    assert _audit(tmp_path, lines, TTL_2H)["exact_duplicates"]["requests"] == 2
    assert _audit(tmp_path, lines, {})["exact_duplicates"]["requests"] == 3  # a week's TTL


def test_no_duplicates_where_the_cache_is_off_and_keys_apart_for_a_features_own_policy(
        tmp_path: Path) -> None:
    lines = [_line(QUESTION, h, "faq") for h in (0, 1)] + [_line(QUESTION, 2, "docs")]
    off = {"exact": {"features": {"faq": {"enabled": False}}}}
    assert _audit(tmp_path, lines, off)["exact_duplicates"]["requests"] == 0
    own = {"exact": {"features": {"faq": {"ttl_seconds": 9 * HOUR}}}}
    assert _audit(tmp_path, lines, own)["exact_duplicates"]["requests"] == 1  # docs: its own key
    assert _audit(tmp_path, lines, {})["exact_duplicates"]["requests"] == 2


@pytest.mark.parametrize(("hours", "served"), [(1, 1), (3, 0)])
def test_a_near_duplicate_is_served_only_while_the_question_it_matches_lives(
        tmp_path: Path, hours: float, served: int) -> None:
    lines = [_line(QUESTION, 0), _line(PARAPHRASES[0], hours)]
    result = _audit(tmp_path, lines, {**TTL_2H, "semantic": {"enabled": True}})
    assert result["near_duplicates"]["requests"] == served


def test_duplicates_the_temperature_rules_keep_out_are_told_apart(tmp_path: Path) -> None:
    lines = [_line(QUESTION, h) for h in (0, 1, 2)] + [_line(BASES[1][0], h) for h in (0, 1)]
    for line in lines[:3]:
        del line["request"]["temperature"]  # the providers' default, above max_temperature
    result = _audit(tmp_path, lines, {})
    assert result["exact_duplicates"]["requests"] == 3  # what the cache serves once allowed
    kept_out = result["duplicates_kept_out_by_temperature"]
    assert kept_out["requests"] == 2 and kept_out["cost_usd"] > 0  # those set no temperature
    assert any("max_temperature" in note for note in result["notes"])
    allowed = _audit(tmp_path, lines, {"exact": {"features": {"faq": {
        "cache_any_temperature": True}}}})
    assert allowed["duplicates_kept_out_by_temperature"]["requests"] == 0
    assert not any("max_temperature" in note for note in allowed["notes"])
