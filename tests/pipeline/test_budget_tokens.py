"""The budget-tokens stage: which cap applies, which field it sets, brevity once."""

from __future__ import annotations

from typing import Any

import pytest

from skinflint.config import TokenBudgets
from skinflint.pipeline.budget_tokens import BudgetTokens
from skinflint.pipeline.context import RequestContext, RouteDecision, Target, TokenCap
from tests.pipeline.parts import Recorder, chat, context

BUDGETS = TokenBudgets.model_validate({
    "default": {"max_tokens": 500},
    "routes": {"auto": {"max_tokens": 400}},
    "features": {"summarize": {"max_tokens": 150, "brevity": "Be brief."}},
    "tasks": {"code": {"max_tokens": 800}},
})


async def _through(
    budgets: TokenBudgets, ctx: RequestContext
) -> tuple[dict[str, Any], RequestContext]:
    stage, nxt = BudgetTokens(budgets), Recorder()
    await stage(ctx, nxt)
    return nxt.seen[0].body, ctx


def _target(model: str) -> tuple[Target, ...]:
    return (Target(model, "p", model),)


@pytest.mark.parametrize(("feature", "model", "task", "cap"), [
    ("summarize", "auto", "code", 800),  # the task's first
    ("summarize", "auto", "faq", 150),  # then the feature's
    ("other", "auto", "faq", 400),  # then the route's
    ("other", "m", "", 500),  # then the default
])
async def test_the_task_then_feature_then_route_then_default(
    feature: str, model: str, task: str, cap: int
) -> None:
    ctx = context(chat(model=model), feature=feature, targets=_target("m-1"))
    ctx.route = RouteDecision(model, task=task)
    body, ctx = await _through(BUDGETS, ctx)
    assert body["max_tokens"] == cap
    assert ctx.token_cap is not None and ctx.token_cap.max_tokens == cap
    assert ctx.route_label.endswith(f";cap={cap}")


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_the_clients_smaller_limit_stands_and_a_larger_one_is_lowered(field: str) -> None:
    small = context(chat(**{field: 40}), feature="summarize", targets=_target("m-1"))
    body, ctx = await _through(BUDGETS, small)
    assert body[field] == 40 and ctx.token_cap == TokenCap(150, capped=False, brevity=True)
    assert ";cap=" not in ctx.route_label
    large = context(chat(**{field: 4000}), feature="summarize", targets=_target("m-1"))
    body, ctx = await _through(BUDGETS, large)
    assert body[field] == 150 and ctx.token_cap == TokenCap(150, capped=True, brevity=True)
    other = "max_tokens" if field == "max_completion_tokens" else "max_completion_tokens"
    assert other not in body  # the client's field, not another


async def test_the_client_body_is_replaced_not_changed() -> None:
    original = chat(max_tokens=4000)
    ctx = context(original, feature="summarize", targets=_target("m-1"))
    await _through(BUDGETS, ctx)
    assert original == chat(max_tokens=4000)


@pytest.mark.parametrize(("model", "field"), [
    ("o1-mini", "max_completion_tokens"), ("o3", "max_completion_tokens"),
    ("openai/o4-mini", "max_completion_tokens"), ("gpt-5-nano", "max_completion_tokens"),
    ("gpt-4o-mini", "max_tokens"), ("claude-3-5-haiku", "max_tokens"),
])
async def test_reasoning_models_get_max_completion_tokens(model: str, field: str) -> None:
    body, _ = await _through(BUDGETS, context(chat(), targets=_target(model)))
    assert body[field] == 500
    assert set(body) & {"max_tokens", "max_completion_tokens"} == {field}


async def test_brevity_joins_the_system_prompt_once() -> None:
    budgets = TokenBudgets.model_validate({"default": {"max_tokens": 99, "brevity": "Be brief."}})
    plain = chat()
    body, _ = await _through(budgets, context(plain, targets=_target("m")))
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["messages"][1:] == plain["messages"]
    system = {**chat(), "messages": [{"role": "system", "content": "You help."},
                                     {"role": "user", "content": "hi"}]}
    body, _ = await _through(budgets, context(system, targets=_target("m")))
    assert body["messages"][0]["content"] == "You help.\n\nBe brief."
    again, _ = await _through(budgets, context(body, targets=_target("m")))
    assert again["messages"] == body["messages"]  # never twice
    parts = {**chat(), "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "You help."}]},
        {"role": "user", "content": "hi"}]}
    body, _ = await _through(budgets, context(parts, targets=_target("m")))
    assert body["messages"][0]["content"] == [{"type": "text", "text": "You help."},
                                              {"type": "text", "text": "Be brief."}]
    again, _ = await _through(budgets, context(body, targets=_target("m")))
    assert again["messages"] == body["messages"]


async def test_without_a_budget_nothing_changes() -> None:
    empty = BudgetTokens(TokenBudgets())
    assert not empty.enabled
    only_feature = TokenBudgets.model_validate({"features": {"x": {"max_tokens": 10}}})
    assert BudgetTokens(only_feature).enabled
    body = chat(max_tokens=4000)
    seen, ctx = await _through(only_feature, context(body, feature="y", targets=_target("m")))
    assert seen is body and ctx.token_cap is None
    embed = context({"model": "m", "input": "hi"}, endpoint="embeddings", feature="x")
    seen, ctx = await _through(only_feature, embed)
    assert "max_tokens" not in seen and ctx.token_cap is None


def test_a_cap_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        TokenBudgets.model_validate({"default": {"max_tokens": 0}})


def test_the_cache_scope_follows_what_decides_the_cap() -> None:
    scope = BUDGETS.cache_scope
    assert scope("summarize", "m", routed=False) != scope("other", "m", routed=False)
    assert scope("other", "m", routed=False) == scope("another", "m", routed=False)
    assert scope("other", "auto", routed=True) != scope("other", "auto", routed=False)
    changed = TokenBudgets.model_validate({**BUDGETS.model_dump(),
                                          "tasks": {"code": {"max_tokens": 801}}})
    assert changed.cache_scope("x", "auto", routed=True) != scope("x", "auto", routed=True)
