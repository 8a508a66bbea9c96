"""``skinflint demo``: recorded real model outputs replayed through the real gateway.

The gateway runs in-process on the replay provider with the shipped route ``auto`` (task
classification, cheap-first cascades), the exact cache and the semantic cache; the official
``openai`` SDK sends a mixed workload over loopback HTTP. Spend and savings come from the
gateway's own ledger; quality is the recorded correctness of the answers it returned.

The figures depend only on the seed. Requests run ``concurrency`` at a time, but one that the
caches could answer from an earlier request (the same prompt, or a question the semantic cache
could find similar) is sent only once that earlier one has been answered and stored, as when
real repeats arrive minutes or days apart; otherwise whether it hit would depend on which
request happened to finish first.

Compression, token budgets and rules stay off: the replay provider finds a recording by the
exact prompt, so a compressed prompt has no recorded answer (inventing one would fake the
quality); a recorded answer cut at a token cap has no correctness label; and no benchmark
question has a deterministic answer a rule could give. Tokens and dollars saved per strategy
follow :mod:`skinflint.analytics.savings`.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from skinflint.analytics.evaluation import default_replay_config
from skinflint.analytics.report import percentile, read_records
from skinflint.analytics.savings import Saved, ledger_savings, token_totals
from skinflint.config import Settings, settings_from_dict
from skinflint.embed import Embedder, Vectors, load_embedder
from skinflint.models import LedgerRecord
from skinflint.pipeline.cache import semantic_setting, split_question
from skinflint.providers.replay import ReplayProvider, ReplaySample
from skinflint.server.run import BackgroundServer

__all__ = [
    "LATENCY_SPEEDUP",
    "PREMIUM_MODEL",
    "ROUTE",
    "STRATEGIES",
    "RequestOrder",
    "build_workload",
    "run_demo",
]

PREMIUM_MODEL = "gpt-4-1106-preview"
ROUTE = "auto"
LATENCY_SPEEDUP = 20  # simulated model latencies run 20 times faster so the demo takes seconds
REPEAT_SHARE = 0.3  # share of requests that repeat an earlier question, as FAQ traffic does
STREAM_SHARE = 0.2
# Questions this much below the similarity threshold count as possible matches too when
# requests are ordered, so that float rounding in the embedder can never decide the order.
SIMILARITY_MARGIN = 0.01
PLAN_BATCH = 32  # requests planned at a time

#: What answered a request, in the order the pipeline tries them: the exact cache, the
#: semantic cache, a task's cheap-first cascade, or the one model a task is routed to.
STRATEGIES = ("exact_cache", "semantic_cache", "cascade", "routed")

Progress = Callable[[int, int], None]
Workload = list[tuple[ReplaySample, bool]]


@dataclass(frozen=True, slots=True)
class Answered:
    sample: ReplaySample
    model: str  # x-skinflint-model: the recorded model whose answer came back
    cache: str
    route: str
    ms: float
    content: str  # the answer text served


def build_workload(samples: list[ReplaySample], n: int, seed: int) -> Workload:
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


class RequestOrder:
    """Which earlier requests each request of a workload waits for, worked out in workload
    order a batch at a time, so that the first requests start before the last are planned.

    A request waits for the latest earlier request with the same prompt and with each prompt
    the semantic cache could compare it with (every demo request has the same model,
    parameters and scope): the same context before the question (see
    :func:`split_question`) and a question whose similarity reaches the threshold less
    :data:`SIMILARITY_MARGIN` (the verifier is not applied: this is what the cache may look
    at, not what it serves). Those waited for the ones before them in turn, so every earlier
    request that could answer a request has finished when it starts."""

    def __init__(self, embedder: Embedder, threshold: float, max_question_chars: int) -> None:
        self._embedder = embedder
        self._floor = threshold - SIMILARITY_MARGIN
        self._max_chars = max_question_chars
        self._groups: dict[str, tuple[list[str], Vectors]] = {}  # context -> prompts, vectors
        self.similar: dict[str, set[str]] = {}
        self._latest: dict[str, int] = {}  # prompt -> its latest request so far
        self._planned = 0

    def extend(self, prompts: Sequence[str]) -> list[tuple[int, ...]]:
        """The earlier requests each of the next ``len(prompts)`` requests waits for."""
        self._compare([p for p in dict.fromkeys(prompts) if p not in self._latest])
        waits: list[tuple[int, ...]] = []
        for prompt in prompts:
            related = (prompt, *self.similar.get(prompt, ()))
            waits.append(tuple(sorted({self._latest[p] for p in related if p in self._latest})))
            self._latest[prompt] = self._planned
            self._planned += 1
        return waits

    def _compare(self, prompts: list[str]) -> None:
        """Embed new prompts' questions and note which earlier or new ones come close."""
        by_context: dict[str, list[tuple[str, str]]] = {}
        for prompt in prompts:
            split = split_question(prompt, self._max_chars)
            if split is not None and split[1].strip():
                by_context.setdefault(split[0], []).append((prompt, split[1]))
        for context, members in by_context.items():
            names, vectors = self._groups.get(context, ([], np.empty((0, self._embedder.dim))))
            names = names + [prompt for prompt, _ in members]
            fresh = self._embedder.embed([question for _, question in members])
            vectors = np.vstack([vectors, fresh]).astype(np.float32)
            self._groups[context] = (names, vectors)
            first = len(names) - len(members)
            for row, col in zip(*np.nonzero(fresh @ vectors.T >= self._floor), strict=True):
                a, b = names[first + row], names[col]
                if a != b:
                    self.similar.setdefault(a, set()).add(b)
                    self.similar.setdefault(b, set()).add(a)


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
    workload: Workload,
    order: RequestOrder,
    concurrency: int,
    on_progress: Progress | None,
) -> list[Answered]:
    """Every request, ``concurrency`` at a time, each once planned and once the requests it
    waits for have finished; the answers in workload order."""
    from openai import AsyncOpenAI

    n = len(workload)
    answers: list[Answered | None] = [None] * n
    waits: list[tuple[int, ...]] = []
    planned, finished = [asyncio.Event() for _ in workload], [asyncio.Event() for _ in workload]
    done = 0
    gate = asyncio.Semaphore(concurrency)

    async def plan() -> None:
        prompts = [sample.prompt for sample, _ in workload]
        for start in range(0, n, PLAN_BATCH):
            waits.extend(await asyncio.to_thread(order.extend, prompts[start:start + PLAN_BATCH]))
            for i in range(start, len(waits)):
                planned[i].set()

    async with AsyncOpenAI(base_url=base_url, api_key="demo", max_retries=0, timeout=60) as client:

        async def one(i: int, sample: ReplaySample, stream: bool) -> None:
            nonlocal done
            await planned[i].wait()
            for j in waits[i]:
                await finished[j].wait()
            async with gate:
                answers[i] = await _send(client, sample, stream)
            finished[i].set()
            done += 1
            if on_progress:
                on_progress(done, n)

        await asyncio.gather(plan(), *(one(i, s, st) for i, (s, st) in enumerate(workload)))
    return [a for a in answers if a is not None]


