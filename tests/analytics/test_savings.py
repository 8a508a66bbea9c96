"""Tokens and dollars saved per strategy, from the ledger rows a real gateway wrote: a rule
and a cache hit save their whole call, compression the prompt tokens it removed (at the
baseline's prompt rate), a cascade tier and a shadow call count against the saving."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from skinflint.analytics.report import read_records
from skinflint.analytics.savings import (
    EFFECTS,
    Saved,
    baseline_prompt_usd,
    ledger_savings,
    token_totals,
    tokens_saved,
)
from skinflint.config import settings_from_dict
from skinflint.gateway import price_catalog
from skinflint.models import LedgerRecord, Usage
from skinflint.tokens import TokenCounter
from tests.conftest import GatewayFactory, ledger_rows
from tests.fake_upstream import FakeUpstream

CHOICES = 'A) one\nB) two\nC) three\nD) four\nPrint only "A" or "B" or "C" or "D".\nAnswer:'
EXAMPLES = [f"{q}\n{CHOICES}\n{a}" for q, a in (
    ("Which planet is closest to the Sun?", "A"),
    ("What gas do plants absorb for photosynthesis?", "B"),
    ("Which metal is liquid at room temperature?", "C"),
    ("How do plants turn sunlight into sugar in photosynthesis?", "D"))]
QUESTION = f"Which gas do plants release during photosynthesis?\n{CHOICES}"
PROMPT = "\n\n".join([*EXAMPLES, QUESTION])
ORDER = {"name": "order", "match": r"order #(?P<id>\d+)", "answer": "Order {id} ships today."}


def _by_name(saved: list[Saved]) -> dict[str, Saved]:
    return {s.strategy: s for s in saved}


def test_each_strategy_saves_what_the_rows_say(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path
) -> None:
    gw = make_gateway(rules=[ORDER], baseline_model="gpt-4o",
                      compression={"features": {"quiz": {"few_shot": {"keep": 2}}}})
    messages = [{"role": "user", "content": PROMPT}]
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0, timeout=10) as c:
        for _ in range(2):  # compressed and sent, then an exact hit
            c.chat.completions.create(model="gpt-4o-mini", messages=messages,  # type: ignore[arg-type]
                                      temperature=0, extra_headers={"x-skinflint-feature": "quiz"})
        c.chat.completions.create(model="gpt-4o-mini",
                                  messages=[{"role": "user", "content": "where is order #17?"}])
    db = tmp_path / "skinflint.db"
    ledger_rows(db, expect=3)
    rows = read_records(settings_from_dict({}), db=str(db))
    sent, hit, rule = sorted(rows, key=lambda r: r.ts)
    assert (sent.strategy, hit.cache_status, rule.strategy) == ("", "hit-exact", "rule")

    settings = settings_from_dict({"models": {"gpt-4o": {"provider": "openai"}}}, env={})
    catalog = price_catalog(settings)
    s = _by_name(ledger_savings(rows, baseline_prompt_usd(catalog, "gpt-4o", {})))
    assert set(s) == {"none", "compression", "exact_cache", "rule"}

    counter = TokenCounter()
    removed = (counter.count_messages("gpt-4o-mini", messages)
               - counter.count_messages("gpt-4o-mini", [{"role": "user", "content": "\n\n".join(
                   [EXAMPLES[1], EXAMPLES[3], QUESTION])}]))
    assert sent.tokens_saved == removed > 50
    compression = s["compression"]
    assert (compression.requests, compression.input_tokens, compression.output_tokens) == (
        1, removed, 0)
    assert compression.usd == pytest.approx(catalog.cost("gpt-4o", Usage(input_tokens=removed)))

    none = s["none"]  # routed nowhere: the same tokens; the saving is gpt-4o's price less mini's
    assert (none.requests, none.tokens) == (1, 0)
    assert none.usd == pytest.approx(sent.saved_usd) and none.usd > 0
    for name, row in (("exact_cache", hit), ("rule", rule)):
        assert (s[name].requests, s[name].input_tokens, s[name].output_tokens) == (
            1, row.input_tokens, row.output_tokens)
        assert s[name].input_tokens > 0 and s[name].output_tokens > 0
        assert s[name].usd == pytest.approx(row.saved_usd) and s[name].usd > 0
    assert hit.input_tokens == sent.input_tokens  # a hit saves the call it repeats
    totals = token_totals(rows)
    assert totals["processed"] == sent.input_tokens + sent.output_tokens
    assert totals["saved"] == sum(x.tokens for x in s.values())
    assert totals["baseline"] == totals["processed"] + totals["saved"]


def _row(request_id: str, strategy: str, inp: int, out: int, **kw: float) -> LedgerRecord:
    return LedgerRecord(request_id, 1.0, strategy=strategy, input_tokens=inp,
                        output_tokens=out, **kw)  # type: ignore[arg-type]


def test_tiers_count_against_their_request_and_shadow_calls_against_the_saving() -> None:
    rows = [
        _row("a", "cascade", 100, 10, saved_usd=0.5, cost_usd=0.1),
        _row("a.0", "cascade_escalated", 100, 30, cost_usd=0.05),
        _row("a.1.r1", "retried_attempt", 100, 0),
        _row("b", "route", 80, 20, saved_usd=0.2),
        _row("b.shadow", "shadow", 90, 25, cost_usd=0.03),
    ]
    s = _by_name(ledger_savings(rows))
    assert (s["cascade"].requests, s["cascade"].input_tokens, s["cascade"].output_tokens) == (
        1, -200, -30)
    assert s["cascade"].usd == pytest.approx(0.5)  # the tiers' cost is in the request's saving
    assert (s["route"].tokens, s["route"].usd) == (0, pytest.approx(0.2))
    assert (s["shadow"].requests, s["shadow"].input_tokens, s["shadow"].output_tokens) == (
        1, -90, -25)
    assert s["shadow"].usd == pytest.approx(-0.03)
    assert [x.strategy for x in ledger_savings(rows)] == ["cascade", "route", "shadow"]
    assert token_totals(rows)["saved"] == sum(x.tokens for x in s.values()) == -345


@pytest.mark.parametrize(("strategy", "expected"), [
    ("exact_cache", (300, 40)), ("rule", (300, 40)), ("compression", (25, 0)),
    ("token_budgets", (0, 7)), ("routing", (0, 0)), ("cascade", (0, 0)), ("shadow", (-300, -40)),
])
def test_one_definition_of_tokens_saved(strategy: str, expected: tuple[int, int]) -> None:
    removed_output = 7 if strategy == "token_budgets" else 0
    removed_input = 25 if strategy == "compression" else 0
    assert tokens_saved(strategy, input_tokens=300, output_tokens=40,
                        removed_input=removed_input, removed_output=removed_output) == expected
    assert strategy in EFFECTS


def test_batch_map_rows_save_their_own_tokens_and_model_calls_count_against() -> None:
    rows = [
        _row("p.i0", "batch_map", 30, 5, saved_usd=0.02, tokens_saved=170),
        _row("p.i1", "batch_map", 40, 5, saved_usd=0.01, tokens_saved=160),
        _row("q", "batch", 100, 10, saved_usd=0.04),
        _row("r", "", 500, 10, saved_usd=0.0, tokens_saved=200),
        _row("r.rewrite", "compress_call", 600, 150, cost_usd=0.001),
    ]
    s = _by_name(ledger_savings(rows, prompt_usd=lambda r: 1e-6))
    assert (s["batch_map"].requests, s["batch_map"].input_tokens) == (2, 330)
    assert s["batch_map"].usd == pytest.approx(0.03)
    assert "compression" in s and s["compression"].input_tokens == 200  # r's, not batch_map's
    assert (s["batch"].tokens, s["batch"].usd) == (0, pytest.approx(0.04))
    assert (s["compress_call"].input_tokens, s["compress_call"].output_tokens) == (-600, -150)
    assert s["compress_call"].usd == pytest.approx(-0.001)
    assert token_totals(rows)["saved"] == sum(x.tokens for x in s.values())
