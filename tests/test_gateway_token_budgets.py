"""Token budgets end to end: the gateway caps what the provider is asked for, appends the
brevity instruction, counts answers cut short, and keeps capped answers apart in the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory, ledger_rows
from tests.fake_upstream import FakeUpstream

BREVITY = "Answer in at most five bullet points."
BUDGETS: dict[str, Any] = {
    "features": {"summarize": {"max_tokens": 150, "brevity": BREVITY},
                 "tiny": {"max_tokens": 3}},
    "tasks": {"code": {"max_tokens": 64}},
}
ROUTES: dict[str, Any] = {
    "auto": {"default_task": "chat",
             "tasks": {"code": {"model": "gpt-4o-mini"}, "chat": {"model": "gpt-4o-mini"},
                       "tiered": {"cascade": [{"model": "gpt-4o-mini"}, {"model": "gpt-4o"}]}}},
}


@pytest.fixture
def client(make_gateway: GatewayFactory) -> openai.OpenAI:
    gw = make_gateway(token_budgets=BUDGETS, routes=ROUTES)
    return openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0, timeout=10)


def _ask(c: openai.OpenAI, text: str, feature: str = "", model: str = "gpt-4o-mini",
         task: str = "", **kw: Any) -> Any:
    headers = {"x-skinflint-feature": feature} if feature else {}
    if task:
        headers["x-skinflint-task"] = task
    return c.chat.completions.with_raw_response.create(
        model=model, temperature=0, messages=[{"role": "user", "content": text}],
        extra_headers=headers, **kw)


def _sent(fake: FakeUpstream) -> dict[str, Any]:
    body = fake.calls()[-1].body
    assert body is not None
    return body


def test_the_provider_is_asked_for_the_cap_with_the_brevity_instruction(
    client: openai.OpenAI, fake: FakeUpstream
) -> None:
    raw = _ask(client, "summarise this", "summarize")
    sent = _sent(fake)
    assert sent["max_tokens"] == 150 and "max_completion_tokens" not in sent
    assert sent["messages"] == [{"role": "system", "content": BREVITY},
                                {"role": "user", "content": "summarise this"}]
    assert raw.headers["x-skinflint-route"] == "gpt-4o-mini;cap=150"
    raw = _ask(client, "summarise that", "summarize", max_tokens=20)
    assert _sent(fake)["max_tokens"] == 20  # the client's smaller limit stands
    assert raw.headers["x-skinflint-route"] == "gpt-4o-mini"
    _ask(client, "summarise it", "summarize", max_completion_tokens=900, model="o3-mini")
    sent = _sent(fake)
    assert sent["max_completion_tokens"] == 150 and "max_tokens" not in sent
    _ask(client, "no budget here", "other")
    assert "max_tokens" not in _sent(fake) and len(_sent(fake)["messages"]) == 1


def test_the_task_a_route_chose_has_its_own_cap(client: openai.OpenAI, fake: FakeUpstream) -> None:
    raw = _ask(client, "write it", "summarize", model="auto", task="code")
    assert _sent(fake)["max_tokens"] == 64
    assert raw.headers["x-skinflint-route"] == "auto;task=code;cap=64"
    _ask(client, "chat with me", "summarize", model="auto")
    assert _sent(fake)["max_tokens"] == 150
    raw = _ask(client, "tiers", "summarize", model="auto", task="tiered")
    assert _sent(fake)["max_tokens"] == 150  # each tier's call
    assert raw.headers["x-skinflint-route"] == "auto;task=tiered;tier=1/2;cap=150"


def test_answers_cut_short_are_counted_per_feature(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path
) -> None:
    gw = make_gateway(token_budgets=BUDGETS, routes=ROUTES)
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as c:
        cut = _ask(c, "one two three four five six", "tiny").parse()
        assert cut.choices[0].finish_reason == "length"
        assert cut.choices[0].message.content == "echo: one two"
        assert _ask(c, "cut [[fault:length]] please", "unknown-x").parse(
        ).choices[0].finish_reason == "length"
        assert _ask(c, "whole", "tiny").parse().choices[0].finish_reason == "stop"
        stream = c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "a b c d e f"}],
            stream=True, extra_headers={"x-skinflint-feature": "tiny"})
        assert [ch.choices[0].finish_reason for ch in stream if ch.choices][-1] == "length"
    text = httpx.get(gw.root_url + "/metrics").text
    series = sorted(line for line in text.splitlines()
                    if line.startswith("skinflint_truncated_answers_total"))
    assert series == ['skinflint_truncated_answers_total{feature="other"} 1.0',
                      'skinflint_truncated_answers_total{feature="tiny"} 2.0']
    rows = ledger_rows(tmp_path / "skinflint.db", expect=4)
    assert [(r["feature"], r["truncated"]) for r in rows] == [
        ("tiny", 1), ("unknown-x", 1), ("tiny", 0), ("tiny", 1)]


def test_cached_answers_are_kept_apart_by_cap(client: openai.OpenAI, fake: FakeUpstream) -> None:
    first = _ask(client, "the same question", "summarize")
    assert first.headers["x-skinflint-cache"] == "miss"
    # the same body under another cap (none): not the capped answer
    other = _ask(client, "the same question", "other")
    assert other.headers["x-skinflint-cache"] == "miss"
    assert "max_tokens" not in _sent(fake)
    again = _ask(client, "the same question", "summarize")
    assert again.headers["x-skinflint-cache"] == "hit-exact"
    assert len(fake.calls()) == 2
