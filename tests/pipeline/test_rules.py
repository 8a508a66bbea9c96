"""The rules stage: matching, templates, keywords, filters, tables, order, config errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from skinflint.config import settings_from_dict
from skinflint.errors import ConfigError
from skinflint.metrics import Metrics
from skinflint.models import StreamChunk
from skinflint.pipeline.context import RequestContext
from skinflint.pipeline.rules import Rules, load_table, normalise
from skinflint.tokens import TokenCounter
from tests.pipeline.parts import Recorder, chat, context

TOKENS = TokenCounter()


def _settings(rules: list[dict[str, Any]]) -> Any:
    return settings_from_dict(
        {"providers": {"p": {"base_url": "http://127.0.0.1:1/v1"}}, "rules": rules}, env={})


def _stage(*rules: dict[str, Any], metrics: Metrics | None = None) -> Rules:
    return Rules(_settings(list(rules)).rules, TOKENS, metrics or Metrics())


def _ask(stage: Rules, text: str, **fields: Any) -> tuple[str, str] | None:
    model = fields.pop("model", "m")
    return stage.find(context(chat(text, model=model), **fields))


HOURS = {"name": "hours", "match": r"(?i)\bopening hours\b", "answer": "9:00-17:00."}


def test_a_regex_rule_answers_its_match_and_only_that() -> None:
    stage = _stage(HOURS)
    assert _ask(stage, "What are your Opening Hours?") == ("hours", "9:00-17:00.")
    assert _ask(stage, "when do you open?") is None


def test_templates_fill_numbered_and_named_groups() -> None:
    stage = _stage({"name": "order", "match": r"order #(\d+) for (?P<who>\w+)",
                    "answer": "Order {1} ({0}) belongs to {who}; {{not a field}}."})
    assert _ask(stage, "status of order #42 for ann?") == (
        "order", "Order 42 (order #42 for ann) belongs to ann; {not a field}.")


def test_a_group_that_did_not_take_part_fills_with_nothing() -> None:
    stage = _stage({"name": "r", "match": r"refund( now)?", "answer": "[{1}]"})
    assert _ask(stage, "refund please") == ("r", "[]")


def test_the_client_text_is_copied_never_formatted() -> None:
    stage = _stage({"name": "echo", "match": r"say (.+)", "answer": "You said: {1}"})
    assert _ask(stage, "say {0.__class__} {1!r}") == ("echo", "You said: {0.__class__} {1!r}")


def test_keywords_match_any_whole_word_ignoring_case() -> None:
    stage = _stage({"name": "kw", "keywords": ["refund", "C++", "money back"],
                    "answer": "Refunds: see {0}."})
    assert _ask(stage, "I want a REFUND") == ("kw", "Refunds: see REFUND.")
    assert _ask(stage, "can I get my Money Back?") == ("kw", "Refunds: see Money Back.")
    assert _ask(stage, "do you teach c++?") == ("kw", "Refunds: see c++.")
    assert _ask(stage, "refunds are slow") is None  # not the whole word
    assert _ask(stage, "abc++ or c+") is None


def test_features_and_models_restrict_a_rule() -> None:
    stage = _stage({**HOURS, "features": ["support"], "models": ["gpt-4o-mini"]})
    assert _ask(stage, "opening hours", feature="support", model="gpt-4o-mini") is not None
    assert _ask(stage, "opening hours", feature="sales", model="gpt-4o-mini") is None
    assert _ask(stage, "opening hours", feature="", model="gpt-4o-mini") is None
    assert _ask(stage, "opening hours", feature="support", model="gpt-4o") is None


def test_the_first_matching_rule_wins() -> None:
    stage = _stage({"name": "a", "keywords": ["price"], "answer": "A"},
                   {"name": "b", "match": "price", "answer": "B"},
                   {"name": "c", "match": "cost", "answer": "C"})
    assert _ask(stage, "price and cost?") == ("a", "A")
    assert _ask(stage, "the cost?") == ("c", "C")


def test_only_the_last_user_message_and_only_chat_are_looked_at() -> None:
    stage = _stage(HOURS)
    body = {"model": "m", "messages": [
        {"role": "user", "content": "opening hours?"},
        {"role": "assistant", "content": "9-5"},
        {"role": "user", "content": "thanks"}]}
    assert stage.find(context(body)) is None
    parts = {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "your opening hours"}]}]}
    assert stage.find(context(parts)) == ("hours", "9:00-17:00.")
    embed = {"model": "e", "input": "opening hours"}
    assert stage.find(context(embed, endpoint="embeddings")) is None


def test_tables_match_exact_normalised_questions(tmp_path: Path) -> None:
    faq = tmp_path / "faq.json"
    faq.write_text(json.dumps({"Where is my order?": "Track it at /orders.",
                               "Do you ship abroad?": "Yes."}))
    csv = tmp_path / "faq.csv"
    csv.write_text('question,answer,notes\n"How do I  reset my password?","Use /reset.",x\n')
    stage = _stage({"name": "faq", "table": str(faq)}, {"name": "more", "table": str(csv)})
    assert _ask(stage, "  where IS my\norder? ") == ("faq", "Track it at /orders.")
    assert _ask(stage, "how do i reset my password?") == ("more", "Use /reset.")
    assert _ask(stage, "where is my order") is None  # exact, not similar
    assert normalise("  A\t b\n\nC ") == "a b c"


def test_table_errors_name_the_rule(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('["not", "a", "mapping"]')
    dup = tmp_path / "dup.csv"
    dup.write_text("question,answer\nHi,a\n hi ,b\n")
    cols = tmp_path / "cols.csv"
    cols.write_text("q,a\nHi,a\n")
    cases = [(bad, "object of texts"), (dup, "'hi' is given twice"),
             (cols, "question and answer columns"), (tmp_path / "none.json", "No such file"),
             (tmp_path / "faq.txt", ".json or .csv")]
    for path, why in cases:
        with pytest.raises(ConfigError, match=rf"rules\[1\]\.table: .*{why}"):
            _stage(HOURS, {"name": "t", "table": str(path)})
    with pytest.raises(ValueError, match="not valid JSON"):
        (tmp_path / "broken.json").write_text("{")
        load_table(str(tmp_path / "broken.json"))


@pytest.mark.parametrize(("rules", "error"), [
    ([HOURS, {**HOURS}], r"rules\[1\]\.name: 'hours' is used twice"),
    ([{"name": "x", "match": "(", "answer": "a"}], r"rules\[0\]\.match: regex does not compile"),
    ([{"name": "x", "match": "a", "answer": "{1}"}], r"rules\[0\]: answer: \{1\}: the pattern"),
    ([{"name": "x", "match": "(a)", "answer": "{1.upper}"}], r"rules\[0\]: answer: .*no group"),
    ([{"name": "x", "match": "(a)", "answer": "{1!r}"}], r"rules\[0\]: answer: .*conversion"),
    ([{"name": "x", "match": "(a)", "answer": "{}"}], r"rules\[0\]: answer: .*name the group"),
    ([{"name": "x", "match": "a", "answer": "{"}], r"rules\[0\]: answer: .*literal braces"),
    ([{"name": "x", "match": "a"}], r"rules\[0\]: answer: required with match"),
    ([{"name": "x", "match": "a", "keywords": ["b"], "answer": "c"}], r"rules\[0\]: give exactly"),
    ([{"name": "x", "table": "t.csv", "answer": "c"}], r"rules\[0\]: answer: a table rule"),
    ([{"name": "x", "keywords": [" "], "answer": "c"}], r"rules\[0\]\.keywords: a keyword"),
    ([{"name": "bad name", "match": "a", "answer": "c"}], r"rules\[0\]\.name"),
])
def test_config_errors_name_the_key(rules: list[dict[str, Any]], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        _settings(rules)


def test_no_rules_means_the_stage_is_skipped() -> None:
    assert not Rules((), TOKENS, Metrics()).enabled
    assert not Rules(_settings([]).rules, TOKENS, Metrics()).enabled
    assert settings_from_dict({"rules": None}, env={}).rules == ()
    assert _stage(HOURS).enabled


async def test_a_match_is_answered_without_calling_next() -> None:
    metrics = Metrics()
    stage, nxt = _stage(HOURS, metrics=metrics), Recorder()
    ctx = context(chat("opening hours?", model="gpt-4o-mini"))
    reply = await stage(ctx, nxt)
    assert not nxt.called
    assert ctx.rule is not None and ctx.route_label == "rule;name=hours"
    assert ctx.served_locally and ctx.model == "gpt-4o-mini"
    body = reply.body
    assert body is not None and body["object"] == "chat.completion"
    assert body["model"] == "gpt-4o-mini"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "9:00-17:00."}
    assert ctx.usage is not None and ctx.usage.output_tokens > 0
    assert body["usage"]["prompt_tokens"] == ctx.usage.input_tokens > 0
    assert b'skinflint_rule_answers_total{rule="hours"} 1.0' in metrics.render()


async def test_no_match_passes_the_request_on_untouched() -> None:
    stage, nxt = _stage(HOURS), Recorder()
    ctx = context(chat("hello"))
    await stage(ctx, nxt)
    assert nxt.called and ctx.rule is None and not ctx.served_locally


async def _streamed(stage: Rules, ctx: RequestContext) -> list[StreamChunk]:
    reply = await stage(ctx, Recorder())
    assert reply.chunks is not None and reply.body is None
    return [c async for c in reply.chunks]


async def test_a_streamed_answer_has_a_usage_chunk_only_when_asked() -> None:
    stage = _stage(HOURS)
    plain = await _streamed(stage, context(chat("opening hours"), stream=True))
    text = "".join(c.data["choices"][0]["delta"].get("content") or "" for c in plain)
    assert text == "9:00-17:00."
    assert plain[-1].data["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c.data for c in plain)
    usage = await _streamed(stage, context(chat("opening hours"), stream=True,
                                           client_wants_usage=True))
    assert usage[-1].data["choices"] == [] and usage[-1].data["usage"]["completion_tokens"] > 0
