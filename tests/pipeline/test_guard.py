"""The guard stage through its one call: which budgets apply, the worst case it reserves,
windows that reset by the clock, settling once accounted, and its configuration."""

from __future__ import annotations

import time
from typing import Any

import pytest

from skinflint.config import Settings, settings_from_dict
from skinflint.errors import BudgetExceededError, ConfigError
from skinflint.metrics import Metrics
from skinflint.models import Usage
from skinflint.pipeline.budgets import DEFAULT_OUTPUT_CAP, BudgetBook, window_bounds
from skinflint.pipeline.context import Costs, RequestContext
from skinflint.pipeline.guard import Guard
from skinflint.pricing import PriceCatalog
from skinflint.storage.counters import MemoryBudgetCounters
from skinflint.tokens import TokenCounter
from tests.pipeline.parts import Recorder, chat, context

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _settings(*budgets: dict[str, Any], **extra: Any) -> Settings:
    return settings_from_dict({
        "providers": {"p": {"base_url": "http://127.0.0.1:1/v1"}},
        "models": {"m": {"provider": "p", "price": {"input": 1.0, "output": 2.0}},
                   "small": {"provider": "p", "price": {"input": 0.1, "output": 0.2}}},
        "budgets": list(budgets), **extra,
    }, env={})


def _guard(*budgets: dict[str, Any], now: float = T0, **extra: Any) -> tuple[Guard, Clock]:
    settings = _settings(*budgets, **extra)
    clock = Clock(now)
    catalog = PriceCatalog({n: (m.price.input, m.price.output, None)
                            for n, m in settings.models.items() if m.price is not None})
    book = BudgetBook(settings, MemoryBudgetCounters(), catalog=catalog, clock=clock)
    return Guard(book, Metrics()), clock


def _accounted(ctx: RequestContext, usd: float, usage: Usage | None = None) -> None:
    """What the account stage does once the request is priced."""
    ctx.usage = usage
    ctx.costs = Costs(usd, usd, "", None, None)
    assert ctx.on_accounted is not None
    ctx.on_accounted(ctx)


def test_no_budgets_leaves_the_stage_out() -> None:
    assert not Guard(None, Metrics()).enabled
    assert _guard()[0].enabled is False


async def test_a_minute_window_resets_with_the_clock() -> None:
    guard, clock = _guard({"name": "rpm", "window": "minute", "limit": {"requests": 1}},
                          now=T0 + 15)
    nxt = Recorder()
    await guard(context(), nxt)
    with pytest.raises(BudgetExceededError) as caught:
        await guard(context(), nxt)
    assert caught.value.retry_after == pytest.approx(45)
    assert caught.value.status == 429 and caught.value.budget == "rpm"
    clock.now = T0 + 60  # the next minute
    await guard(context(), nxt)
    assert len(nxt.seen) == 2


async def test_match_and_per_choose_the_counter() -> None:
    guard, _ = _guard({"name": "f", "per": "feature", "match": "search",
                       "limit": {"requests": 1}},
                      {"name": "t", "per": "tenant", "limit": {"requests": 5}})
    nxt = Recorder()
    await guard(context(feature="search", tenant="acme"), nxt)
    await guard(context(feature="other", tenant="acme"), nxt)
    assert nxt.seen[0].budget is not None and nxt.seen[0].budget.budgets == ("f", "t")
    assert nxt.seen[1].budget is not None and nxt.seen[1].budget.budgets == ("t",)
    with pytest.raises(BudgetExceededError, match="feature 'search'"):
        await guard(context(feature="search", tenant="acme"), nxt)


async def test_a_request_no_budget_counts_passes_untouched() -> None:
    guard, _ = _guard({"name": "f", "per": "feature", "match": "search",
                       "limit": {"usd": 0}})
    nxt = Recorder()
    await guard(context(feature="other"), nxt)
    (seen,) = nxt.seen
    assert seen.budget is None and seen.on_accounted is None
    assert guard._book is not None
    (row,) = await guard._book.rows()  # listed, since it counts one feature, but unused
    assert row["spent"] == row["reserved"] == {"usd": 0, "requests": 0, "tokens": 0}


async def test_reserves_prompt_plus_the_output_cap_and_settles_to_the_real_cost() -> None:
    guard, _ = _guard({"name": "usd", "limit": {"usd": 1.0}})
    book = guard._book
    assert book is not None
    capped = context(chat("hello", max_tokens=100))
    await guard(capped, Recorder())
    uncapped = context(chat("hello", n=2))
    await guard(uncapped, Recorder())
    (row,) = await book.rows()
    prompt = TokenCounter().count_messages("m", chat("hello")["messages"])
    assert prompt < len(capped.raw_body) < 10 * prompt  # the body's size bounds the prompt
    worst = ((len(capped.raw_body) * 1.0 + 100 * 2.0)
             + (len(uncapped.raw_body) * 1.0 + 2 * DEFAULT_OUTPUT_CAP * 2.0)) / 1e6
    assert row["reserved"]["usd"] == pytest.approx(worst)
    _accounted(capped, 0.0001, Usage(input_tokens=9, output_tokens=3))
    _accounted(uncapped, 0.0)  # failed before any spend
    (row,) = await book.rows()
    assert row["reserved"] == {"usd": 0, "requests": 0, "tokens": 0}
    assert row["spent"] == {"usd": 0.0001, "requests": 2, "tokens": 12}


