"""Compression with a cheap model through the real gateway: a long system prompt is rewritten
once, in the background, and the rewrite is sent from then on; what context and history
trimming leave out is summarised in its place; every such call is one ledger row whose cost
counts, and a rewrite or summary that fails, or is no shorter, changes nothing for the client."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from skinflint.models import COMPRESS_CALL
from tests.conftest import GatewayFactory, ledger_rows
from tests.fake_upstream import FakeUpstream

JSON = dict[str, Any]
CHEAP = "gpt-4o-mini"
REWRITE = "Answer in French. Cite a source for every claim. Never give legal advice."
RULES = [
    "You are the support assistant of a company that sells garden furniture online.",
    "Answer every question in French, whatever language the customer writes in.",
    "Cite a source for every claim you make, preferably the product manual or the FAQ page.",
    "Never give legal advice about warranties, refunds or contracts of any kind.",
    "When a customer is angry, stay calm and polite and offer to escalate to a human agent.",
    "Keep answers under one hundred and fifty words unless the customer asks for details.",
    "Do not mention competitors, their products, their prices or their shipping times.",
    "If you do not know an answer, say so and point the customer to the contact form.",
]
SYSTEM = "\n\n".join(RULES)
FEATURE = {"x-skinflint-feature": "support"}


def _client(gw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0, timeout=10)


def _ask(gw: Any, messages: list[JSON]) -> Any:
    with _client(gw) as client:
        return client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=messages, temperature=0,  # type: ignore[arg-type]
            extra_headers=FEATURE)


def _ask_with_system(gw: Any, question: str, system: str = SYSTEM) -> Any:
    return _ask(gw, [{"role": "system", "content": system},
                     {"role": "user", "content": question}])


def _calls(fake: FakeUpstream, model: str) -> list[JSON]:
    return [r.body for r in fake.calls() if r.body is not None and r.body.get("model") == model]


def _wait(done: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _compress_rows(db: Path, expect: int) -> list[JSON]:
    rows = ledger_rows(db, expect=expect)
    return [r for r in rows if r["strategy"] == COMPRESS_CALL]


def _rewriting(make_gateway: GatewayFactory, **system: Any) -> Any:
    return make_gateway(compression={"features": {"support": {
        "system_prompt": {"rewrite_with": CHEAP, "min_tokens": 50, **system}}}})


def test_a_long_system_prompt_is_rewritten_once_and_the_rewrite_sent_from_then_on(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.answer_as(CHEAP, REWRITE)
    gw = _rewriting(make_gateway)
    with ThreadPoolExecutor(4) as pool:  # four requests meet the unseen prompt at once
        first = list(pool.map(lambda i: _ask_with_system(gw, f"Question {i}?"), range(4)))
    _wait(lambda: len(_calls(fake, CHEAP)) == 1 and len(ledger_rows(tmp_path / "skinflint.db")) >= 5)
    later = [_ask_with_system(gw, f"Later question {i}?") for i in range(3)]

    rewrites = _calls(fake, CHEAP)
    assert len(rewrites) == 1  # one call for seven requests
    assert rewrites[0]["messages"][-1]["content"] == SYSTEM
    sent = [body["messages"][0]["content"] for body in _calls(fake, "gpt-4o")]
    assert sent[-3:] == [REWRITE] * 3
    assert all(s in (SYSTEM, REWRITE) for s in sent[:4])
    assert later[0].headers["x-skinflint-route"] == "gpt-4o;compressed=system_prompt"
    assert first[0].parse().choices[0].message.content == "echo: Question 0?"

    rows = ledger_rows(tmp_path / "skinflint.db", expect=8)
    calls = [r for r in rows if r["strategy"] == COMPRESS_CALL]
    assert len(calls) == 1 and calls[0]["request_id"].endswith(".rewrite")
    assert calls[0]["model"] == CHEAP and calls[0]["feature"] == "support"
    assert calls[0]["cost_usd"] > 0 and calls[0]["input_tokens"] > 50
    requests = [r for r in rows if r["strategy"] != COMPRESS_CALL]
    assert len(requests) == 7
    assert requests[-1]["tokens_saved"] > 50  # the rewrite counts as saved prompt tokens
    metrics = httpx.get(gw.root_url + "/metrics").text
    assert 'skinflint_compress_calls_total{kind="rewrite",outcome="used"} 1.0' in metrics


def test_a_rewrite_no_shorter_than_the_prompt_is_not_used_nor_asked_for_again(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path
) -> None:
    gw = _rewriting(make_gateway)  # the fake echoes the prompt back: longer than it
    _ask_with_system(gw, "First?")
    _wait(lambda: len(_compress_rows(tmp_path / "skinflint.db", 2)) == 1)
    for i in range(3):
        _ask_with_system(gw, f"Then {i}?")
    assert len(_calls(fake, CHEAP)) == 1
    assert [b["messages"][0]["content"] for b in _calls(fake, "gpt-4o")] == [SYSTEM] * 4
    row = _compress_rows(tmp_path / "skinflint.db", 5)[0]
    assert row["status"] == 200 and row["cost_usd"] > 0  # paid for, though not used
    metrics = httpx.get(gw.root_url + "/metrics").text
    assert 'skinflint_compress_calls_total{kind="rewrite",outcome="rejected"} 1.0' in metrics


def test_a_failed_rewrite_is_ledgered_and_leaves_the_prompt_as_it_is(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.answer_as(CHEAP, REWRITE)
    broken = SYSTEM + "\n\n[[fault:status=500]]"  # breaks the call that rewrites it
    gw = _rewriting(make_gateway)
    answer = _ask_with_system(gw, "First?", broken)
    _wait(lambda: len(_compress_rows(tmp_path / "skinflint.db", 2)) == 1)
    again = _ask_with_system(gw, "Second?", broken)
    assert answer.status_code == again.status_code == 200
    assert len(_calls(fake, CHEAP)) == 1  # remembered as failed: not asked again
    assert [b["messages"][0]["content"] for b in _calls(fake, "gpt-4o")] == [broken] * 2
    assert _compress_rows(tmp_path / "skinflint.db", 3)[0]["status"] == 500


def test_a_short_system_prompt_is_not_sent_to_be_rewritten(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.answer_as(CHEAP, REWRITE)
    gw = _rewriting(make_gateway, min_tokens=500)
    for i in range(2):
        _ask_with_system(gw, f"Question {i}?")
    assert _calls(fake, CHEAP) == []
    assert _compress_rows(tmp_path / "skinflint.db", 2) == []


NOTES = [
    "The invoice of March lists twelve oak benches delivered to the Lyon warehouse.",
    "Our cat Whiskers enjoys sleeping on the warm windowsill every afternoon in spring.",
    "The invoice of April lists eight teak tables and their matching oak benches.",
    "Painting the fence took the neighbours three long weekends in a rainy summer.",
    "Bench prices rose by four percent in May because oak became more expensive.",
    "Grandmother's apple pie recipe needs six apples, butter, flour and some cinnamon.",
]
QUESTION = "How many oak benches were on the invoices of March and April?"
DOCUMENT = "\n\n".join([*NOTES, QUESTION])
SUMMARY = "Cat naps, fence painting and a pie recipe."


def _summarizing(make_gateway: GatewayFactory, **extra: Any) -> Any:
    return make_gateway(compression={"features": {"support": {
        "context": {"max_tokens": 60, "summarize_with": CHEAP, "summary_max_tokens": 20,
                    **extra}}}})


def test_the_context_left_out_is_summarised_in_its_place_and_the_call_ledgered(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.answer_as(CHEAP, SUMMARY)
    gw = _summarizing(make_gateway)
    raw = _ask(gw, [{"role": "user", "content": DOCUMENT}])
    summaries = _calls(fake, CHEAP)
    assert len(summaries) == 1
    asked = summaries[0]["messages"][-1]["content"]
    assert NOTES[1] in asked and NOTES[0] not in asked  # what was left out, only
    assert summaries[0]["max_tokens"] == 20
    sent = _calls(fake, "gpt-4o")[0]["messages"][0]["content"]
    assert f"[Summary of omitted text: {SUMMARY}]" in sent
    assert sent.endswith(QUESTION) and NOTES[0] in sent and NOTES[1] not in sent
    assert raw.headers["x-skinflint-route"] == "gpt-4o;compressed=context"
    rows = ledger_rows(tmp_path / "skinflint.db", expect=2)
    call = next(r for r in rows if r["strategy"] == COMPRESS_CALL)
    assert call["request_id"].endswith(".summary.context") and call["cost_usd"] > 0

    _ask(gw, [{"role": "user", "content": DOCUMENT}, {"role": "assistant", "content": "ok"},
              {"role": "user", "content": DOCUMENT}])  # the same text: summary reused
    assert len(_calls(fake, CHEAP)) == 1


def test_a_failed_summary_falls_back_to_plain_trimming(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.answer_as(CHEAP, SUMMARY)
    fake.fail_next("status=503")  # the summary is asked for before the request is sent
    gw = _summarizing(make_gateway)
    raw = _ask(gw, [{"role": "user", "content": DOCUMENT}])
    assert raw.status_code == 200
    sent = _calls(fake, "gpt-4o")[0]["messages"][0]["content"]
    assert "[Summary" not in sent and NOTES[0] in sent and NOTES[1] not in sent
    rows = ledger_rows(tmp_path / "skinflint.db", expect=2)
    assert [r["status"] for r in rows if r["strategy"] == COMPRESS_CALL] == [503]


TURNS = [("Tell me about the oak bench.", "It seats three and weighs forty kilos."),
         ("And the teak table?", "It seats six and folds flat for the winter."),
         ("Which one is cheaper?", "The bench costs less than the table."),
         ("Do you deliver to Lyon?", "Yes, within five working days.")]
HISTORY = [{"role": "system", "content": "You sell garden furniture."},
           *[{"role": r, "content": t} for q, a in TURNS
             for r, t in (("user", q), ("assistant", a))],
           {"role": "user", "content": "Can I pay on delivery?"}]


def test_dropped_turns_are_replaced_by_one_summary_message(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.answer_as(CHEAP, "Bench and table discussed.")
    gw = make_gateway(compression={"features": {"support": {
        "history": {"max_tokens": 60, "summarize_with": CHEAP, "summary_max_tokens": 40}}}})
    _ask(gw, HISTORY)
    summaries = _calls(fake, CHEAP)
    assert len(summaries) == 1 and summaries[0]["max_tokens"] == 40
    asked = summaries[0]["messages"][-1]["content"]
    assert asked.startswith("user: Tell me about the oak bench.\nassistant: It seats three")
    sent = _calls(fake, "gpt-4o")[0]["messages"]
    assert sent[0] == HISTORY[0]
    assert sent[1] == {"role": "system",
                       "content": "[Summary of earlier conversation: Bench and table discussed.]"}
    assert sent[-1] == HISTORY[-1] and len(sent) < len(HISTORY)
    assert TURNS[0][0] not in [m["content"] for m in sent]
    rows = ledger_rows(tmp_path / "skinflint.db", expect=2)
    assert [r["request_id"].rsplit(".", 2)[-2:] for r in rows
            if r["strategy"] == COMPRESS_CALL] == [["summary", "history"]]


def test_a_summary_that_takes_too_long_is_given_up_and_the_turns_just_dropped(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.fail_next("delay=3")
    gw = make_gateway(compression={"features": {"support": {
        "history": {"max_tokens": 60, "summarize_with": CHEAP, "summary_max_tokens": 20,
                    "summary_timeout": 0.3}}}})
    started = time.monotonic()
    raw = _ask(gw, HISTORY)
    assert raw.status_code == 200 and time.monotonic() - started < 2.5
    sent = _calls(fake, "gpt-4o")[0]["messages"]
    assert not any("Summary" in m["content"] for m in sent) and len(sent) < len(HISTORY)
    rows = ledger_rows(tmp_path / "skinflint.db", expect=2)
    assert [r["status"] for r in rows if r["strategy"] == COMPRESS_CALL] == [499]


@pytest.mark.parametrize("compression", [
    {"features": {"support": {"context": {"max_tokens": 60},
                              "history": {"max_tokens": 60}}}},
    {"features": {"other": {"system_prompt": {"rewrite_with": CHEAP, "min_tokens": 10}}}},
])
def test_without_a_model_for_this_feature_no_extra_call_is_made(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path, compression: JSON
) -> None:
    gw = make_gateway(compression=compression)
    _ask_with_system(gw, DOCUMENT)
    _ask(gw, HISTORY)
    time.sleep(0.2)  # a background call would have started by now
    assert [(r.body or {}).get("model") for r in fake.calls()] == ["gpt-4o", "gpt-4o"]
    assert _compress_rows(tmp_path / "skinflint.db", 2) == []


def test_a_summary_counts_in_the_budgets_of_its_request(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path
) -> None:
    """A budget counts what the request's cheap-model calls spent beside it: their cost and
    tokens, not another request."""
    fake.answer_as(CHEAP, SUMMARY)
    gw = make_gateway(
        compression={"features": {"support": {
            "context": {"max_tokens": 60, "summarize_with": CHEAP,
                        "summary_max_tokens": 20}}}},
        budgets=[{"name": "b", "window": "day", "limit": {"usd": 10.0}}])
    raw = _ask(gw, [{"role": "user", "content": DOCUMENT}])
    rows = ledger_rows(tmp_path / "skinflint.db", expect=2)
    call = next(r for r in rows if r["strategy"] == COMPRESS_CALL)
    assert call["cost_usd"] > 0
    spent = next(r for r in httpx.get(f"{gw.root_url}/api/budgets", timeout=5).json()["data"]
                 if r["name"] == "b")["spent"]
    assert spent["usd"] == pytest.approx(float(raw.headers["x-skinflint-cost-usd"])
                                         + call["cost_usd"])
    assert spent["requests"] == 1
    assert spent["tokens"] == sum(r["input_tokens"] + r["output_tokens"] for r in rows)


def test_a_summarised_context_still_fits_max_tokens(
    make_gateway: GatewayFactory, fake: FakeUpstream
) -> None:
    """The context is cut to leave ``summary_max_tokens`` for the summary; a summary that would
    take it past ``max_tokens`` anyway (a model that overran its limit) is not used."""
    from skinflint.tokens import TokenCounter

    tokens = TokenCounter()
    fake.answer_as(CHEAP, SUMMARY)
    gw = _summarizing(make_gateway)
    _ask(gw, [{"role": "user", "content": DOCUMENT}])
    sent = _calls(fake, "gpt-4o")[0]["messages"][0]["content"]
    assert f"[Summary of omitted text: {SUMMARY}]" in sent
    assert tokens.count_text("gpt-4o", sent) <= 60

    fake.answer_as(CHEAP, " ".join([SUMMARY] * 6))  # about 70 tokens: over its 20
    _ask(gw, [{"role": "user", "content": f"{NOTES[2]}\n\n{DOCUMENT}"}])
    sent = _calls(fake, "gpt-4o")[1]["messages"][0]["content"]
    assert "[Summary" not in sent and sent.endswith(QUESTION)
    assert tokens.count_text("gpt-4o", sent) <= 60
