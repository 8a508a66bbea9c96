"""Stage 7, route, through its one call: what answers a model, an alias or a route."""

from __future__ import annotations

from typing import Any

import pytest

from skinflint.config import settings_from_dict
from skinflint.errors import UnknownModelError
from skinflint.metrics import Metrics
from skinflint.models import Usage
from skinflint.pipeline.context import (
    Attempt,
    GateVerdict,
    Reply,
    RequestContext,
    RouteDecision,
    Target,
)
from skinflint.pipeline.route import Route
from skinflint.routing.classifier import TaskClassifier
from tests.pipeline.parts import Recorder, answer, chat, context

NOWHERE = {"base_url": "http://127.0.0.1:1/v1"}
MODELS = {
    "small": {"provider": "p", "model": "s-1", "fallbacks": ["mid", "big"]},
    "mid": {"provider": "p"},
    "big": {"provider": "q", "model": "b-2"},
}
QUIZ = [{"model": "small", "gate": {"format": "choice"}}, {"model": "big"}]
ROUTES = {"auto": {
    "default_task": "chat",
    "pins": {"billing": "big"},
    "rules": [{"task": "code", "regex": "^```"},
              {"task": "faq", "feature": "help", "max_chars": 20},
              {"task": "faq", "keywords": ["REFUND"]}],
    "min_confidence": 0.9,
    "task_map": {"coding": "code"},
    "tasks": {"chat": {"model": "mid"}, "code": {"model": "big"}, "faq": {"model": "small"},
              "quiz": {"cascade": QUIZ}},
}}
SMALL, MID, BIG = Target("small", "p", "s-1"), Target("mid", "p", "mid"), Target("big", "q", "b-2")


def _route(metrics: Metrics | None = None, classifier: TaskClassifier | None = None,
           **config: Any) -> Route:
    raw = {"providers": {"p": NOWHERE, "q": NOWHERE}, "models": MODELS, "routes": ROUTES,
           **config}
    return Route(settings_from_dict(raw, env={}), classifiers={"auto": classifier},
                 scorer=None, metrics=metrics or Metrics())


async def _routed(ctx: RequestContext, route: Route | None = None) -> RequestContext:
    after = Recorder()
    await (route or _route())(ctx, after)
    assert after.seen == [ctx]
    return ctx


async def test_a_model_resolves_to_its_target_then_its_fallbacks() -> None:
    ctx = await _routed(context(chat(model="small")))
    assert ctx.targets == (SMALL, MID, BIG)
    assert ctx.route == RouteDecision("small")
    assert not ctx.route.routed and ctx.route.label == "small" == ctx.route_label


async def test_an_unknown_model_without_a_default_provider_is_refused() -> None:
    after = Recorder()
    with pytest.raises(UnknownModelError, match="known: auto, big, mid, small") as caught:
        await _route()(context(chat(model="gpt-x")), after)
    assert caught.value.status == 404 and not after.called


async def test_an_unknown_model_goes_to_the_default_provider() -> None:
    ctx = await _routed(context(chat(model="gpt-x")), _route(default_provider="q"))
    assert ctx.targets == (Target("gpt-x", "q", "gpt-x"),)
    assert ctx.route == RouteDecision("gpt-x")


async def test_a_pinned_feature_takes_its_model_before_anything_else() -> None:
    ctx = await _routed(context(chat("```print()", model="auto"), feature="billing",
                                task="code"))
    assert ctx.targets == (BIG,)
    assert ctx.route == RouteDecision("auto", pin="billing")
    assert ctx.route.routed and ctx.route.label == "auto;pin=billing"


@pytest.mark.parametrize(("text", "fields", "task", "how"), [
    ("```print()", {"task": "chat"}, "chat", "header"),  # the header before the rules
    ("```print()", {"task": "nonsense"}, "code", "rule"),  # a task the route lacks: ignored
    ("```print()", {}, "code", "rule"),
    ("short one", {"feature": "help"}, "faq", "rule"),
    ("short one", {"feature": "other"}, "chat", "default"),
    ("a question that is far too long", {"feature": "help"}, "chat", "default"),
    ("where is my refund", {}, "faq", "rule"),
])
async def test_a_route_picks_a_task(text: str, fields: dict[str, Any], task: str,
                                    how: str) -> None:
    metrics = Metrics()
    ctx = await _routed(context(chat(text, model="auto"), **fields), _route(metrics))
    assert ctx.route == RouteDecision("auto", task=task)
    assert ctx.route.routed and ctx.route.label == f"auto;task={task}"
    models = {"chat": (MID,), "code": (BIG,), "faq": (SMALL, MID, BIG)}
    assert ctx.targets == models[task]
    labels = {"route": "auto", "task": task, "how": how}
    assert metrics.registry.get_sample_value("skinflint_route_decisions_total", labels) == 1


