"""Guard stage micro-benchmark: CPU time the guard adds per request, in process.

Runs the real stage (budget matching, worst-case estimate, reservation, settling) in front of a
``next`` that answers at once, for a requests-only budget and for a USD budget (which counts
the size of the prompt), with the in-memory counters and with the SQLite counters that
``serve --workers N`` shares (their thread's CPU included: process time). With no budgets the
stage is disabled and the pipeline never calls it.

Each is run with one request at a time and with 50 in flight (the SQLite store then admits
many requests per transaction). The best of 5 runs is reported: the machine may be shared.

    python bench/guard.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from skinflint.config import settings_from_dict
from skinflint.interfaces import BudgetCounters
from skinflint.metrics import Metrics
from skinflint.models import Usage
from skinflint.pipeline.budgets import BudgetBook
from skinflint.pipeline.context import Costs, Reply, RequestContext
from skinflint.pipeline.guard import Guard
from skinflint.pricing import PriceCatalog
from skinflint.storage.counters import MemoryBudgetCounters
from skinflint.storage.sqlite_counters import SQLiteBudgetCounters

CLIENTS = (1, 50)  # requests in flight at once
BODY = {"model": "gpt-4o-mini", "max_tokens": 200,
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "What is the capital of France? One word."}]}
REPLY = Reply(body={"ok": True})
COSTS = Costs(0.0001, 0.0001, "", None, None)
USAGE = Usage(input_tokens=30, output_tokens=5)


async def _answer(ctx: RequestContext) -> Reply:
    return REPLY


def _context(i: int) -> RequestContext:
    raw = orjson.dumps(BODY)
    return RequestContext(f"r{i}", 0.0, 0.0, "chat", raw, {}, body=BODY,
                          requested_model="gpt-4o-mini", feature="search", user=f"u{i % 50}")


def _guard(budgets: list[dict[str, Any]], counters: BudgetCounters) -> Guard:
    settings = settings_from_dict({"budgets": budgets}, env={})
    catalog = PriceCatalog()
    catalog.warm(["gpt-4o-mini"])
    book = BudgetBook(settings, counters, catalog=catalog)
    return Guard(book, Metrics())


class _Baseline:
    """What the loop costs without the guard: ``next`` called directly."""

    async def __call__(self, ctx: RequestContext, next: Any) -> Reply:
        reply: Reply = await next(ctx)
        ctx.on_accounted = _nothing
        return reply


def _nothing(ctx: RequestContext) -> None:
    pass


async def _one(guard: Guard | _Baseline, i: int) -> None:
    ctx = _context(i)
    await guard(ctx, _answer)
    ctx.usage, ctx.costs = USAGE, COSTS
    assert ctx.on_accounted is not None
    ctx.on_accounted(ctx)


async def _run(guard: Guard | _Baseline, n: int, clients: int) -> float:
    """CPU seconds per request of ``n`` requests through the guard, ``clients`` at a time,
    each built and settled as the gateway does."""
    for i in range(200):  # warm up
        await guard(_context(i), _answer)
    start = time.process_time()
    if clients == 1:
        for i in range(n):
            await _one(guard, i)
    else:
        for first in range(0, n, clients):
            await asyncio.gather(*(_one(guard, i) for i in range(first, min(first + clients, n))))
    return (time.process_time() - start) / n


async def main(n: int) -> None:
    requests = [{"name": "rpm", "window": "minute", "limit": {"requests": 10**9}}]
    usd = [{"name": "search-daily", "per": "feature", "match": "search", "window": "day",
            "limit": {"usd": 10**6}},
           {"name": "per-user", "per": "user", "window": "hour", "limit": {"requests": 10**9}}]
    print(f"{'':24} {'CPU us per request, best of 5':>38}")
    print(f"{'':24} {'1 client':>12} {'50 clients':>12}")
    base = [min([await _run(_Baseline(), n, c) for _ in range(5)]) for c in CLIENTS]
    print(f"{'without the guard':24}" + "".join(f"{b * 1e6:13.1f}" for b in base)
          + "  (subtracted below)")
    with tempfile.TemporaryDirectory() as tmp:
        for label, budgets in (("requests budget", requests), ("usd + per-user", usd)):
            for store in ("memory", "sqlite"):
                counters: BudgetCounters = (
                    MemoryBudgetCounters() if store == "memory"
                    else SQLiteBudgetCounters(str(Path(tmp) / f"{label[:3]}.db")))
                guard = _guard(budgets, counters)
                size = n if store == "memory" else n // 10
                per = [min([await _run(guard, size, c) for _ in range(5)]) for c in CLIENTS]
                await counters.close()
                print(f"{label:16} {store:7}"
                      + "".join(f"{(p - b) * 1e6:13.1f}" for p, b in zip(per, base, strict=True)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20_000)
    asyncio.run(main(parser.parse_args().requests))
