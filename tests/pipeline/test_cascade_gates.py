"""The cascade gate options that decide between several answers, end to end: ``min_votes`` and
``min_votes_for``, ``continue_only_if``, ``accept_alone`` and ``answer_from``.

Each small model is scripted to pick a letter at the fake upstream, so the tiers of a cascade
agree or disagree at will. Every option is checked against a task that differs only by lacking
it, so ignoring the option changes the answer, the model that gave it or the route taken.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import GatewayFactory, ledger_rows
from tests.fake_upstream import FakeUpstream

Raw = Any  # the openai SDK's raw response (with_raw_response), not exported by name

PROMPT = "Which planet is largest? A) Mars B) Jupiter C) Venus D) Earth"
ECHO = f"echo: {PROMPT}"
REFUSAL = "I'm sorry, I cannot help with that."
UNREADABLE = "The answer is B"  # a choice gate reads only a leading letter

PRICED = {"input": 0.1, "output": 0.2}
MODELS: dict[str, Any] = {
    "small-a": {"provider": "fake", "price": PRICED},
    "small-b": {"provider": "fake", "price": PRICED},
    "small-c": {"provider": "fake", "price": PRICED},
    "mid": {"provider": "fake", "price": {"input": 1.0, "output": 2.0}},
    "big": {"provider": "fake", "price": {"input": 10.0, "output": 30.0}},
    "down": {"provider": "down", "price": PRICED},
}
# Nothing listens on port 1: a call of "down" fails at once.
DOWN = {"kind": "openai-compatible", "base_url": "http://127.0.0.1:1/v1", "max_retries": 0,
        "timeout": 5, "connect_timeout": 2}


def _gate(**options: Any) -> dict[str, Any]:
    return {"format": "choice", **options}


def _cascade(*tiers: dict[str, Any]) -> dict[str, Any]:
    return {"cascade": [*tiers, {"model": "big"}]}


THREE = ["small-a", "small-b", "small-c"]
TWO = ["small-a", "small-b"]
TASKS: dict[str, Any] = {
    "votes": _cascade({"models": THREE, "gate": _gate(min_votes=2)}),
    "no-votes": _cascade({"models": THREE, "gate": _gate()}),
    "votes-for": _cascade({"models": THREE, "gate": _gate(min_votes=2, min_votes_for={"A": 3})}),
    "votes-across": _cascade({"model": "small-a", "gate": _gate(min_votes=2)},
                             {"model": "mid", "gate": _gate(min_votes=2)}),
    "earlier-wins": _cascade({"models": TWO, "gate": _gate(min_votes=3)},
                             {"model": "mid", "gate": _gate(min_votes=2)}),
    "continue-if-b": _cascade({"model": "small-a",
                               "gate": _gate(min_votes=2, continue_only_if=["B"])},
                              {"model": "mid", "gate": _gate(min_votes=2)}),
    "continue-always": _cascade({"model": "small-a", "gate": _gate(min_votes=2)},
                                {"model": "mid", "gate": _gate(min_votes=2)}),
    "alone-d": _cascade({"models": TWO, "gate": _gate(min_votes=2, accept_alone=["D"])}),
    "pair-votes": _cascade({"models": TWO, "gate": _gate(min_votes=2)}),
    "accept-b-alone-d": _cascade({"model": "small-a",
                                  "gate": _gate(accept=["B"], accept_alone=["D"])}),
    "accept-b": _cascade({"model": "small-a", "gate": _gate(accept=["B"])}),
    "first-speaks": _cascade({"models": TWO, "answer_from": 0, "gate": _gate(accept=["B"])}),
    "last-speaks": _cascade({"models": TWO, "gate": _gate(accept=["B"])}),
    "middle-speaks": _cascade({"models": THREE, "answer_from": 1, "gate": _gate()}),
    "down-speaks": _cascade({"models": ["small-a", "down"], "answer_from": 1, "gate": _gate()}),
    "down-speaks-last": {"cascade": [
        {"model": "mid", "gate": _gate(accept=["D"])},
        {"models": ["small-a", "down"], "answer_from": 1, "gate": _gate()}]},
}
ROUTES = {"gates": {"baseline": "big", "default_task": "votes", "tasks": TASKS}}


@pytest.fixture
def routed(make_gateway: GatewayFactory, fake: FakeUpstream) -> Iterator[openai.OpenAI]:
    providers = {"fake": {"kind": "openai-compatible", "base_url": fake.base_url,
                          "api_key": "sk-upstream", "max_retries": 0, "timeout": 5},
                 "down": DOWN}
    gateway = make_gateway(providers=providers, models=MODELS, routes=ROUTES)
    with openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0,
                       timeout=10) as client:
        yield client


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "skinflint.db"


def _script(fake: FakeUpstream, **answers: str) -> None:
    """Make each small model (``small_a=...``) or ``mid`` say the given answer."""
    for model, text in answers.items():
        fake.answer_as(model.replace("_", "-"), text)


def _ask(client: openai.OpenAI, task: str) -> Raw:
    return client.chat.completions.with_raw_response.create(
        model="gates", messages=[{"role": "user", "content": PROMPT}],
        extra_headers={"x-skinflint-task": task, "x-skinflint-cache": "bypass"})


def _outcome(raw: Raw) -> tuple[str, str, str | None]:
    """(route header, model that answered, the answer returned)."""
    content = raw.parse().choices[0].message.content
    return raw.headers["x-skinflint-route"], raw.headers["x-skinflint-model"], content


def _route(task: str, tier: int, tiers: int = 2) -> str:
    return f"gates;task={task};tier={tier}/{tiers}"


def _others(db: Path, raw: Raw, rows: int) -> list[tuple[int, str, str]]:
    """The ledger rows of the request's calls whose answer was not returned, as (tier, model,
    why), sorted; checks the request's own row names the model that answered. ``rows`` is the
    number of ledger rows expected so far, all requests of the test together."""
    request_id = raw.headers["x-skinflint-request-id"]
    written = ledger_rows(db, expect=rows)
    own = [r for r in written if r["request_id"] == request_id]
    assert [r["model"] for r in own] == [raw.headers["x-skinflint-model"]]
    others = [r for r in written if r["request_id"].startswith(f"{request_id}.")]
    assert {r["strategy"] for r in others} <= {"cascade_escalated"}
    return sorted((int(r["request_id"].rsplit(".", 1)[1]), r["model"], r["error_type"])
                  for r in others)


def _models_called(fake: FakeUpstream, since: int) -> list[str]:
    return [str((r.body or {}).get("model")) for r in fake.calls()[since:]]


def test_min_votes_accepts_the_answer_enough_calls_agree(
        routed: openai.OpenAI, fake: FakeUpstream, db: Path) -> None:
    _script(fake, small_a="B", small_b="B", small_c="C")
    voted = _ask(routed, "votes")
    # the agreed answer wins over the tier's own (its last call's) and comes from its first giver
    assert _outcome(voted) == (_route("votes", 1), "small-a", "B")
    assert _others(db, voted, rows=3) == [(1, "small-b", "not chosen"),
                                          (1, "small-c", "not chosen")]
    assert _outcome(_ask(routed, "no-votes")) == (_route("no-votes", 1), "small-c", "C")


def test_min_votes_escalates_when_too_few_agree(
        routed: openai.OpenAI, fake: FakeUpstream, db: Path) -> None:
    _script(fake, small_a="A", small_b="B", small_c="C")
    split = _ask(routed, "votes")
    assert _outcome(split) == (_route("votes", 2), "big", ECHO)
    assert _others(db, split, rows=4) == [(1, "small-a", "votes"), (1, "small-b", "votes"),
                                          (1, "small-c", "votes")]
    assert _outcome(_ask(routed, "no-votes")) == (_route("no-votes", 1), "small-c", "C")


def test_votes_count_the_answers_of_earlier_tiers(
        routed: openai.OpenAI, fake: FakeUpstream, db: Path) -> None:
    _script(fake, small_a="B", mid="B")
    agreed = _ask(routed, "votes-across")
    assert _outcome(agreed) == (_route("votes-across", 2, 3), "mid", "B")
    assert _others(db, agreed, rows=2) == [(1, "small-a", "votes")]
    _script(fake, mid="C")
    split = _ask(routed, "votes-across")
    assert _outcome(split) == (_route("votes-across", 3, 3), "big", ECHO)
    assert _others(db, split, rows=5) == [(1, "small-a", "votes"), (2, "mid", "votes")]


def test_an_earlier_tier_can_give_the_most_voted_answer(
        routed: openai.OpenAI, fake: FakeUpstream, db: Path) -> None:
    """Tier 1 agrees on B but needs three votes; tier 2 says C, yet B now has the two it needs:
    the answer is B, from the latest call that gave it."""
    _script(fake, small_a="B", small_b="B", mid="C")
    raw = _ask(routed, "earlier-wins")
    assert _outcome(raw) == (_route("earlier-wins", 2, 3), "small-b", "B")
    assert _others(db, raw, rows=3) == [(1, "small-a", "votes"), (2, "mid", "not chosen")]


def test_min_votes_for_sets_the_votes_one_answer_needs(
        routed: openai.OpenAI, fake: FakeUpstream, db: Path) -> None:
    _script(fake, small_a="A", small_b="A", small_c="B")
    strict = _ask(routed, "votes-for")
    assert _outcome(strict) == (_route("votes-for", 2), "big", ECHO)
    assert _others(db, strict, rows=4) == [(1, "small-a", "votes"), (1, "small-b", "votes"),
                                           (1, "small-c", "votes")]
    assert _outcome(_ask(routed, "votes")) == (_route("votes", 1), "small-a", "A")
    _script(fake, small_a="B", small_b="B", small_c="A")  # other answers keep min_votes
    assert _outcome(_ask(routed, "votes-for")) == (_route("votes-for", 1), "small-a", "B")


def test_continue_only_if_skips_to_the_last_tier(
        routed: openai.OpenAI, fake: FakeUpstream, db: Path) -> None:
    _script(fake, small_a="A", mid="A")
    skipped = _ask(routed, "continue-if-b")
    assert _outcome(skipped) == (_route("continue-if-b", 3, 3), "big", ECHO)
    assert _models_called(fake, 0) == ["small-a", "big"]
    assert _others(db, skipped, rows=2) == [(1, "small-a", "votes")]
    called = len(fake.calls())
    go_on = _ask(routed, "continue-always")
    assert _outcome(go_on) == (_route("continue-always", 2, 3), "mid", "A")
    assert _models_called(fake, called) == ["small-a", "mid"]


def test_continue_only_if_lets_a_listed_answer_continue(
        routed: openai.OpenAI, fake: FakeUpstream, db: Path) -> None:
    _script(fake, small_a="B", mid="B")
    raw = _ask(routed, "continue-if-b")
    assert _outcome(raw) == (_route("continue-if-b", 2, 3), "mid", "B")
    assert _others(db, raw, rows=2) == [(1, "small-a", "votes")]


def test_continue_only_if_skips_after_an_invalid_answer(
        routed: openai.OpenAI, fake: FakeUpstream, db: Path) -> None:
    _script(fake, small_a=REFUSAL, mid="B")
    raw = _ask(routed, "continue-if-b")
    assert _outcome(raw) == (_route("continue-if-b", 3, 3), "big", ECHO)
    assert _models_called(fake, 0) == ["small-a", "big"]
    assert _others(db, raw, rows=2) == [(1, "small-a", "refusal")]


def test_accept_alone_accepts_without_the_votes(
        routed: openai.OpenAI, fake: FakeUpstream, db: Path) -> None:
    _script(fake, small_a="A", small_b="D")
    alone = _ask(routed, "alone-d")
    assert _outcome(alone) == (_route("alone-d", 1), "small-b", "D")
    assert _others(db, alone, rows=2) == [(1, "small-a", "not chosen")]
    voted = _ask(routed, "pair-votes")
    assert _outcome(voted) == (_route("pair-votes", 2), "big", ECHO)
    assert _others(db, voted, rows=5) == [(1, "small-a", "votes"), (1, "small-b", "votes")]


def test_accept_alone_reads_only_the_answer_that_speaks_for_the_tier(
        routed: openai.OpenAI, fake: FakeUpstream, db: Path) -> None:
    _script(fake, small_a="D", small_b="A")  # the tier's own answer is small-b's
    raw = _ask(routed, "alone-d")
    assert _outcome(raw) == (_route("alone-d", 2), "big", ECHO)
    assert _others(db, raw, rows=3) == [(1, "small-a", "votes"), (1, "small-b", "votes")]


def test_accept_alone_overrides_accept(
        routed: openai.OpenAI, fake: FakeUpstream, db: Path) -> None:
    _script(fake, small_a="D")
    assert _outcome(_ask(routed, "accept-b-alone-d")) == (
        _route("accept-b-alone-d", 1), "small-a", "D")
    refused = _ask(routed, "accept-b")
    assert _outcome(refused) == (_route("accept-b", 2), "big", ECHO)
    assert _others(db, refused, rows=3) == [(1, "small-a", "not accepted")]


def test_answer_from_picks_the_call_that_speaks_for_the_tier(
        routed: openai.OpenAI, fake: FakeUpstream, db: Path) -> None:
    _script(fake, small_a="B", small_b="C")
    first = _ask(routed, "first-speaks")
    assert _outcome(first) == (_route("first-speaks", 1), "small-a", "B")
    assert _others(db, first, rows=2) == [(1, "small-b", "not chosen")]
    last = _ask(routed, "last-speaks")  # by default the tier's last call speaks
    assert _outcome(last) == (_route("last-speaks", 2), "big", ECHO)
    assert _others(db, last, rows=5) == [(1, "small-a", "not accepted"),
                                         (1, "small-b", "not accepted")]


def test_answer_from_falls_back_to_the_first_valid_answer(
        routed: openai.OpenAI, fake: FakeUpstream, db: Path) -> None:
    _script(fake, small_a=UNREADABLE, small_b=REFUSAL, small_c="C")
    fallback = _ask(routed, "middle-speaks")
    assert _outcome(fallback) == (_route("middle-speaks", 1), "small-c", "C")
    assert _others(db, fallback, rows=3) == [(1, "small-a", "format"), (1, "small-b", "refusal")]
    _script(fake, small_a="A", small_b="B")
    assert _outcome(_ask(routed, "middle-speaks")) == (_route("middle-speaks", 1), "small-b", "B")


def test_answer_from_falls_back_when_its_call_fails(
        routed: openai.OpenAI, fake: FakeUpstream, db: Path) -> None:
    _script(fake, small_a="B")
    raw = _ask(routed, "down-speaks")
    assert _outcome(raw) == (_route("down-speaks", 1), "small-a", "B")
    assert _models_called(fake, 0) == ["small-a"]
    assert _others(db, raw, rows=2) == [(1, "down", "connection_error")]


def test_a_last_tier_answers_with_a_reply_rather_than_an_error(
        routed: openai.OpenAI, fake: FakeUpstream, db: Path) -> None:
    """No valid answer on the last tier: the first call that replied speaks, not the failed
    call ``answer_from`` names."""
    _script(fake, mid="A", small_a=UNREADABLE)
    raw = _ask(routed, "down-speaks-last")
    assert _outcome(raw) == (_route("down-speaks-last", 2), "small-a", UNREADABLE)
    assert _others(db, raw, rows=3) == [(1, "mid", "not accepted"), (2, "down", "connection_error")]
