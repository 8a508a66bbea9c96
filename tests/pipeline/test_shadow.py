"""The shadow-evaluation guard: its scores and its test (the first check at min_samples and the
bet against the floor), switching a strategy off on a degrading series (and not on a healthy
one, nor after a long good history), the operator's re-enable, the switch and the samples kept
in the alert store (so processes sharing it decide together, and a restart goes on where the
test was), sampling, and the bound on calls in flight."""

from __future__ import annotations

import asyncio
import math
import random
from pathlib import Path
from typing import Any

import pytest

from skinflint.config import CacheConfig, ShadowPolicy
from skinflint.errors import UpstreamStatusError
from skinflint.metrics import Metrics
from skinflint.models import SHADOW_CALL, Completion, UpstreamRequest, is_attempt
from skinflint.pipeline.account import Account
from skinflint.pipeline.cache import ResponseCache
from skinflint.pipeline.context import Compression, Reply, RequestContext, Target
from skinflint.pipeline.shadow import ALERT_RULE, ProviderUpstream, ShadowGuard
from skinflint.pipeline.shadow_score import (
    DELTA,
    WINDOW,
    Window,
    bet,
    exact_score,
    first_check,
    is_structured,
    kl,
    word_cosine,
)
from skinflint.pricing import PriceCatalog
from skinflint.storage.alert_store import SQLiteAlertStore
from skinflint.storage.cache import MemoryCacheStore
from skinflint.storage.ledger import MemoryLedger
from skinflint.tokens import TokenCounter
from tests.pipeline.parts import Scripted, answer, chat, context

PRICES: dict[str, tuple[float, float | None, float | None]] = {
    "small": (1.0, 2.0, None), "judge": (0.1, 0.2, None)}
SMALL = Target("small", "p", "s-1")
JUDGE = Target("judge", "j", "j-1")
ORIGINAL = chat("Summarise the whole long document about the harbour", model="small")
RIGHT = "The harbour opened in 1850 and handles grain and timber today"
WRONG = "The document is about a harbour"


class Upstream(Scripted):
    """A provider answering every call with ``text`` (changeable), or waiting for ``gate``."""

    def __init__(self, name: str, text: str = RIGHT) -> None:
        super().__init__(name)
        self.text = text
        self.gate: asyncio.Event | None = None
        self.failure: Exception | None = None
        self.body: dict[str, Any] | None = None  # answered instead of ``text``, when set

    async def complete(self, request: UpstreamRequest) -> Completion:
        self.requests.append(request)
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        if self.body is not None:
            return Completion(self.body)
        return Completion(answer(self.text, model=request.provider_model, usage=(100, 20)))


class Rig:
    """A guard over an answering provider and a judge, an in-memory ledger and, when given a
    path, the alert table in a SQLite file."""

    def __init__(self, policy: ShadowPolicy | None, *, alerts: SQLiteAlertStore | None = None,
                 sampler: Any = None, max_in_flight: int = 4,
                 sync_seconds: float = 2.0) -> None:
        self.provider, self.judge = Upstream("p"), Upstream("j", "YES")
        self.ledger, self.metrics = MemoryLedger(), Metrics()
        targets = {"judge": JUDGE, "small": SMALL}
        upstream = ProviderUpstream({"p": self.provider, "j": self.judge}, {"p": 5.0},
                                    lambda name: (targets[name],))
        self.guard = ShadowGuard(lambda feature, route: policy if feature == "docs" else None,
                                 upstream, ledger=self.ledger, catalog=PriceCatalog(PRICES),
                                 metrics=self.metrics, alerts=alerts,
                                 sampler=sampler or (lambda: 0.0), max_in_flight=max_in_flight,
                                 sync_seconds=sync_seconds)

    async def serve(self, answered: str, *, feature: str = "docs",
                    strategies: tuple[str, ...] = ("context",)) -> RequestContext:
        """One compressed request answered ``answered``, shown to the guard, which is waited
        for."""
        compressed = chat("Summarise the document", model="small")
        ctx = context(compressed, feature=feature, answered=SMALL,
                      compression=Compression(strategies, 12, ORIGINAL))
        self.guard.observe(ctx, answer(answered, model="s-1"))
        await self.guard.drain()
        return ctx

    def calls(self, outcome: str) -> float:
        found = self.metrics.registry.get_sample_value("skinflint_shadow_calls_total",
                                                       {"outcome": outcome})
        return found or 0.0