def _order(settings: Settings) -> RequestOrder:
    cfg = settings.cache.semantic
    threshold, _ = semantic_setting(settings, route=ROUTE)
    return RequestOrder(load_embedder(cfg.embedder), threshold, cfg.max_question_chars)


def run_demo(
    *,
    requests: int = 1000,
    concurrency: int = 16,
    seed: int = 7,
    on_progress: Progress | None = None,
    ledger: Path | None = None,
) -> dict[str, Any]:
    """Replay ``requests`` requests built from ``seed`` through a gateway of its own; the
    summary (see ``skinflint demo --json``). Every figure but the timings depends only on
    ``requests`` and ``seed``. ``ledger``: a SQLite file to keep the run's ledger in (added
    to when it exists; the summary counts this run's rows only), else a temporary one."""
    with tempfile.TemporaryDirectory(prefix="skinflint-demo-") as tmp:
        db = ledger if ledger is not None else Path(tmp) / "skinflint.db"
        return _run_demo(requests, concurrency, seed, on_progress, db)


def _run_demo(requests: int, concurrency: int, seed: int, on_progress: Progress | None,
              db: Path) -> dict[str, Any]:
    replay = ReplayProvider()
    workload = build_workload(replay.samples(), requests, seed)
    raw = default_replay_config()
    raw["providers"]["replay"]["latency_scale"] = 1 / LATENCY_SPEEDUP
    raw["cache"] = {"semantic": {"enabled": True}}
    settings = settings_from_dict({**raw, "storage": {"sqlite_path": str(db)}}, env={})
    since = time.time()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as pool:
        order = pool.submit(_order, settings)  # loads the embedder while the gateway starts
        with BackgroundServer(settings) as server:
            answers = asyncio.run(
                _drive(server.base_url, workload, order.result(), concurrency, on_progress)
            )
    wall = time.perf_counter() - started
    rows = read_records(settings, since=since)
    return {"seed": seed, **_summarise(replay, answers, rows), **_timings(answers, wall)}


