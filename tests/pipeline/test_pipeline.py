"""The pipeline's fold: the stages in order, stages not configured skipped, account outermost."""

from __future__ import annotations

import time

import orjson
import pytest

from skinflint.config import settings_from_dict
from skinflint.metrics import Metrics
from skinflint.pipeline import Pipeline, build_stages
from skinflint.pipeline.account import Account
from skinflint.pipeline.attribute import Attribute
from skinflint.pipeline.budget_tokens import BudgetTokens
from skinflint.pipeline.cache import ResponseCache
from skinflint.pipeline.cache_exact import ExactCache
from skinflint.pipeline.cache_semantic import SemanticCache
from skinflint.pipeline.call import CallProvider, RetryPolicy
from skinflint.pipeline.compress import Compress
from skinflint.pipeline.context import MISS, Next, Reply, RequestContext
from skinflint.pipeline.defer import Defer
from skinflint.pipeline.guard import Guard
from skinflint.pipeline.route import Route
from skinflint.pipeline.rules import Rules
from skinflint.pricing import PriceCatalog
from skinflint.storage.cache import MemoryCacheStore
from skinflint.storage.ledger import MemoryLedger
from skinflint.tokens import TokenCounter
from tests.pipeline.parts import Scripted, answer, chat, context


class Traced:
    """A stage that notes when the request reaches it and when it comes back; ``answers``
    makes it terminal, ``fails`` makes it raise."""

    def __init__(self, name: str, log: list[str], *, enabled: bool = True,
                 answers: bool = False, fails: bool = False) -> None:
        self.name, self.enabled, self._log = name, enabled, log
        self._answers, self._fails = answers, fails

    async def __call__(self, ctx: RequestContext, next: Next) -> Reply:
        self._log.append(f"{self.name}>")
        try:
            if self._fails:
                raise RuntimeError(self.name)
            return Reply(body=answer()) if self._answers else await next(ctx)
        finally:
            self._log.append(f"<{self.name}")


async def test_stages_run_in_order_with_the_last_outermost() -> None:
    log: list[str] = []
    stages = [Traced("a", log), Traced("b", log), Traced("call", log, answers=True),
              Traced("account", log)]
    reply = await Pipeline(stages).handle(context())
    assert reply.body == answer()
    assert log == ["account>", "a>", "b>", "call>", "<call", "<b", "<a", "<account"]


async def test_a_disabled_stage_is_skipped() -> None:
    log: list[str] = []
    stages = [Traced("a", log), Traced("slot", log, enabled=False),
              Traced("call", log, answers=True), Traced("account", log)]
    pipeline = Pipeline(stages)
    await pipeline.handle(context())
    assert "slot>" not in log and log[:3] == ["account>", "a>", "call>"]
    assert pipeline.stages == stages  # listed all the same


async def test_the_last_stage_sees_every_failure() -> None:
    log: list[str] = []
    stages = [Traced("a", log), Traced("call", log, fails=True), Traced("account", log)]
    with pytest.raises(RuntimeError, match="call"):
        await Pipeline(stages).handle(context())
    assert log[-1] == "<account"


async def test_a_pipeline_whose_stages_all_pass_on_is_an_error() -> None:
    log: list[str] = []
    with pytest.raises(AssertionError, match="terminal stage"):
        await Pipeline([Traced("a", log), Traced("account", log)]).handle(context())


def _built(exact: bool, provider: Scripted | None = None) -> tuple[Pipeline, MemoryLedger]:
    """The real stages over in-memory parts, answered by ``provider`` (serving model ``m``)."""
    provider = provider or Scripted("p")
    settings = settings_from_dict({
        "providers": {"p": {"base_url": "http://127.0.0.1:1/v1"}},
        "models": {"m": {"provider": "p", "model": "m-1"}},
        "cache": {"exact": {"enabled": exact}},
    }, env={})
    metrics, ledger = Metrics(), MemoryLedger()
    cache = ResponseCache(settings.cache, MemoryCacheStore(), metrics)
    stages = build_stages(
        attribute=Attribute({}),
        guard=Guard(None, metrics),
        defer=Defer(settings.batching, None, lambda name: None),
        rules=Rules(settings.rules, TokenCounter(), metrics),
        exact_cache=ExactCache(cache),
        semantic_cache=SemanticCache(cache),
        compress=Compress(settings.compression, TokenCounter(), metrics),
        route=Route(settings, classifiers={}, scorer=None, metrics=metrics),
        budget_tokens=BudgetTokens(settings.token_budgets),
        call_provider=CallProvider({"p": provider}, {"p": RetryPolicy()}, metrics),
        account=Account(catalog=PriceCatalog(), tokens=TokenCounter(), ledger=ledger,
                        metrics=metrics, cache=cache),
    )
    return Pipeline(stages), ledger


def _names(pipeline: Pipeline) -> list[str]:
    return [f"{s.name}{'' if s.enabled else ' (empty)'}" for s in pipeline.stages]


def test_the_order_a_request_meets_the_stages() -> None:
    assert _names(_built(exact=True)[0]) == [
        "attribute", "guard (empty)", "defer (empty)", "rules (empty)", "exact_cache", "semantic_cache (empty)",
        "compress (empty)", "route", "budget_tokens (empty)", "call_provider", "account"]
    assert _names(_built(exact=False)[0])[4:6] == ["exact_cache (empty)",
                                                   "semantic_cache (empty)"]


def _arrived() -> RequestContext:
    raw = orjson.dumps(chat(temperature=0))
    return RequestContext("r", 0.0, time.perf_counter(), "chat", raw, {})


async def test_the_real_stages_answer_then_serve_from_the_cache() -> None:
    provider = Scripted("p", answer("4", model="m-1"))
    pipeline, ledger = _built(exact=True, provider=provider)
    first, second = _arrived(), _arrived()
    assert (await pipeline.handle(first)).body == answer("4", model="m-1")
    assert (await pipeline.handle(second)).body == answer("4", model="m-1")
    assert len(provider.requests) == 1
    assert [(r.cache_status, r.provider, r.model) for r in ledger.records] == [
        ("miss", "p", "m-1"), ("hit-exact", "cache", "m-1")]


async def test_a_disabled_cache_stage_is_never_called() -> None:
    """Called, the exact-cache stage would mark the request as bypassed (cache disabled)."""
    pipeline, ledger = _built(exact=False, provider=Scripted("p", answer(model="m-1")))
    ctx = _arrived()
    await pipeline.handle(ctx)
    assert ctx.cache == MISS and ctx.cache_plan is None
    assert ledger.records[0].cache_reason == ""
