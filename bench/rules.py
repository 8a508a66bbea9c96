"""Rules stage micro-benchmark: CPU time the stage adds per request, in process.

Runs the real stage in front of a ``next`` that answers at once, with a realistic rule set
(ten regex rules, some per feature, three keyword rules and a 1,000-question table) on a chat
request that none of them matches: the cost every request pays once rules are configured.
The cost of an answered request (usage counted with the offline tokenizer) is shown beside it.
With no rules the stage is disabled and the pipeline never calls it (shown as built). The best
of 5 runs is reported: the machine may be shared.

    python bench/rules.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from skinflint.config import settings_from_dict
from skinflint.metrics import Metrics
from skinflint.pipeline import Pipeline
from skinflint.pipeline.context import Next, Reply, RequestContext
from skinflint.pipeline.rules import Rules
from skinflint.tokens import TokenCounter

REPLY = Reply(body={"ok": True})
SYSTEM = "You are a helpful assistant for an online shop. Answer briefly and politely."
QUESTION = ("I bought a pair of running shoes last week and they are a size too small; "
            "could you tell me how to exchange them for a larger size without paying again?")
HIT = "What are your opening hours on Saturday?"


def _body(text: str) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": SYSTEM},
                                                 {"role": "user", "content": text}]}


def _rules(table: str) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = [
        {"name": "opening-hours", "match": r"(?i)\bopening hours\b", "answer": "9:00-17:00."},
        {"name": "order-status", "match": r"(?i)\border #(?P<id>\d+)", "answer": "Order {id}."},
        {"name": "tracking", "match": r"(?i)\btrack(ing)? (number|code)\b", "answer": "See /t."},
        {"name": "address", "match": r"(?i)\bwhere are you located\b", "answer": "Main St."},
        {"name": "phone", "match": r"(?i)\b(phone|telephone) number\b", "answer": "555-0100"},
        {"name": "vat", "match": r"(?i)\bVAT (number|id)\b", "answer": "GB123",
         "features": ["billing"]},
        {"name": "invoice", "match": r"(?i)\bcopy of (my|the) invoice\b", "answer": "/inv",
         "features": ["billing"]},
        {"name": "gift", "match": r"(?i)\bgift (card|voucher)s?\b", "answer": "/gift"},
        {"name": "jobs", "match": r"(?i)\b(careers|job openings)\b", "answer": "/jobs"},
        {"name": "coupon", "match": r"(?i)\b(coupon|promo) code\b", "answer": "/promo"},
        {"name": "greeting", "keywords": ["hello", "good morning"], "answer": "Hello!",
         "features": ["chat"]},
        {"name": "thanks", "keywords": ["thank you", "thanks a lot"], "answer": "You're welcome"},
        {"name": "human", "keywords": ["human agent", "real person"], "answer": "Call 555-0100"},
        {"name": "faq", "table": table},
    ]
    return rules


def _context(i: int, body: dict[str, Any], raw: bytes) -> RequestContext:
    return RequestContext(f"r{i}", 0.0, 0.0, "chat", raw, {}, body=body,
                          requested_model="gpt-4o-mini", feature="support")


async def _answer(ctx: RequestContext) -> Reply:
    return REPLY


class _Baseline:
    """What the loop costs without the stage: ``next`` called directly."""

    name, enabled = "baseline", True

    async def __call__(self, ctx: RequestContext, next: Next) -> Reply:
        return await next(ctx)


async def _run(stage: Rules | _Baseline, text: str, n: int) -> float:
    body = _body(text)
    raw = orjson.dumps(body)
    for i in range(200):  # warm up (the tokenizer loads here)
        await stage(_context(i, body, raw), _answer)
    start = time.process_time()
    for i in range(n):
        await stage(_context(i, body, raw), _answer)
    return (time.process_time() - start) / n


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "faq.json"
        table.write_text(json.dumps({f"question number {i}?": f"answer {i}" for i in range(1000)}))
        settings = settings_from_dict({"rules": _rules(str(table))}, env={})
        stage = Rules(settings.rules, TokenCounter(), Metrics())
    empty = Rules((), TokenCounter(), Metrics())
    built = Pipeline([empty, _Baseline(), _Baseline()])
    print(f"no rules: stage enabled={empty.enabled}; "
          f"stages the pipeline calls: {len([s for s in built.stages if s.enabled])} of "
          f"{len(built.stages)} (the empty rules stage is left out of the chain)")
    base = min([await _run(_Baseline(), QUESTION, n) for _ in range(5)])
    miss = min([await _run(stage, QUESTION, n) for _ in range(5)])
    hit = min([await _run(stage, HIT, n // 10) for _ in range(5)])
    print(f"{len(settings.rules)} rules, CPU us per request (best of 5, loop subtracted):")
    print(f"  no rule matches: {(miss - base) * 1e6:7.1f}")
    print(f"  a rule answers:  {(hit - base) * 1e6:7.1f}  (usage counted offline)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20_000)
    asyncio.run(main(parser.parse_args().requests))
