"""Rules end to end: the real gateway answers matching requests itself, in front of the fake
upstream, with the official SDK (or raw HTTP) as the client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from skinflint.server.run import BackgroundServer
from tests.conftest import GatewayFactory, ledger_rows
from tests.fake_upstream import FakeUpstream

HOURS = {"name": "opening-hours", "match": r"(?i)\bopening hours\b",
         "answer": "We are open 9:00-17:00, Monday to Friday.", "features": ["support"]}
ORDER = {"name": "order", "match": r"order #(?P<id>\d+)", "answer": "Order {id} ships today."}
SUPPORT = {"x-skinflint-feature": "support"}


def _client(gw: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0, timeout=10)


def _ask(c: openai.OpenAI, text: str, headers: dict[str, str] | None = None,
         **kw: Any) -> Any:
    return c.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}],
        extra_headers=headers or {}, **kw)


def _upstream_calls(fake: FakeUpstream) -> int:
    return sum(1 for r in fake.requests if r.path.endswith("/chat/completions"))


def test_a_matching_request_is_answered_without_the_upstream(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path,
) -> None:
    gw = make_gateway(rules=[HOURS, ORDER], baseline_model="gpt-4o")
    with _client(gw) as c:
        raw = _ask(c, "What are your opening hours?", SUPPORT)
    done = raw.parse()
    assert done.choices[0].message.content == "We are open 9:00-17:00, Monday to Friday."
    assert done.choices[0].finish_reason == "stop"
    assert done.model == "gpt-4o-mini"
    assert done.usage is not None and done.usage.completion_tokens > 0
    assert _upstream_calls(fake) == 0
    assert raw.headers["x-skinflint-route"] == "rule;name=opening-hours"
    assert raw.headers["x-skinflint-cache"] == "miss"
    assert raw.headers["x-skinflint-model"] == "gpt-4o-mini"
    assert float(raw.headers["x-skinflint-cost-usd"]) == 0
    saved = float(raw.headers["x-skinflint-saved-usd"])
    assert saved > 0
    (row,) = ledger_rows(tmp_path / "skinflint.db", expect=1)
    assert (row["strategy"], row["provider"], row["cost_usd"]) == ("rule", "rule", 0)
    assert row["saved_usd"] == pytest.approx(saved) and row["baseline_cost_usd"] == pytest.approx(
        saved)
    assert row["route"] == "rule;name=opening-hours" and row["feature"] == "support"
    assert row["input_tokens"] == done.usage.prompt_tokens
    assert row["output_tokens"] == done.usage.completion_tokens


def test_a_streamed_answer_ends_with_done_and_usage_only_when_asked(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path,
) -> None:
    gw = make_gateway(rules=[ORDER], baseline_model="gpt-4o")
    with _client(gw) as c:
        plain = list(c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "where is order #17?"}],
            stream=True))
        counted = list(c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "order #18?"}],
            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in plain if ch.choices)
    assert text == "Order 17 ships today."
    assert all(ch.usage is None for ch in plain) and plain[-1].model == "gpt-4o-mini"
    assert counted[-1].usage is not None and counted[-1].usage.completion_tokens > 0
    assert _upstream_calls(fake) == 0
    body = {"model": "gpt-4o-mini", "stream": True,
            "messages": [{"role": "user", "content": "order #19"}]}
    r = httpx.post(f"{gw.base_url}/chat/completions", json=body)
    assert r.text.endswith("data: [DONE]\n\n")
    assert r.headers["x-skinflint-route"] == "rule;name=order"
    assert float(r.headers["x-skinflint-cost-usd"]) == 0  # known before the stream starts
    assert float(r.headers["x-skinflint-saved-usd"]) > 0
    rows = ledger_rows(tmp_path / "skinflint.db", expect=3)
    assert [(x["strategy"], x["cost_usd"]) for x in rows] == [("rule", 0)] * 3
    assert all(x["saved_usd"] > 0 and x["output_tokens"] > 0 for x in rows)


def test_a_request_that_matches_no_rule_goes_upstream(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path,
) -> None:
    gw = make_gateway(rules=[HOURS])
    with _client(gw) as c:
        other_feature = _ask(c, "opening hours?", {"x-skinflint-feature": "sales"})
        no_match = _ask(c, "hello there", SUPPORT)
    assert other_feature.parse().choices[0].message.content == "echo: opening hours?"
    assert no_match.headers["x-skinflint-route"] == "gpt-4o-mini"
    assert _upstream_calls(fake) == 2
    rows = ledger_rows(tmp_path / "skinflint.db", expect=2)
    assert [r["strategy"] for r in rows] == ["", ""] and all(r["cost_usd"] > 0 for r in rows)


def test_a_table_answers_its_exact_questions(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path,
) -> None:
    table = tmp_path / "faq.csv"
    table.write_text("question,answer\nDo you ship abroad?,\"Yes, to 40 countries.\"\n")
    gw = make_gateway(rules=[{"name": "faq", "table": str(table)}])
    with _client(gw) as c:
        hit = _ask(c, "do you  ship ABROAD?")
        miss = _ask(c, "do you ship abroad to Mars?")
    assert hit.parse().choices[0].message.content == "Yes, to 40 countries."
    assert hit.headers["x-skinflint-route"] == "rule;name=faq"
    assert miss.headers["x-skinflint-route"] == "gpt-4o-mini"
    assert _upstream_calls(fake) == 1


def test_a_rule_answer_counts_as_a_request_of_no_cost_in_budgets(
    make_gateway: GatewayFactory,
) -> None:
    gw = make_gateway(rules=[ORDER], budgets=[
        {"name": "b", "window": "day", "limit": {"usd": 1.0, "requests": 5, "tokens": 10_000}}])
    with _client(gw) as c:
        _ask(c, "order #5")
    (row,) = httpx.get(f"{gw.root_url}/api/budgets").json()["data"]
    assert row["spent"] == {"usd": 0, "requests": 1, "tokens": 0}
    assert row["reserved"] == {"usd": 0, "requests": 0, "tokens": 0}


def test_rule_answers_are_counted_per_rule(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(rules=[ORDER])
    with _client(gw) as c:
        _ask(c, "order #1")
        _ask(c, "order #2")
    metrics = httpx.get(f"{gw.root_url}/metrics").text
    assert 'skinflint_rule_answers_total{rule="order"} 2.0' in metrics


def test_embeddings_are_never_answered_by_rules(
    make_gateway: GatewayFactory, fake: FakeUpstream,
) -> None:
    gw = make_gateway(rules=[{"name": "any", "match": ".", "answer": "no"}])
    with _client(gw) as c:
        c.embeddings.create(model="text-embedding-3-small", input="order #1")
    assert any(r.path.endswith("/embeddings") for r in fake.requests)


def test_a_rule_gives_as_many_choices_as_asked_streamed_or_not(
    make_gateway: GatewayFactory, fake: FakeUpstream,
) -> None:
    gw = make_gateway(rules=[HOURS])
    with _client(gw) as c:
        done = _ask(c, "opening hours?", SUPPORT, n=3).parse()
        stream = c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "opening hours?"}],
            extra_headers=SUPPORT, n=2, stream=True)
        streamed: dict[int, str] = {}
        for chunk in stream:
            for choice in chunk.choices:
                streamed[choice.index] = streamed.get(choice.index, "") + (
                    choice.delta.content or "")
    assert [(ch.index, ch.message.content) for ch in done.choices] == [
        (i, HOURS["answer"]) for i in range(3)]
    assert streamed == {0: HOURS["answer"], 1: HOURS["answer"]}
    assert _upstream_calls(fake) == 0


def test_a_request_for_json_or_a_tool_call_is_answered_by_a_rule_only_as_it_asked(
    make_gateway: GatewayFactory, fake: FakeUpstream,
) -> None:
    as_json = {"name": "hours-json", "match": r"(?i)\bhours as json\b",
               "answer": '{{"open": "9:00", "close": "17:00"}}'}  # braces doubled: a template
    gw = make_gateway(rules=[HOURS, as_json])
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    with _client(gw) as c:
        text = _ask(c, "opening hours?", SUPPORT, response_format={"type": "json_object"})
        json_answer = _ask(c, "hours as json", SUPPORT, response_format={"type": "json_object"})
        tool_needed = _ask(c, "opening hours?", SUPPORT, tools=[tool], tool_choice="required")
        tool_allowed = _ask(c, "opening hours?", SUPPORT, tools=[tool])
    assert text.headers["x-skinflint-route"] == "gpt-4o-mini"  # not JSON: asked upstream
    assert json_answer.headers["x-skinflint-route"] == "rule;name=hours-json"
    assert json_answer.parse().choices[0].message.content == '{"open": "9:00", "close": "17:00"}'
    assert tool_needed.headers["x-skinflint-route"] == "gpt-4o-mini"
    assert tool_allowed.headers["x-skinflint-route"] == "rule;name=opening-hours"
    assert _upstream_calls(fake) == 2
