"""Routes and cascades through the real HTTP path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from skinflint.config import settings_from_dict
from skinflint.errors import ConfigError
from tests.conftest import GatewayFactory, ledger_rows
from tests.fake_upstream import FakeUpstream

ROUTES: dict[str, Any] = {
    "smart": {
        "baseline": "gpt-4o",
        "rules": [
            {"task": "code", "keywords": ["python", "function"]},
            {"task": "short", "max_chars": 12},
            {"task": "legal", "feature": "contracts"},
        ],
        "default_task": "chat",
        "pins": {"compliance": "gpt-4o"},
        "tasks": {
            "code": {"model": "cheap"},
            "short": {"model": "gpt-4o-mini"},
            "legal": {"model": "gpt-4o"},
            "chat": {"cascade": [
                {"model": "gpt-4o-mini", "gate": {"format": "choice"}},
                {"model": "gpt-4o"},
            ]},
            "agree": {"cascade": [
                {"model": "gpt-4o-mini", "gate": {"accept": ["only this exact answer"]}},
                {"model": "cheap", "gate": {"agree_with": [0]}},
                {"model": "gpt-4o"},
            ]},
            "plain": {"cascade": [{"model": "gpt-4o-mini"}, {"model": "gpt-4o"}]},
            "confident": {"cascade": [
                {"model": "gpt-4o-mini", "gate": {"min_logprob": -0.5}}, {"model": "gpt-4o"}]},
        },
    }
}


@pytest.fixture
def routed(make_gateway: GatewayFactory) -> openai.OpenAI:
    gw = make_gateway(routes=ROUTES)
    return openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0)


def _ask(c: openai.OpenAI, text: str, **kw: Any) -> Any:
    return c.chat.completions.with_raw_response.create(
        model="smart", temperature=0, messages=[{"role": "user", "content": text}], **kw)


def test_rules_pick_the_task(routed: openai.OpenAI, fake: FakeUpstream) -> None:
    raw = _ask(routed, "write a python function that adds")
    assert raw.headers["x-skinflint-route"] == "smart;task=code"
    assert raw.headers["x-skinflint-model"] == "qwen3-8b"
    assert _ask(routed, "hi there").headers["x-skinflint-route"] == "smart;task=short"
    legal = _ask(routed, "review this clause for me",
                 extra_headers={"x-skinflint-feature": "contracts"})
    assert legal.headers["x-skinflint-route"] == "smart;task=legal"


def test_header_task_and_pins(routed: openai.OpenAI) -> None:
    raw = _ask(routed, "write a python function", extra_headers={"x-skinflint-task": "legal"})
    assert raw.headers["x-skinflint-route"] == "smart;task=legal"
    pinned = _ask(routed, "write a python function",
                  extra_headers={"x-skinflint-feature": "compliance"})
    assert pinned.headers["x-skinflint-route"] == "smart;pin=compliance"
    assert pinned.headers["x-skinflint-model"] == "gpt-4o"


def test_cascade_escalates_when_the_gate_fails(routed: openai.OpenAI, fake: FakeUpstream,
                                               tmp_path: Path) -> None:
    raw = _ask(routed, "tell me about the weather in a long sentence please")
    assert raw.headers["x-skinflint-route"] == "smart;task=chat;tier=2/2"
    assert raw.headers["x-skinflint-model"] == "gpt-4o"
    assert [r.body["model"] for r in fake.requests] == ["gpt-4o-mini", "gpt-4o"]  # type: ignore[index]
    rows = ledger_rows(tmp_path / "skinflint.db", expect=2)
    escalated, final = rows
    assert escalated["strategy"] == "cascade_escalated" and escalated["error_type"] == "format"
    assert escalated["model"] == "gpt-4o-mini" and escalated["cost_usd"] > 0
    assert final["model"] == "gpt-4o" and final["strategy"] == "cascade"
    total = escalated["cost_usd"] + final["cost_usd"]
    assert float(raw.headers["x-skinflint-cost-usd"]) == pytest.approx(total, abs=1e-8)
    assert final["saved_usd"] == pytest.approx(final["baseline_cost_usd"] - total)


def test_cascade_accepts_a_passing_tier(routed: openai.OpenAI, fake: FakeUpstream,
                                        tmp_path: Path) -> None:
    raw = _ask(routed, "anything", extra_headers={"x-skinflint-task": "plain"})
    assert raw.headers["x-skinflint-route"] == "smart;task=plain;tier=1/2"
    assert len(fake.requests) == 1
    assert len(ledger_rows(tmp_path / "skinflint.db", expect=1)) == 1


def test_agreement_gate(routed: openai.OpenAI, fake: FakeUpstream) -> None:
    raw = _ask(routed, "same answer from both", extra_headers={"x-skinflint-task": "agree"})
    assert raw.headers["x-skinflint-route"] == "smart;task=agree;tier=2/3"
    assert len(fake.requests) == 2


def test_cascade_escalates_on_tier_error(routed: openai.OpenAI, fake: FakeUpstream,
                                         tmp_path: Path) -> None:
    fake.fail_next("status", times=1, status=400)
    raw = _ask(routed, "A", extra_headers={"x-skinflint-task": "plain"})
    assert raw.headers["x-skinflint-route"] == "smart;task=plain;tier=2/2"
    rows = ledger_rows(tmp_path / "skinflint.db", expect=2)
    assert rows[0]["status"] == 400 and rows[0]["strategy"] == "cascade_escalated"


def test_cascade_streams_the_accepted_answer(routed: openai.OpenAI) -> None:
    chunks = list(routed.chat.completions.create(
        model="smart", messages=[{"role": "user", "content": "stream a cascade answer"}],
        stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream a cascade answer"
    assert all(c.usage is None for c in chunks)


def test_route_is_listed_and_cached(routed: openai.OpenAI, fake: FakeUpstream) -> None:
    assert {"smart", "gpt-4o-mini"} <= {m.id for m in routed.models.list()}
    _ask(routed, "cache my cascade")
    again = _ask(routed, "cache my cascade")
    assert again.headers["x-skinflint-cache"] == "hit-exact"
    assert len(fake.calls()) == 2  # both tiers once, then nothing


def test_route_config_is_validated() -> None:
    bad = {"providers": {"p": {"base_url": "http://x"}},
           "routes": {"r": {"rules": [{"task": "nope"}], "tasks": {"default": {"model": "m"}}}}}
    with pytest.raises(ConfigError, match="nope"):
        settings_from_dict(bad, env={})
    bad["routes"]["r"] = {"tasks": {"default": {"cascade": [
        {"model": "a", "gate": {"agree_with": [1]}}, {"model": "b"}]}}}
    with pytest.raises(ConfigError, match="earlier tiers"):
        settings_from_dict(bad, env={})
    bad["routes"]["r"] = {"tasks": {"default": {"model": "a", "cascade": [{"model": "b"}]}}}
    with pytest.raises(ConfigError, match="either model or cascade"):
        settings_from_dict(bad, env={})


def test_logprob_gate(routed: openai.OpenAI, fake: FakeUpstream, tmp_path: Path) -> None:
    task = {"x-skinflint-task": "confident"}
    sure = _ask(routed, "a confident answer", logprobs=True, extra_headers=task)
    assert sure.headers["x-skinflint-route"] == "smart;task=confident;tier=1/2"
    unsure = _ask(routed, "a shaky answer [[logprob=-2.0]]", logprobs=True, extra_headers=task)
    assert unsure.headers["x-skinflint-route"] == "smart;task=confident;tier=2/2"
    rows = ledger_rows(tmp_path / "skinflint.db", expect=3)
    assert [r["error_type"] for r in rows if r["strategy"] == "cascade_escalated"] == ["logprob"]
