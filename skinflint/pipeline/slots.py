"""Pipeline slots that hold no strategy yet. Each is a real stage that passes the request on;
``enabled = False`` lets the pipeline skip the call entirely."""

from __future__ import annotations

from skinflint.pipeline.context import Next, Reply, RequestContext

__all__ = ["BudgetTokens", "Rules"]


class _Slot:
    name = "slot"
    enabled = False

    async def __call__(self, ctx: RequestContext, next: Next) -> Reply:
        return await next(ctx)


class Rules(_Slot):
    """Stage 3: deterministic answers that need no LLM."""

    name = "rules"


class BudgetTokens(_Slot):
    """Stage 8: output-token caps."""

    name = "budget_tokens"
