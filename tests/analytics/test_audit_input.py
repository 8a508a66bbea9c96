"""Reading audit input: both formats, times in either form, what defaults from the body, and
lines that cannot be read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from skinflint.analytics.audit_input import parse_time, read_log
from skinflint.cachekey import request_hash

BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
        "user": "body-user", "metadata": {"feature": "meta-feature"}}


def _log(tmp_path: Path, *rows: Any) -> Path:
    path = tmp_path / "log.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(("value", "expected"), [
    (1767225600, 1767225600.0),
    ("1767225600.5", 1767225600.5),
    ("2026-01-01T00:00:00Z", 1767225600.0),
    ("2026-01-01T00:00:00", 1767225600.0),  # no zone: UTC
    ("2026-01-01T01:00:00+01:00", 1767225600.0),
])
def test_times_are_iso_8601_or_epoch_seconds(value: Any, expected: float) -> None:
    assert parse_time(value) == expected


@pytest.mark.parametrize("value", ["tomorrow", True, None, [1]])
def test_other_times_are_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="ISO 8601 or epoch seconds"):
        parse_time(value)


def test_a_call_defaults_from_its_body(tmp_path: Path) -> None:
    [call] = read_log(_log(tmp_path, {"request": BODY})).calls
    assert (call.feature, call.user, call.tenant, call.model) == (
        "meta-feature", "body-user", "default", "gpt-4o")
    assert call.ts is None and call.usage is None  # counted later, from the messages
    assert call.request_hash == request_hash("chat", BODY)


def test_the_line_wins_over_the_body_and_the_answer_names_the_model(tmp_path: Path) -> None:
    row = {"request": BODY, "feature": "f", "user": "u", "tenant": "t",
           "response": {"model": "gpt-4o-2024-08-06",
                        "usage": {"prompt_tokens": 3, "completion_tokens": 4}}}
    [call] = read_log(_log(tmp_path, row)).calls
    assert (call.feature, call.user, call.tenant, call.model) == ("f", "u", "t",
                                                                  "gpt-4o-2024-08-06")
    assert call.usage is not None and (call.usage.input_tokens, call.usage.output_tokens) == (3, 4)


def test_calls_without_a_time_are_left_out_only_when_a_range_is_asked(tmp_path: Path) -> None:
    path = _log(tmp_path, {"request": BODY}, {"request": BODY, "timestamp": 100})
    assert len(read_log(path).calls) == 2
    bounded = read_log(path, since=50)
    assert len(bounded.calls) == 1 and bounded.filtered_out == 1
    assert len(read_log(path, until=100).calls) == 0  # until is exclusive


def test_unreadable_lines_are_counted_and_the_first_ones_kept(tmp_path: Path) -> None:
    rows = ["[1, 2]", *["{" for _ in range(150)], {"request": BODY}]
    log = read_log(_log(tmp_path, *rows))
    assert len(log.calls) == 1 and log.bad_count == 151
    assert len(log.bad) == 100 and log.bad[0].line == 1 and log.bad[0].reason == "not a JSON object"