def _correct(replay: ReplayProvider, answered: Answered) -> int:
    """1 when the answer served is right for the question asked. A semantic hit serves the
    answer recorded for another prompt: it is graded as an answer to this one (an identical
    recorded response's label, or the letter of a multiple-choice answer), and counts as wrong
    when it cannot be graded."""
    prompt, model = answered.sample.prompt, answered.model
    if answered.cache == "hit-semantic":
        return replay.correctness(prompt, model, answered.content) or 0
    return replay.correctness(prompt, model) or 0


def _strategy(row: LedgerRecord) -> str:
    if row.cache_status == "hit-exact":
        return "exact_cache"
    if row.cache_status == "hit-semantic":
        return "semantic_cache"
    return "cascade" if "tier=" in row.route else "routed"


def _strategies(rows: list[LedgerRecord], saving: float) -> list[dict[str, Any]]:
    """Each strategy's requests and saving (see :mod:`skinflint.analytics.savings`): dollars
    are the baseline cost of the requests it answered less what they cost, cascade tiers that
    did not answer included (the ledger's saving); tokens are those no provider processed
    (a cache hit's whole call), less what the tiers a cascade escalated from processed."""
    saved = {s.strategy: s for s in ledger_savings(rows, name=_strategy)}
    out = []
    for name in STRATEGIES:
        s = saved.get(name) or Saved(name)
        out.append({**s.as_dict(), "saving_usd": s.usd,
                    "share": s.usd / saving if saving else 0.0})
    return out


def _answered_by(answers: list[Answered]) -> list[dict[str, Any]]:
    """Who answered the requests the caches did not: task, model and cascade tier."""
    misses = [a for a in answers if not a.cache.startswith("hit")]
    counts = Counter(
        (
            a.route.split("task=")[-1].split(";")[0],
            a.model,
            a.route.split("tier=")[-1] if "tier=" in a.route else "",
        )
        for a in misses
    )
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [
        {"task": task, "model": model, "tier": tier, "requests": n, "share": n / len(misses)}
        for (task, model, tier), n in ranked
    ]


def _summarise(
    replay: ReplayProvider, answers: list[Answered], rows: list[LedgerRecord]
) -> dict[str, Any]:
    baseline_quality = statistics.fmean(
        replay.correctness(a.sample.prompt, PREMIUM_MODEL) or 0 for a in answers
    )
    quality = statistics.fmean(_correct(replay, a) for a in answers)
    answered = [r for r in rows if r.strategy != "cascade_escalated"]
    baseline = math.fsum(r.baseline_cost_usd or 0.0 for r in answered)
    spend = math.fsum(r.cost_usd or 0.0 for r in rows)
    return {
        "requests": len(answers),
        "unique_prompts": len({a.sample.id for a in answers}),
        "ledger_rows": len(rows),
        "baseline": {"model": PREMIUM_MODEL, "cost_usd": baseline, "quality": baseline_quality},
        "skinflint": {"cost_usd": spend, "quality": quality},
        "saving_usd": baseline - spend,
        "cut": 1 - spend / baseline if baseline else 0.0,
        "quality_retained": quality / baseline_quality if baseline_quality else 1.0,
        "tokens": token_totals(rows),
        "strategies": _strategies(rows, baseline - spend),
        "answered_by": _answered_by(answers),
    }


def _timings(answers: list[Answered], wall: float) -> dict[str, Any]:
    latencies = [a.ms for a in answers]
    return {
        "latency_ms": {"p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95)},
        "latency_speedup": LATENCY_SPEEDUP,
        "wall_seconds": wall,
    }
