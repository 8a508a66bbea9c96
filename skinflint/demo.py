"""``skinflint demo``: recorded real model outputs replayed through the real gateway.

The gateway runs in-process on the replay provider; the official ``openai`` SDK sends a mixed
workload over loopback HTTP. Every figure in the report comes from the gateway's own ledger
(spend, baseline) or from the recorded correctness labels of the answers it returned.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skinflint.config import settings_from_dict
from skinflint.providers.replay import ReplayProvider, ReplaySample
from skinflint.server.run import BackgroundServer
from skinflint.storage.ledger import SQLiteLedger

__all__ = ["PREMIUM_MODEL", "build_workload", "format_demo_rows", "run_demo"]

PREMIUM_MODEL = "gpt-4-1106-preview"
LATENCY_SCALE = 0.05  # recorded-model latencies are replayed at 1/20th so the demo takes seconds
REPEAT_SHARE = 0.3  # share of requests that repeat an earlier question, as FAQ traffic does
STREAM_SHARE = 0.2

Progress = Callable[[int, int], None]


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
    weights = [1 / (rank + 1) for rank in range(len(pool))]  # Zipf: a few FAQs dominate
    repeats = rng.choices(pool, weights=weights, k=n - len(pool))
    order = pool + repeats
    rng.shuffle(order)
    return [(s, rng.random() < STREAM_SHARE) for s in order]


async def _send(client: Any, sample: ReplaySample, stream: bool) -> tuple[str, str, str, float]:
    started = time.perf_counter()
    messages = [{"role": "user", "content": sample.prompt}]
    if stream:
        raw = await client.chat.completions.with_raw_response.create(
            model=PREMIUM_MODEL, messages=messages, temperature=0, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
    else:
        raw = await client.chat.completions.with_raw_response.create(
            model=PREMIUM_MODEL, messages=messages, temperature=0
        )
        text = raw.parse().choices[0].message.content or ""
    elapsed = (time.perf_counter() - started) * 1000
    return (
        text,
        raw.headers.get("x-skinflint-model", ""),
        raw.headers.get("x-skinflint-cache", ""),
        elapsed,
    )


async def _drive(
    base_url: str,
    workload: list[tuple[ReplaySample, bool]],
    concurrency: int,
    on_progress: Progress | None,
) -> list[tuple[ReplaySample, str, str, float]]:
    from openai import AsyncOpenAI

    results: list[tuple[ReplaySample, str, str, float]] = []
    gate = asyncio.Semaphore(concurrency)
    async with AsyncOpenAI(base_url=base_url, api_key="demo", max_retries=0, timeout=60) as client:

        async def one(sample: ReplaySample, stream: bool) -> None:
            async with gate:
                _, model, cache, ms = await _send(client, sample, stream)
            results.append((sample, model, cache, ms))
            if on_progress:
                on_progress(len(results), len(workload))

        await asyncio.gather(*(one(s, st) for s, st in workload))
    return results


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * q), len(ordered) - 1)] if ordered else 0.0


def run_demo(
    *,
    requests: int = 400,
    concurrency: int = 16,
    seed: int = 7,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    replay = ReplayProvider(latency_scale=LATENCY_SCALE)
    workload = build_workload(replay.samples(), requests, seed)
    with tempfile.TemporaryDirectory(prefix="skinflint-demo-") as tmp:
        db = str(Path(tmp) / "skinflint.db")
        settings = settings_from_dict(
            {
                "providers": {"replay": {"kind": "replay", "latency_scale": LATENCY_SCALE}},
                "default_provider": "replay",
                "baseline_model": PREMIUM_MODEL,
                "storage": {"sqlite_path": db},
            },
            env={},
        )
        started = time.perf_counter()
        with BackgroundServer(settings) as server:
            results = asyncio.run(_drive(server.base_url, workload, concurrency, on_progress))
        wall = time.perf_counter() - started
        ledger = SQLiteLedger(db)
        rows = list(ledger.query())
        ledger.close()
    return _summarise(replay, results, rows, wall)


def _summarise(
    replay: ReplayProvider,
    results: list[tuple[ReplaySample, str, str, float]],
    rows: list[Any],
    wall: float,
) -> dict[str, Any]:
    baseline_quality = statistics.fmean(
        replay.correctness(s.prompt, PREMIUM_MODEL) or 0 for s, *_ in results
    )
    quality = statistics.fmean(replay.correctness(s.prompt, m) or 0 for s, m, *_ in results)
    baseline = sum(r.baseline_cost_usd or 0.0 for r in rows)
    spend = sum(r.cost_usd or 0.0 for r in rows)
    hits = sum(1 for *_, cache, _ in results if cache == "hit-exact")
    latencies = [ms for *_, ms in results]
    return {
        "requests": len(results),
        "unique_prompts": len({s.id for s, *_ in results}),
        "ledger_rows": len(rows),
        "baseline": {"model": PREMIUM_MODEL, "cost_usd": baseline, "quality": baseline_quality},
        "strategies": [
            {
                "name": "exact cache",
                "cost_usd": spend,
                "hits": hits,
                "cut": 1 - spend / baseline if baseline else 0.0,
            }
        ],
        "skinflint": {"cost_usd": spend, "quality": quality},
        "cut": 1 - spend / baseline if baseline else 0.0,
        "quality_retained": quality / baseline_quality if baseline_quality else 1.0,
        "latency_ms": {"p50": _percentile(latencies, 0.5), "p95": _percentile(latencies, 0.95)},
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
        rows.append(
            (f"with {s['name']} ({s['hits']} hits)", f"${s['cost_usd']:.4f}  cut {s['cut']:.1%}")
        )
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
    return rows
