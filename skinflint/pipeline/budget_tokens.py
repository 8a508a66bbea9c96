"""Stage 8, budget tokens: cap a chat request's output and ask for brevity.

The cap comes from the ``token_budgets`` section: the task a route chose, else the request's
feature, else the route (or model) asked for, else the default (see
:class:`skinflint.config.TokenBudgets`). It only ever lowers the request's limit:

* a client that set ``max_completion_tokens`` (or ``max_tokens``) keeps that field, lowered to
  the cap when it is larger; a smaller value stands;
* a client that set neither gets ``max_completion_tokens`` when the model called is an OpenAI
  reasoning model (its name starts with o1, o3, o4 or gpt-5: they accept no other), else
  ``max_tokens``.

A ``brevity`` instruction is appended to the system prompt (the first ``system`` or
``developer`` message; a new system message at the start when there is none; a text part when
its content is a list), once: not when the prompt already holds it.

The request's cache key takes the cap into account (see :meth:`TokenBudgets.cache_scope`), so
an answer written under one cap is never served under another.
"""

from __future__ import annotations

from typing import Any

from skinflint.config import TokenBudget, TokenBudgets
from skinflint.pipeline.context import Next, Reply, RequestContext, TokenCap

__all__ = ["BudgetTokens", "apply_cap", "with_brevity"]

JSON = dict[str, Any]

_FIELDS = ("max_completion_tokens", "max_tokens")  # the first a client set is the one capped
_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")
_SYSTEM_ROLES = frozenset({"system", "developer"})


def _limit_field(model: str) -> str:
    name = model.rsplit("/", 1)[-1].lower()
    return "max_completion_tokens" if name.startswith(_REASONING_PREFIXES) else "max_tokens"


def apply_cap(body: JSON, cap: int, model: str) -> dict[str, int]:
    """The body fields to set so that ``body`` asks for at most ``cap`` output tokens from
    ``model``; empty when the client's own limit is already at most ``cap``."""
    given = [k for k in _FIELDS if body.get(k) is not None]
    if not given:
        return {_limit_field(model): cap}
    # a limit that is not a number is the provider's to reject, unchanged
    return {k: cap for k in given
            if isinstance(body[k], int) and not isinstance(body[k], bool) and body[k] > cap}


def _holds(content: Any, text: str) -> bool:
    if isinstance(content, str):
        return text in content
    if isinstance(content, list):
        return any(isinstance(p, dict) and text in str(p.get("text") or "") for p in content)
    return False


def _appended(content: Any, text: str) -> Any:
    if isinstance(content, list):
        return [*content, {"type": "text", "text": text}]
    return f"{content}\n\n{text}" if content else text


def with_brevity(messages: list[Any], text: str) -> list[Any] | None:
    """``messages`` with ``text`` appended to the system prompt; None when it already holds
    it."""
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") in _SYSTEM_ROLES:
            content = message.get("content")
            if _holds(content, text):
                return None
            return [*messages[:i], {**message, "content": _appended(content, text)},
                    *messages[i + 1:]]
    return [{"role": "system", "content": text}, *messages]


class BudgetTokens:
    name = "budget_tokens"

    def __init__(self, budgets: TokenBudgets) -> None:
        self._budgets = budgets
        self.enabled = budgets.configured  # unconfigured: the pipeline skips the stage

    def budget_for(self, ctx: RequestContext) -> TokenBudget | None:
        task = ctx.route.task if ctx.route is not None else ""
        return self._budgets.resolve(ctx.feature, ctx.requested_model, task)

    async def __call__(self, ctx: RequestContext, next: Next) -> Reply:
        budget = self.budget_for(ctx) if ctx.endpoint == "chat" else None
        if budget is not None:
            self._apply(ctx, budget)
        return await next(ctx)

    @staticmethod
    def _apply(ctx: RequestContext, budget: TokenBudget) -> None:
        """Replace (never change in place: a cascade's tiers share it) the body."""
        model = ctx.targets[0].provider_model if ctx.targets else ctx.requested_model
        changes: JSON = apply_cap(ctx.body, budget.max_tokens, model)
        messages = ctx.body.get("messages")
        if budget.brevity and isinstance(messages, list):
            longer = with_brevity(messages, budget.brevity)
            if longer is not None:
                changes["messages"] = longer
        if changes:
            ctx.body = {**ctx.body, **changes}
        capped = any(k in changes for k in _FIELDS)
        ctx.token_cap = TokenCap(budget.max_tokens, capped, bool(budget.brevity))