async def test_the_classifier_decides_when_it_is_confident() -> None:
    classifier = TaskClassifier.train(
        ["python code", "python code bug", "refund order", "refund order now"],
        ["coding", "coding", "support", "support"])
    route = _route(classifier=classifier)
    sure = await _routed(context(chat("python code", model="auto")), route)
    assert sure.route == RouteDecision("auto", task="code")  # "coding" mapped to a task
    unsure = await _routed(context(chat("something else", model="auto")), route)
    assert unsure.route == RouteDecision("auto", task="chat")


def _tiers_answer(**texts: str) -> Recorder:
    """The provider call: each model (by alias) answers its text."""

    def call(ctx: RequestContext) -> Reply:
        ctx.answered = target = ctx.targets[0]
        return Reply(body=answer(texts[target.name], model=target.provider_model))

    return Recorder(call)


async def test_a_cascade_escalates_and_its_decision_names_the_tier() -> None:
    ctx, calls = context(chat(model="auto"), task="quiz"), _tiers_answer(small="maybe", big="B")
    reply = await _route()(ctx, calls)
    assert reply.body == answer("B", model="b-2")
    assert ctx.route == RouteDecision("auto", task="quiz", tier=1, tiers=2)
    assert ctx.route.label == "auto;task=quiz;tier=2/2"
    assert ctx.answered == BIG
    assert ctx.attempts == [Attempt(0, SMALL, Usage(10, 2), 0.0, verdict=GateVerdict("format"))]
    assert [(c.targets[0], c.route) for c in calls.seen] == [
        (SMALL, RouteDecision("auto", task="quiz", tier=0, tiers=2)),
        (BIG, ctx.route)]
    assert all(c is not ctx for c in calls.seen)  # each tier calls with its own copy


async def test_a_cascade_stops_at_the_first_tier_its_gate_accepts() -> None:
    ctx, calls = context(chat(model="auto"), task="quiz"), _tiers_answer(small="A", big="B")
    reply = await _route()(ctx, calls)
    assert reply.body == answer("A", model="s-1")
    assert ctx.route == RouteDecision("auto", task="quiz", tier=0, tiers=2)
    assert ctx.route.label == "auto;task=quiz;tier=1/2"
    assert ctx.answered == SMALL and ctx.attempts == [] and len(calls.seen) == 1


async def test_a_streamed_cascade_calls_whole_answers_and_replays_the_chosen_one() -> None:
    ctx = context(chat(model="auto", stream=True), task="quiz", stream=True)
    calls = _tiers_answer(small="maybe", big="B")
    reply = await _route()(ctx, calls)
    assert [c.stream for c in calls.seen] == [False, False]  # a gate needs the whole answer
    assert reply.body is None and reply.chunks is not None
    chunks = [c.data async for c in reply.chunks]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"]) == "B"
    assert chunks[-1]["usage"]["completion_tokens"] == 2  # the ledger needs it


async def test_model_names_from_clients_are_not_remembered_without_bound() -> None:
    """With a default provider any name resolves, and names come from the client: remembering
    each would let clients grow the gateway's memory at will (as the cache's policy memo and
    the price catalog's guard against)."""
    route = _route(default_provider="q")
    for i in range(10_000):
        await route(context(chat(model=f"client-model-{i}")), Recorder())
    assert len(route._memo) <= 4096


async def test_an_unknown_model_error_lists_a_bounded_number_of_names() -> None:
    many = {f"m{i:03}": {"provider": "p"} for i in range(500)}
    with pytest.raises(UnknownModelError) as caught:
        await _route(models=many, routes={})(context(chat(model="gpt-x")), Recorder())
    message = caught.value.message
    assert "known: m000, m001" in message and message.endswith("m019 and 480 more)")
    assert "m020" not in message
