"""Budget-tokens stage micro-benchmark: CPU time the stage adds per request, in process.

Runs the real stage in front of a ``next`` that answers at once, with no budget configured
(the pipeline then skips the stage: the figure is what calling it would cost anyway), with a
cap only, and with a cap and a brevity instruction appended to a system prompt; and the extra
work of the cache key (:meth:`TokenBudgets.cache_scope`) per request when budgets are on. The
loop's own cost (``next`` called directly) is subtracted. Best of 5 runs: the machine may be
shared.

    python bench/budget_tokens.py [--requests 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from skinflint.config import TokenBudgets
from skinflint.pipeline.budget_tokens import BudgetTokens
from skinflint.pipeline.context import Reply, RequestContext, Target

BODY = {"model": "gpt-4o-mini", "temperature": 0,
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "Summarise the meeting notes below. " * 20}]}
RAW = orjson.dumps(BODY)
TARGETS = (Target("gpt-4o-mini", "openai", "gpt-4o-mini"),)
REPLY = Reply(body={"ok": True})
CASES: dict[str, dict[str, Any]] = {
    "unconfigured": {},
    "cap": {"features": {"summarize": {"max_tokens": 150}}},
    "cap + brevity": {"features": {"summarize": {
        "max_tokens": 150, "brevity": "Answer in at most five bullet points."}}},
}


async def _answer(ctx: RequestContext) -> Reply:
    return REPLY


async def _direct(ctx: RequestContext, next: Any) -> Reply:
    reply: Reply = await next(ctx)
    return reply


def _context() -> RequestContext:
    return RequestContext("r", 0.0, 0.0, "chat", RAW, {}, body=BODY, feature="summarize",
                          requested_model="gpt-4o-mini", targets=TARGETS)


async def _loop(stage: Callable[..., Any], n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        await stage(_context(), _answer)
    return (time.process_time() - started) / n * 1e6


def _best(stage: Callable[..., Any], n: int) -> float:
    return min(asyncio.run(_loop(stage, n)) for _ in range(5))


def _scope_cost(budgets: TokenBudgets, n: int) -> float:
    def once() -> float:
        started = time.process_time()
        for _ in range(n):
            budgets.cache_scope("summarize", "gpt-4o-mini", routed=False)
        return (time.process_time() - started) / n * 1e6
    return min(once() for _ in range(5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    n = parser.parse_args().requests
    base = _best(_direct, n)
    print(f"loop alone: {base:.2f} us/request (subtracted below)")
    for name, config in CASES.items():
        budgets = TokenBudgets.model_validate(config)
        stage = BudgetTokens(budgets)
        added = _best(stage, n) - base
        skipped = "" if stage.enabled else " (the pipeline skips it: 0 in practice)"
        print(f"{name:>14}: stage {added:.2f} us/request{skipped}")
        if stage.enabled:
            print(f"{'':>14}  cache key scope {_scope_cost(budgets, n):.2f} us/request")


if __name__ == "__main__":
    main()