def _policy(**fields: Any) -> ShadowPolicy:
    return ShadowPolicy(**{"sample": 1.0, "floor": 0.9, "judge": "exact",
                           "min_samples": 20, **fields})


# ---- scores and the test


def test_the_first_check_is_hoeffdings_chernoff_bound_at_its_level() -> None:
    assert kl(0.0, 0.9) == pytest.approx(math.log(10))
    assert kl(0.9, 0.9) == 0.0 and kl(0.5, 1.0) == math.inf
    # 20 samples at the floor 0.9, level 2%: 20 KL(m || 0.9) >= ln 50 for m <= 13/20
    assert first_check(13 / 20, 20, 0.9) and not first_check(14 / 20, 20, 0.9)
    assert first_check(14 / 20, 20, 0.9, delta=0.05)
    assert not first_check(0.95, 100, 0.9) and not first_check(0.0, 0, 0.9)
    assert first_check(0.99, 1, 1.0)  # a single miss disproves a floor of 1


def test_the_bet_is_kelly_against_the_estimate_and_capped() -> None:
    assert bet(0.9, 0.9) == 0.0 and bet(0.97, 0.9) == 0.0  # nothing while at the floor
    assert bet(0.8, 0.9) == pytest.approx(0.1 / 0.09)
    assert bet(0.0, 0.9) == pytest.approx(5.0)  # capped: a score of 1 loses half the wealth
    assert bet(0.5, 0.0) == 0.0


