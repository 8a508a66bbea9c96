"""The request pipeline. The stages, in order, are listed once, in :func:`build_stages`."""

from __future__ import annotations

from collections.abc import Sequence

from skinflint.pipeline.account import Account
from skinflint.pipeline.attribute import Attribute
from skinflint.pipeline.budget_tokens import BudgetTokens
from skinflint.pipeline.cache_exact import ExactCache
from skinflint.pipeline.cache_semantic import SemanticCache
from skinflint.pipeline.call import CallProvider
from skinflint.pipeline.compress import Compress
from skinflint.pipeline.context import Next, Reply, RequestContext, Stage
from skinflint.pipeline.defer import Defer
from skinflint.pipeline.guard import Guard
from skinflint.pipeline.route import Route
from skinflint.pipeline.rules import Rules

__all__ = ["Pipeline", "Reply", "RequestContext", "build_stages"]


def build_stages(
    *,
    attribute: Attribute,
    guard: Guard,
    defer: Defer,
    rules: Rules,
    exact_cache: ExactCache,
    semantic_cache: SemanticCache,
    compress: Compress,
    route: Route,
    budget_tokens: BudgetTokens,
    call_provider: CallProvider,
    account: Account,
) -> list[Stage]:
    """The pipeline, in the order a request meets it."""
    return [
        attribute,  # 1  request id, hash, tenant/feature/user/tags
        guard,  # 2  budgets and rate limits
        defer,  # 2b deferred to a provider batch: 202 and a job id
        rules,  # 3  deterministic answers
        exact_cache,  # 4  exact cache lookup
        semantic_cache,  # 5  semantic cache lookup
        compress,  # 6  prompt compression
        route,  # 7  model / cascade choice
        budget_tokens,  # 8  output-token caps
        call_provider,  # 9  the upstream call (terminal)
        account,  # 10 usage, cost, ledger, cache writes
    ]


class Pipeline:
    """Folds the stages into one callable.

    Stages 1-9 run in order, each calling the next. Account (stage 10) acts after all of them
    have returned, on every outcome, so it is folded outermost."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        *forward, last = stages
        self.stages = list(stages)
        chain: Next = _end
        for stage in reversed([s for s in forward if s.enabled]):
            chain = _bind(stage, chain)
        self._run = _bind(last, chain)

    async def handle(self, ctx: RequestContext) -> Reply:
        return await self._run(ctx)


async def _end(ctx: RequestContext) -> Reply:
    raise AssertionError("the terminal stage must answer")


def _bind(stage: Stage, next: Next) -> Next:
    async def run(ctx: RequestContext) -> Reply:
        return await stage(ctx, next)

    return run