async def test_without_a_client_cap_a_model_reserves_its_configured_max_output() -> None:
    models = {"m": {"provider": "p", "price": {"input": 1.0, "output": 2.0},
                    "max_output_tokens": 500},
              "small": {"provider": "p", "price": {"input": 0.1, "output": 0.2}}}
    guard, _ = _guard({"name": "usd", "limit": {"usd": 1.0}}, models=models)
    assert guard._book is not None
    configured = context(chat("hello"))
    assert guard._book.estimate(configured).tokens == len(configured.raw_body) + 500
    default = context(chat("hello", model="small"))
    assert guard._book.estimate(default).tokens == len(default.raw_body) + DEFAULT_OUTPUT_CAP
    capped = context(chat("hello", max_tokens=20))
    assert guard._book.estimate(capped).usd == pytest.approx(
        (len(capped.raw_body) * 1.0 + 20 * 2.0) / 1e6)


async def test_a_route_reserves_its_dearest_task_with_every_cascade_tier() -> None:
    routes = {"auto": {"default_task": "cheap", "tasks": {
        "cheap": {"model": "small"},
        "hard": {"cascade": [{"model": "small"}, {"model": "m"}]}}}}
    guard, _ = _guard({"name": "usd", "limit": {"usd": 1.0}}, routes=routes)
    assert guard._book is not None
    amount = guard._book.estimate(context(chat("x", model="auto", max_tokens=1000)))
    prompt = amount.tokens - 1000
    assert amount.usd == pytest.approx((prompt * 1.1 + 1000 * 2.2) / 1e6)


async def test_downgrade_and_alerts_are_typed_facts_on_the_context() -> None:
    guard, _ = _guard({"name": "d", "limit": {"requests": 1}, "action": "downgrade",
                       "downgrade_to": "small", "alert_at": [1.0]})
    nxt = Recorder()
    await guard(context(), nxt)
    await guard(context(), nxt)
    first, second = (c.budget for c in nxt.seen)
    assert first is not None and second is not None
    assert (first.downgrade_to, first.alerts) == ("", (("d", 1.0),))
    assert (second.downgrade_to, second.downgraded_by, second.alerts) == ("small", "d", ())


def test_calendar_windows_are_utc() -> None:
    mid_march = T0 + 73 * 86400 + 3 * 3600 + 125.5  # 2026-03-15T03:02:05.5Z
    assert window_bounds("minute", mid_march) == (mid_march - 5.5, mid_march + 54.5)
    assert window_bounds("hour", mid_march)[0] == mid_march - 125.5
    assert window_bounds("day", mid_march) == (T0 + 73 * 86400, T0 + 74 * 86400)
    march = time.mktime((2026, 3, 1, 0, 0, 0, 0, 0, 0)) - time.timezone
    april = time.mktime((2026, 4, 1, 0, 0, 0, 0, 0, 0)) - time.timezone
    assert window_bounds("month", mid_march) == (march, april)
    assert window_bounds("month", T0 - 1) == (T0 - 31 * 86400, T0)  # December


@pytest.mark.parametrize(("budgets", "message"), [
    ([{"name": "a", "limit": {}}], "budgets[0].limit: give at least one of usd"),
    ([{"name": "a", "limit": {"usd": 1}}, {"name": "a", "limit": {"usd": 1}}],
     "budgets[1].name: 'a' is used twice"),
    ([{"name": "a", "limit": {"usd": 1}, "action": "downgrade"}],
     "budgets[0]: downgrade_to is required with action: downgrade"),
    ([{"name": "a", "limit": {"usd": 1}, "alert_at": [0]}],
     "budgets[0]: alert_at fractions must be in (0, 10]"),
    ([{"name": "a", "limit": {"usd": 1}, "alert_at": [11]}],
     "budgets[0]: alert_at fractions must be in (0, 10]"),
    ([{"name": "a", "limit": {"usd": 1}, "window": "week"}], "budgets[0].window: must be"),
    ([{"name": "a", "limit": {"usd": 1}, "per": "team"}], "budgets[0].per: must be"),
    ([{"name": "a", "limit": {"usd": 1}, "action": "downgrade", "downgrade_to": "nope"}],
     "budgets[0].downgrade_to: unknown model 'nope'"),
    ([{"name": "a", "limit": {"requests": -1}}], "budgets[0].limit.requests: must be >= 0"),
])
def test_bad_budgets_name_the_key(budgets: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _settings(*budgets)
    assert message in str(caught.value)