def test_a_window_keeps_the_newest_scores_and_bets_before_counting() -> None:
    window = Window()
    for _ in range(WINDOW):
        window.add(1.0, 0.9)
    assert window.wealth == 1.0  # a good history bets nothing
    for _ in range(WINDOW):
        window.add(0.0, 0.9)
    for _ in range(WINDOW // 2):
        window.add(1.0, 0.9)
    assert window.samples == WINDOW and window.seen == 2 * WINDOW + WINDOW // 2
    assert window.mean == pytest.approx(0.5)
    fresh = Window()
    fresh.add(0.0, 0.9)  # the first score is bet on from the floor alone: nothing
    assert fresh.wealth == 1.0
    fresh.add(0.0, 0.9)  # estimate (10 * 0.9 + 0) / 11: bet 0.909 on the next score
    assert fresh.wealth == pytest.approx(1 + (0.9 - 9 / 11) / 0.09 * 0.9)
    window.clear()
    assert (window.samples, window.seen, window.wealth, window.mean) == (0, 0, 1.0, 1.0)


def _window(agreements: list[float], floor: float = 0.9, min_samples: int = 20,
            window: Window | None = None) -> int | None:
    """The sample after which a window fed ``agreements`` says the strategy is below
    ``floor`` (None: never)."""
    window = Window() if window is None else window
    for i, score in enumerate(agreements, 1):
        window.add(score, floor)
        if window.below(floor, min_samples) is not None:
            return i
    return None


def test_a_moderate_drop_is_caught_at_min_samples() -> None:
    # 13 agreements in 20 (mean 0.65): the first check switches it off at the 20th sample;
    # Hoeffding's upper bound on 20 samples (0.65 + 0.39) would not, nor would 14 in 20
    series = [0.0 if i % 3 == 1 else 1.0 for i in range(20)]
    assert sum(series) == 13 and _window(series) == 20
    series[1] = 1.0
    assert _window(series) is None


def test_strategies_at_a_margin_above_the_floor_stay_on_over_many_samples() -> None:
    rng = random.Random(11)
    for _ in range(20):  # 20 strategies at 0.95, 3,000 samples each
        assert _window([float(rng.random() < 0.95) for _ in range(3000)]) is None


def test_a_drop_after_a_long_good_history_is_caught() -> None:
    rng = random.Random(5)
    for _ in range(10):
        good = [float(rng.random() < 0.97) for _ in range(2000)]
        bad = [float(rng.random() < 0.7) for _ in range(400)]
        window = Window()
        off = _window(good + bad, window=window)
        assert off is not None and 2000 < off <= 2000 + 200
        assert window.wealth >= 1 / DELTA  # the bet, long after the first check


def test_min_samples_beyond_the_window_still_decides() -> None:
    assert _window([0.0] * 400, min_samples=300) == 300
    window = Window()
    _window([0.0] * 1000, min_samples=2000, window=window)
    assert math.isfinite(window.wealth) and window.wealth >= 1 / DELTA


def test_exact_sets_aside_case_spacing_and_key_order() -> None:
    assert exact_score("Paris.", "  paris ") == 1.0
    assert exact_score('{"a": 1, "b": [2]}', '{"b":[2],"a":1}') == 1.0
    assert exact_score('{"a": 1}', '{"a": 2}') == 0.0
    assert exact_score("Paris", "Lyon") == 0.0
    assert is_structured("Yes, it is.") and is_structured('{"k": "a b c d e f g"}')
    assert not is_structured(RIGHT)


def test_word_cosine_sees_shared_words() -> None:
    assert word_cosine(RIGHT, RIGHT.upper()) == pytest.approx(1.0)
    assert 0.0 < word_cosine(RIGHT, WRONG) < 0.5
    assert word_cosine("alpha beta gamma delta epsilon zeta", "one two three four five six") == 0.0


# ---- switching off and on


async def test_a_degrading_strategy_is_switched_off_at_min_samples(tmp_path: Path) -> None:
    store = await SQLiteAlertStore.create(str(tmp_path / "ledger.db"))
    rig = Rig(_policy(), alerts=store)
    for _ in range(19):
        await rig.serve(WRONG)
    assert rig.guard.enabled("docs", "context")
    await rig.serve(WRONG)
    assert not rig.guard.enabled("docs", "context")
    assert rig.guard.enabled("docs", "history") and rig.guard.enabled("quiz", "context")
    assert rig.metrics.registry.get_sample_value("skinflint_shadow_switched_off") == 1
    [event] = await store.recent(10)
    assert (event.rule, event.per, event.name, event.end) == (
        ALERT_RULE, "feature", "docs/context", None)
    [row] = rig.guard.rows()
    assert row == {"feature": "docs", "strategy": "context", "samples": 20, "mean": 0.0,
                   "bound": 2.742e12, "floor": 0.9, "state": "off"}  # the evidence
    await store.close()


async def test_a_moderate_drop_is_switched_off_at_min_samples_by_the_guard() -> None:
    rig = Rig(_policy())
    for i in range(20):  # 13 answers in 20 agree
        assert rig.guard.enabled("docs", "context")
        await rig.serve(WRONG if i % 3 == 1 else RIGHT)
    assert not rig.guard.enabled("docs", "context")
    [row] = rig.guard.rows()
    assert (row["samples"], row["mean"], row["state"]) == (20, 0.65, "off")


async def test_the_uncompressed_request_goes_to_the_answering_model_and_is_ledgered() -> None:
    rig = Rig(_policy())
    ctx = await rig.serve(RIGHT)
    [request] = rig.provider.requests
    assert request.provider_model == "s-1"
    assert request.body == {**ORIGINAL, "model": "s-1", "stream": False}
    [row] = rig.ledger.records
    assert row.strategy == SHADOW_CALL and is_attempt(row.strategy)
    assert row.request_id == ctx.request_id + ".shadow"
    assert (row.feature, row.model, row.provider) == ("docs", "s-1", "p")
    assert (row.input_tokens, row.output_tokens) == (100, 20)
    assert row.cost_usd == pytest.approx((100 * 1.0 + 20 * 2.0) / 1e6)
    assert row.similarity == 1.0  # the pair's score
    assert rig.calls("scored") == 1


async def test_a_failed_shadow_call_is_ledgered_and_scores_nothing() -> None:
    rig = Rig(_policy())
    rig.provider.failure = UpstreamStatusError(503, "overloaded", provider="p")
    await rig.serve(WRONG)
    [row] = rig.ledger.records
    assert (row.strategy, row.status, row.cost_usd, row.similarity) == (
        SHADOW_CALL, 503, None, None)
    assert rig.calls("failed") == 1 and rig.guard.rows() == []


async def test_a_healthy_strategy_stays_on() -> None:
    rig = Rig(_policy(judge="similarity"))
    for i in range(100):  # nine answers in ten agree, the tenth misses: a mean about 0.93
        await rig.serve(WRONG if i % 10 == 0 else RIGHT)
    assert rig.guard.enabled("docs", "context")
    [row] = rig.guard.rows()
    assert row["samples"] == 100 and 0.9 < row["mean"] < 0.95 and row["state"] == "on"


async def test_every_strategy_of_the_request_is_scored() -> None:
    rig = Rig(_policy(min_samples=2))
    for _ in range(2):
        await rig.serve(WRONG, strategies=("context", "history"))
    assert not rig.guard.enabled("docs", "context")
    assert not rig.guard.enabled("docs", "history")


async def _switched_off(tmp_path: Path) -> tuple[SQLiteAlertStore, Rig]:
    """A guard on a SQLite alert store that switched context off at its third sample."""
    store = await SQLiteAlertStore.create(str(tmp_path / "ledger.db"))
    rig = Rig(_policy(min_samples=3), alerts=store)
    for _ in range(3):
        await rig.serve(WRONG)
    assert not rig.guard.enabled("docs", "context")
    return store, rig


async def test_an_operator_switches_it_back_on_with_a_fresh_window(tmp_path: Path) -> None:
    store, rig = await _switched_off(tmp_path)
    assert await rig.guard.enable("docs", "context")
    assert rig.guard.enabled("docs", "context")
    assert rig.metrics.registry.get_sample_value("skinflint_shadow_switched_off") == 0
    assert not await rig.guard.enable("docs", "context")  # it was on
    assert await store.active() == {}
    [event] = await store.recent(10)
    assert event.state == "resolved"
    await rig.serve(WRONG)  # one more bad sample does not switch it off at once
    assert rig.guard.enabled("docs", "context")
    assert rig.guard.rows()[0]["samples"] == 1
    assert rig.guard.rows()[0]["bound"] == 1.0  # a fresh test: no evidence yet
    for _ in range(2):
        await rig.serve(WRONG)
    assert not rig.guard.enabled("docs", "context")  # its first check again, at 3
    await store.close()


async def test_the_switch_survives_a_restart(tmp_path: Path) -> None:
    store = await SQLiteAlertStore.create(str(tmp_path / "ledger.db"))
    first = Rig(_policy(min_samples=2), alerts=store)
    for _ in range(2):
        await first.serve(WRONG)
    second = Rig(_policy(min_samples=2), alerts=store)
    assert second.guard.enabled("docs", "context")
    await second.guard.restore()
    assert not second.guard.enabled("docs", "context")
    assert second.metrics.registry.get_sample_value("skinflint_shadow_switched_off") == 1
    assert second.guard.rows()[0]["state"] == "off"
    assert await second.guard.enable("docs", "context")
    third = Rig(_policy(min_samples=2), alerts=store)
    await third.guard.restore()
    assert third.guard.enabled("docs", "context")
    await store.close()


async def test_a_restart_goes_on_with_the_test_where_it_was(tmp_path: Path) -> None:
    store = await SQLiteAlertStore.create(str(tmp_path / "ledger.db"))
    first = Rig(_policy(min_samples=3), alerts=store)
    for _ in range(2):
        await first.serve(WRONG, strategies=("context", "history"))
    await first.serve(WRONG)  # context is off: its third sample
    assert not first.guard.enabled("docs", "context")
    assert first.guard.enabled("docs", "history")  # two samples: too early to say
    second = Rig(_policy(min_samples=3), alerts=store)
    await second.guard.restore()
    assert not second.guard.enabled("docs", "context")
    assert [(r["strategy"], r["samples"], r["bound"], r["state"])
            for r in second.guard.rows()] == [
        (row["strategy"], row["samples"], row["bound"], row["state"])
        for row in first.guard.rows()]
    assert [r["samples"] for r in second.guard.rows()] == [3, 2]
    await second.serve(WRONG, strategies=("history",))  # its third since the first start
    assert not second.guard.enabled("docs", "history")
    assert {(e.name, e.end) for e in await store.recent(10)} == {
        ("docs/context", None), ("docs/history", None)}
    await store.close()


async def test_a_restart_after_a_re_enable_replays_only_the_fresh_test(tmp_path: Path) -> None:
    store, first = await _switched_off(tmp_path)
    assert await first.guard.enable("docs", "context")
    await first.serve(RIGHT)
    second = Rig(_policy(min_samples=3), alerts=store)
    await second.guard.restore()
    assert second.guard.enabled("docs", "context")  # the bad samples before the mark: gone
    assert [(r["samples"], r["mean"]) for r in second.guard.rows()] == [(1, 1.0)]
    assert await store.active() == {}
    await store.close()


async def test_processes_sharing_a_store_decide_on_all_their_samples(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.db")
    one, two = await SQLiteAlertStore.create(path), await SQLiteAlertStore.create(path)
    a = Rig(_policy(min_samples=4), alerts=one)
    b = Rig(_policy(min_samples=4), alerts=two)
    for rig in (a, b):
        await rig.guard.restore()
    for rig in (a, b, a):
        await rig.serve(WRONG)
    assert a.guard.enabled("docs", "context") and b.guard.enabled("docs", "context")
    await b.serve(WRONG)  # the fourth sample, the second of this process: the first check
    assert not b.guard.enabled("docs", "context")
    assert a.guard.enabled("docs", "context")  # until it reads the store
    await a.guard.sync()
    assert not a.guard.enabled("docs", "context")
    assert [r["samples"] for r in a.guard.rows()] == [4]
    assert [e.name for e in await one.recent(10)] == ["docs/context"]  # recorded once
    assert await a.guard.enable("docs", "context")  # an operator, through the other process
    assert not b.guard.enabled("docs", "context")
    await b.guard.sync()
    assert b.guard.enabled("docs", "context")
    assert [(r["samples"], r["bound"]) for r in b.guard.rows()] == [(0, 1.0)]  # afresh
    for store in (one, two):
        await store.close()


async def test_a_process_follows_the_store_on_its_own(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.db")
    one, two = await SQLiteAlertStore.create(path), await SQLiteAlertStore.create(path)
    a = Rig(_policy(min_samples=2), alerts=one)
    b = Rig(_policy(min_samples=2), alerts=two, sync_seconds=0.01)
    b.guard.start()
    for _ in range(2):
        await a.serve(WRONG)
    assert not a.guard.enabled("docs", "context")
    for _ in range(500):
        if not b.guard.enabled("docs", "context"):
            break
        await asyncio.sleep(0.01)
    assert not b.guard.enabled("docs", "context")
    await b.guard.close()
    for store in (one, two):
        await store.close()


async def test_a_sample_the_store_does_not_take_is_lost_and_counted(tmp_path: Path) -> None:
    store = await SQLiteAlertStore.create(str(tmp_path / "ledger.db"))
    rig = Rig(_policy(min_samples=1), alerts=store)
    await store.close()  # every statement now fails
    await rig.serve(WRONG)
    assert rig.guard.enabled("docs", "context")
    assert rig.calls("failed") == 1 and rig.calls("scored") == 1


async def test_an_answer_of_an_unexpected_shape_is_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(_policy())
    rig.provider.body = {"choices": ["not an object"]}
    await rig.serve(RIGHT)
    assert rig.calls("failed") == 1 and rig.guard.rows() == []
    assert "shadow evaluation of r failed" in caplog.text


# ---- judges


async def test_a_judge_model_decides_and_its_call_is_ledgered() -> None:
    rig = Rig(_policy(judge="judge", min_samples=2))
    rig.judge.text = "NO, they differ."
    for _ in range(2):
        ctx = await rig.serve(WRONG)
    assert not rig.guard.enabled("docs", "context")
    verdict = rig.judge.requests[0]
    assert verdict.provider_model == "j-1" and verdict.body["max_tokens"] == 3
    assert RIGHT in verdict.body["messages"][1]["content"]
    rows = [r for r in rig.ledger.records if r.request_id == ctx.request_id + ".shadow.judge"]
    assert len(rows) == 2 and all(r.strategy == SHADOW_CALL for r in rows)
    assert rows[0].cost_usd == pytest.approx((100 * 0.1 + 20 * 0.2) / 1e6)


async def test_a_judge_saying_yes_keeps_it_on_and_is_not_asked_about_equal_answers() -> None:
    rig = Rig(_policy(judge="judge", min_samples=2))
    for _ in range(3):
        await rig.serve(WRONG)
    await rig.serve(RIGHT)
    assert rig.guard.enabled("docs", "context")
    assert len(rig.judge.requests) == 3


async def test_similarity_uses_the_embedder_when_it_has_one() -> None:
    rig = Rig(_policy(judge="similarity", min_samples=2))
    vectors = {RIGHT: [1.0, 0.0], WRONG: [0.0, 1.0]}

    async def vector(text: str) -> Any:
        return vectors[text]

    rig.guard._vector = vector
    for _ in range(2):
        await rig.serve(WRONG)
    assert not rig.guard.enabled("docs", "context")


# ---- sampling and the bound on calls


async def test_only_the_configured_share_is_shadowed() -> None:
    rig = Rig(_policy(sample=0.25), sampler=random.Random(7).random)
    for _ in range(400):
        await rig.serve(RIGHT)
    assert 70 <= len(rig.provider.requests) <= 130
    assert len(rig.ledger.records) == len(rig.provider.requests)


async def test_requests_not_compressed_or_not_configured_are_not_shadowed() -> None:
    rig = Rig(_policy())
    await rig.serve(RIGHT, feature="quiz")  # no shadow policy
    plain = context(chat(), feature="docs", answered=SMALL)
    rig.guard.observe(plain, answer(RIGHT))
    failed = context(chat(), feature="docs", answered=SMALL, status=502,
                     compression=Compression(("context",), 3, ORIGINAL))
    rig.guard.observe(failed, answer(RIGHT))
    await rig.guard.drain()
    assert rig.provider.requests == []


async def test_calls_in_flight_are_bounded_and_the_rest_dropped() -> None:
    rig = Rig(_policy(), max_in_flight=4)
    rig.provider.gate = asyncio.Event()
    for _ in range(10):  # observe never waits, even with every call stuck
        ctx = context(chat(), feature="docs", answered=SMALL,
                      compression=Compression(("context",), 3, ORIGINAL))
        rig.guard.observe(ctx, answer(RIGHT))
    await asyncio.sleep(0)
    assert len(rig.provider.requests) == 4
    assert rig.guard.dropped == 6 and rig.calls("dropped") == 6
    rig.provider.gate.set()
    await rig.guard.drain()
    assert rig.calls("scored") == 4


async def test_closing_abandons_calls_under_way() -> None:
    rig = Rig(_policy())
    rig.provider.gate = asyncio.Event()
    ctx = context(chat(), feature="docs", answered=SMALL,
                  compression=Compression(("context",), 3, ORIGINAL))
    rig.guard.observe(ctx, answer(RIGHT))
    await asyncio.sleep(0)
    await rig.guard.close()
    assert rig.calls("scored") == 0


# ---- the account stage shows it compressed answers


async def test_the_account_stage_shows_the_guard_each_compressed_answer() -> None:
    rig = Rig(_policy())
    metrics = Metrics()
    account = Account(catalog=PriceCatalog(PRICES), tokens=TokenCounter(), ledger=MemoryLedger(),
                      metrics=metrics, cache=ResponseCache(CacheConfig(), MemoryCacheStore(),
                                                           metrics),
                      shadow=rig.guard)

    async def answered(ctx: RequestContext) -> Reply:
        ctx.answered = SMALL
        return Reply(body=answer(WRONG, model="s-1"))

    compressed = context(chat(model="small"), feature="docs", targets=(SMALL,),
                         compression=Compression(("context",), 3, ORIGINAL))
    await account(compressed, answered)
    await account(context(chat(model="small"), feature="docs", targets=(SMALL,)), answered)
    await rig.guard.drain()
    assert len(rig.provider.requests) == 1
    assert rig.guard.rows()[0]["mean"] == 0.0


async def test_samples_logged_before_a_re_enable_do_not_switch_it_off_again(
        tmp_path: Path) -> None:
    """A sample another process logged just before an operator's re-enable, not yet read by
    the process that enables (nor by the other one when it reads the re-enable): its strategy
    stays on, in both, with a fresh test."""
    path = str(tmp_path / "ledger.db")
    one, two = await SQLiteAlertStore.create(path), await SQLiteAlertStore.create(path)
    a = Rig(_policy(min_samples=3), alerts=one)
    b = Rig(_policy(min_samples=3), alerts=two)
    for _ in range(3):  # the first check passes: switched off by the evidence later
        await a.serve(RIGHT)
    while a.guard.enabled("docs", "context"):
        await a.serve(WRONG)
    assert a.guard.rows()[0]["bound"] >= 1 / DELTA
    await b.guard.sync()
    assert not a.guard.enabled("docs", "context") and not b.guard.enabled("docs", "context")
    await b.serve(WRONG)  # logged, not yet read by a
    assert await a.guard.enable("docs", "context")
    assert a.guard.enabled("docs", "context")
    await b.guard.sync()
    assert b.guard.enabled("docs", "context")
    for rig in (a, b):
        await rig.guard.sync()
        assert rig.guard.enabled("docs", "context")
        assert [(r["samples"], r["bound"]) for r in rig.guard.rows()] == [(0, 1.0)]
    assert await one.active() == {}
    for store in (one, two):
        await store.close()


async def test_a_restart_replays_every_sample_since_the_last_re_enable(tmp_path: Path) -> None:
    """Samples of two features interleaved: a process started afterwards shows the same tests
    as the one that logged them."""
    store = await SQLiteAlertStore.create(str(tmp_path / "ledger.db"))
    first = Rig(_policy(min_samples=50), alerts=store)
    rng = random.Random(3)
    for _ in range(60):
        await first.serve(rng.choice([RIGHT, RIGHT, WRONG]),
                          strategies=(rng.choice(["context", "history"]),))
    second = Rig(_policy(min_samples=50), alerts=store)
    await second.guard.restore()
    assert second.guard.rows() == first.guard.rows()
    await store.close()
