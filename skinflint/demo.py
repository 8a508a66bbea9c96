"""``skinflint demo``: recorded real model outputs replayed through the real gateway.

The gateway runs in-process on the replay provider with the shipped route ``auto`` (task
classification, cheap-first cascades), the exact cache and the semantic cache; the official
``openai`` SDK sends a mixed workload over loopback HTTP. Spend comes from the gateway's own
ledger; quality is the recorded correctness of the answers it returned.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skinflint.analytics.evaluation import default_replay_config
from skinflint.analytics.report import percentile
from skinflint.config import settings_from_dict
from skinflint.models import LedgerRecord
from skinflint.providers.replay import ReplayProvider, ReplaySample
from skinflint.server.run import BackgroundServer
from skinflint.storage.ledger import SQLiteLedger

__all__ = ["PREMIUM_MODEL", "ROUTE", "build_workload", "format_demo_rows", "run_demo"]

PREMIUM_MODEL = "gpt-4-1106-preview"
ROUTE = "auto"
LATENCY_SCALE = 0.05  # recorded-model latencies are replayed at 1/20th so the demo takes seconds
REPEAT_SHARE = 0.3  # share of requests that repeat an earlier question, as FAQ traffic does
STREAM_SHARE = 0.2

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class Answered:
    sample: ReplaySample
    model: str  # x-skinflint-model: the recorded model whose answer came back
    cache: str
    route: str
    ms: float
    content: str  # the answer text served


def build_workload(
    samples: list[ReplaySample], n: int, seed: int
) -> list[tuple[ReplaySample, bool]]:
    """``n`` requests: distinct questions from every benchmark, a share of them asked again
    (popular ones more often), some streamed. Deterministic for a seed."""
    rng = random.Random(seed)
    unique = max(1, round(n * (1 - REPEAT_SHARE)))
    by_eval: dict[str, list[ReplaySample]] = {}
    for s in samples:
        by_eval.setdefault(s.eval, []).append(s)
    pool: list[ReplaySample] = []
    for group in by_eval.values():
        pool.extend(rng.sample(group, min(len(group), unique // len(by_eval) + 1)))
    rng.shuffle(pool)
    pool = pool[:unique]
    weights = [(rank + 1) ** -0.8 for rank in range(len(pool))]  # Zipf-like: a few FAQs lead
    order = pool + rng.choices(pool, weights=weights, k=n - len(pool))
    rng.shuffle(order)
    return [(s, rng.random() < STREAM_SHARE) for s in order]


async def _send(client: Any, sample: ReplaySample, stream: bool) -> Answered:
    started = time.perf_counter()
    messages = [{"role": "user", "content": sample.prompt}]
    raw = await client.chat.completions.with_raw_response.create(
        model=ROUTE, messages=messages, temperature=0, stream=stream
    )
    if stream:
        content = "".join([
            c.choices[0].delta.content or "" async for c in raw.parse() if c.choices
        ])
    else:
        content = raw.parse().choices[0].message.content or ""
    h = raw.headers
    return Answered(
        sample,
        h.get("x-skinflint-model", ""),
        h.get("x-skinflint-cache", ""),
        h.get("x-skinflint-route", ""),
        (time.perf_counter() - started) * 1000,
        content,
    )


async def _drive(
    base_url: str,
    workload: list[tuple[ReplaySample, bool]],
    concurrency: int,
    on_progress: Progress | None,
) -> list[Answered]:
    from openai import AsyncOpenAI

    results: list[Answered] = []
    gate = asyncio.Semaphore(concurrency)
    async with AsyncOpenAI(base_url=base_url, api_key="demo", max_retries=0, timeout=60) as client:

        async def one(sample: ReplaySample, stream: bool) -> None:
            async with gate:
                results.append(await _send(client, sample, stream))
            if on_progress:
                on_progress(len(results), len(workload))

        await asyncio.gather(*(one(s, st) for s, st in workload))
    return results


def run_demo(
    *,
    requests: int = 1000,
    concurrency: int = 16,
    seed: int = 7,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    replay = ReplayProvider(latency_scale=LATENCY_SCALE)
    workload = build_workload(replay.samples(), requests, seed)
    raw = default_replay_config()
    raw["providers"]["replay"]["latency_scale"] = LATENCY_SCALE
    raw["cache"] = {"semantic": {"enabled": True}}
    with tempfile.TemporaryDirectory(prefix="skinflint-demo-") as tmp:
        db = str(Path(tmp) / "skinflint.db")
        settings = settings_from_dict({**raw, "storage": {"sqlite_path": db}}, env={})
        started = time.perf_counter()
        with BackgroundServer(settings) as server:
            results = asyncio.run(_drive(server.base_url, workload, concurrency, on_progress))
        wall = time.perf_counter() - started
        ledger = SQLiteLedger(db)
        rows = list(ledger.query())
        ledger.close()
    return _summarise(replay, results, rows, wall)


def _correct(replay: ReplayProvider, answered: Answered) -> int:
    """1 when the answer served is right for the question asked. A semantic hit serves the
    answer recorded for another prompt: it is graded as an answer to this one (an identical
    recorded response's label, or the letter of a multiple-choice answer), and counts as wrong
    when it cannot be graded."""
    prompt, model = answered.sample.prompt, answered.model
    if answered.cache == "hit-semantic":
        return replay.correctness(prompt, model, answered.content) or 0
    return replay.correctness(prompt, model) or 0


def _tier(route: str) -> str:
    return route.split("tier=")[-1] if "tier=" in route else "cache"


def _summarise(
    replay: ReplayProvider, results: list[Answered], rows: list[LedgerRecord], wall: float
) -> dict[str, Any]:
    baseline_quality = statistics.fmean(
        replay.correctness(a.sample.prompt, PREMIUM_MODEL) or 0 for a in results
    )
    quality = statistics.fmean(_correct(replay, a) for a in results)
    answered = [r for r in rows if r.strategy != "cascade_escalated"]
    baseline = sum(r.baseline_cost_usd or 0.0 for r in answered)
    # what the same traffic costs with the caches alone: every miss at the premium price
    cache_only = sum(r.baseline_cost_usd or 0.0 for r in answered
                     if not r.cache_status.startswith("hit"))
    spend = sum(r.cost_usd or 0.0 for r in rows)
    hits = sum(1 for a in results if a.cache == "hit-exact")
    semantic_hits = sum(1 for a in results if a.cache == "hit-semantic")
    misses = [a for a in results if not a.cache.startswith("hit")]
    latencies = [a.ms for a in results]
    return {
        "requests": len(results),
        "unique_prompts": len({a.sample.id for a in results}),
        "ledger_rows": len(rows),
        "baseline": {"model": PREMIUM_MODEL, "cost_usd": baseline, "quality": baseline_quality},
        "strategies": [
            {
                "name": "exact and semantic cache",
                "cost_usd": cache_only,
                "hits": hits,
                "semantic_hits": semantic_hits,
                "cut": 1 - cache_only / baseline if baseline else 0.0,
            },
            {
                "name": "caches + routing and cascades",
                "cost_usd": spend,
                "cut": 1 - spend / baseline if baseline else 0.0,
            },
        ],
        "tiers": {
            k: n / len(misses)
            for k, n in Counter(f"tier {_tier(a.route)}: {a.model}" for a in misses).most_common()
        },
        "skinflint": {"cost_usd": spend, "quality": quality},
        "cut": 1 - spend / baseline if baseline else 0.0,
        "quality_retained": quality / baseline_quality if baseline_quality else 1.0,
        "latency_ms": {"p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95)},
        "latency_scale": LATENCY_SCALE,
        "wall_seconds": wall,
    }


def format_demo_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    base = result["baseline"]
    rows = [
        ("requests (unique prompts)", f"{result['requests']} ({result['unique_prompts']})"),
        (
            f"baseline: every request to {base['model']}",
            f"${base['cost_usd']:.4f}  quality {base['quality']:.1%}",
        ),
    ]
    for s in result["strategies"]:
        hits = (f" ({s['hits']} exact, {s['semantic_hits']} semantic hits)"
                if "hits" in s else "")
        rows.append((f"with {s['name']}{hits}", f"${s['cost_usd']:.4f}  cut {s['cut']:.1%}"))
    rows += [
        ("total cut", f"{result['cut']:.1%}"),
        (
            "quality retained",
            f"{result['quality_retained']:.1%} "
            f"(mean correctness {result['skinflint']['quality']:.1%})",
        ),
        (
            "latency p50 / p95",
            f"{result['latency_ms']['p50']:.0f} / {result['latency_ms']['p95']:.0f} ms "
            f"(recorded latencies x{result['latency_scale']:g})",
        ),
        ("wall time", f"{result['wall_seconds']:.1f} s"),
    ]
    rows += [
        (f"  answered by {name}", f"{share:.1%} of misses")
        for name, share in result["tiers"].items()
    ]
    return rows
