"""``skinflint demo``: recorded real model outputs replayed through the real gateway.

The gateway runs in-process on the replay provider with the shipped route ``auto`` (task
classification, cheap-first cascades), the exact cache and the semantic cache; the official
``openai`` SDK sends a mixed workload over loopback HTTP. Spend and savings come from the
gateway's own ledger; quality is the recorded correctness of the answers it returned.

A share of the workload (:data:`DEFERRED_SHARE`) is a nightly evaluation no one waits on: the
feature ``nightly-eval``, configured ``deferrable``, so the gateway answers those requests
``202`` with a job id, sends them through the replay provider's batch API (each line answered
with its recording) and serves each answer at ``GET /v1/skinflint/jobs/{id}``, which the demo
polls. They ask :data:`PREMIUM_MODEL` by name: a deferred request cannot name a route (its model
is chosen per request), and a job whose answers are read the next morning has no reason to
trade quality for price, since the batch API halves the premium model's price anyway. They
are distinct questions (an evaluation set, not repeats), never streamed, and neither read nor
fill the caches (a deferred request skips them), so they wait for no other request. Their
ledger rows (strategy ``batch``) are priced at the batch price against the real-time price;
their recorded correctness counts in the quality figures as any other answer's does. The
batching window and polling are a fraction of a second, so the demo still takes seconds.

The figures depend only on the seed. Requests run ``concurrency`` at a time, but one that the
caches could answer from an earlier request (the same prompt, or a question the semantic cache
could find similar) is sent only once that earlier one has been answered and stored, as when
real repeats arrive minutes or days apart; otherwise whether it hit would depend on which
request happened to finish first.

Compression, token budgets, rules and in-prompt batching (``batch_map``) stay off: the replay
provider finds a recording by the exact prompt, so a compressed prompt, or several questions
packed into one prompt, has no recorded answer (inventing one would fake the quality); a
recorded answer cut at a token cap has no correctness label; and no benchmark question has a
deterministic answer a rule could give. Tokens and dollars saved per strategy
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
import orjson

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
    "DEFERRED_FEATURE",
    "DEFERRED_SHARE",
    "LATENCY_SPEEDUP",
    "PREMIUM_MODEL",
    "ROUTE",
    "STRATEGIES",
    "Request",
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
DEFERRED_SHARE = 0.15  # share of requests from a nightly evaluation no one waits on
DEFERRED_FEATURE = "nightly-eval"
#: Deferred requests are gathered this long before a provider batch is sent, and submitted
#: batches polled this often: a fraction of a second, so the demo takes seconds.
BATCH_WINDOW_SECONDS = 0.5
BATCH_POLL_SECONDS = 0.1
JOB_POLL_SECONDS = 0.2  # how often the demo asks whether a deferred request is answered

#: What answered a request, in the order the pipeline tries them: a provider's batch API
#: (deferred requests: their stage comes before the caches), the exact cache, the semantic
#: cache, a task's cheap-first cascade, or the one model a task is routed to.
STRATEGIES = ("batch", "exact_cache", "semantic_cache", "cascade", "routed")

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class Request:
    """One request of the workload: ``deferred`` ones are the nightly evaluation's (feature
    :data:`DEFERRED_FEATURE`, model :data:`PREMIUM_MODEL`, never streamed); the others ask
    route :data:`ROUTE`."""

    sample: ReplaySample
    stream: bool = False
    deferred: bool = False


Workload = list[Request]


@dataclass(frozen=True, slots=True)
class Answered:
    sample: ReplaySample
    model: str  # x-skinflint-model (a job's answer's model): the recorded model that answered
    cache: str
    route: str
    ms: float
    content: str  # the answer text served
    deferred: bool = False


def build_workload(samples: list[ReplaySample], n: int, seed: int) -> Workload:
    """``n`` requests: distinct questions from every benchmark, a share of them asked again
    (popular ones more often), some streamed; and among them, :data:`DEFERRED_SHARE` of
    the ``n`` deferred: distinct questions asked by no other request, with a recorded answer
    of :data:`PREMIUM_MODEL`. Deterministic for a seed."""
    rng = random.Random(seed)
    deferred = round(n * DEFERRED_SHARE) if n > 1 else 0
    interactive = n - deferred
    unique = max(1, round(interactive * (1 - REPEAT_SHARE)))
    by_eval: dict[str, list[ReplaySample]] = {}
    for s in samples:
        by_eval.setdefault(s.eval, []).append(s)
    pool: list[ReplaySample] = []
    for group in by_eval.values():
        pool.extend(rng.sample(group, min(len(group), unique // len(by_eval) + 1)))
    rng.shuffle(pool)
    pool = pool[:unique]
    weights = [(rank + 1) ** -0.8 for rank in range(len(pool))]  # Zipf-like: a few FAQs lead
    order = pool + rng.choices(pool, weights=weights, k=interactive - len(pool))
    rng.shuffle(order)
    live = [Request(s, rng.random() < STREAM_SHARE) for s in order]
    nightly = [Request(s, deferred=True) for s in _evaluation_set(samples, pool, deferred, rng)]
    at = set(rng.sample(range(n), deferred))
    live_it, nightly_it = iter(live), iter(nightly)
    return [next(nightly_it) if i in at else next(live_it) for i in range(n)]


def _evaluation_set(samples: list[ReplaySample], asked: list[ReplaySample], n: int,
                    rng: random.Random) -> list[ReplaySample]:
    """``n`` questions with a recorded answer of :data:`PREMIUM_MODEL`: distinct, and none of
    ``asked`` while there are enough others (a workload bigger than the recordings repeats)."""
    answered = [s for s in samples if s.responses.get(PREMIUM_MODEL)]
    ids = {s.id for s in asked}
    unasked = [s for s in answered if s.id not in ids]
    if len(unasked) >= n:
        return rng.sample(unasked, n)
    return rng.choices(answered, k=n)


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


async def _defer(client: Any, sample: ReplaySample) -> dict[str, Any]:
    """Ask for ``sample`` as the nightly evaluation does; the job the gateway accepted."""
    raw = await client.chat.completions.with_raw_response.create(
        model=PREMIUM_MODEL, messages=[{"role": "user", "content": sample.prompt}],
        temperature=0, extra_headers={"x-skinflint-feature": DEFERRED_FEATURE},
    )
    if raw.status_code != 202:
        raise RuntimeError(f"a deferred request was answered {raw.status_code}, not 202")
    job: dict[str, Any] = orjson.loads(raw.content)
    return job


async def _collect(client: Any, sample: ReplaySample, job: dict[str, Any],
                   started: float) -> Answered:
    """Poll ``job`` until it is finished; its answer (none when it failed)."""
    while job["status"] not in ("completed", "failed", "cancelled"):
        await asyncio.sleep(JOB_POLL_SECONDS)
        job = await client.get(f"/skinflint/jobs/{job['id']}", cast_to=object)
    response = job.get("response") or {}
    choices = response.get("choices") or [{}]
    content = (choices[0].get("message") or {}).get("content") or ""
    return Answered(sample, str(response.get("model", "")), "", "",
                    (time.perf_counter() - started) * 1000, content, deferred=True)


async def _drive(
    base_url: str,
    workload: Workload,
    order: RequestOrder,
    concurrency: int,
    on_progress: Progress | None,
) -> list[Answered]:
    """Every request, ``concurrency`` at a time (a deferred one while being accepted, not
    while its answer is awaited), each once planned and once the requests it waits for have
    finished; the answers in workload order."""
    from openai import AsyncOpenAI

    n = len(workload)
    live = [i for i, r in enumerate(workload) if not r.deferred]
    answers: list[Answered | None] = [None] * n
    waits: dict[int, tuple[int, ...]] = {}
    planned, finished = [asyncio.Event() for _ in workload], [asyncio.Event() for _ in workload]
    done = 0
    gate = asyncio.Semaphore(concurrency)

    async def plan() -> None:
        prompts = [workload[i].sample.prompt for i in live]
        for start in range(0, len(live), PLAN_BATCH):
            found = await asyncio.to_thread(order.extend, prompts[start:start + PLAN_BATCH])
            for k, before in enumerate(found, start):
                waits[live[k]] = tuple(live[j] for j in before)
                planned[live[k]].set()

    async with AsyncOpenAI(base_url=base_url, api_key="demo", max_retries=0, timeout=60) as client:

        async def ask(i: int, request: Request) -> Answered:
            if request.deferred:
                started = time.perf_counter()
                async with gate:
                    job = await _defer(client, request.sample)
                return await _collect(client, request.sample, job, started)
            await planned[i].wait()
            for j in waits[i]:
                await finished[j].wait()
            async with gate:
                return await _send(client, request.sample, request.stream)

        async def one(i: int, request: Request) -> None:
            nonlocal done
            answers[i] = await ask(i, request)
            finished[i].set()
            done += 1
            if on_progress:
                on_progress(done, n)

        await asyncio.gather(plan(), *(one(i, r) for i, r in enumerate(workload)))
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
    raw["batching"] = {"window_seconds": BATCH_WINDOW_SECONDS,
                       "poll_seconds": BATCH_POLL_SECONDS,
                       "features": {DEFERRED_FEATURE: {"deferrable": True}}}
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
    if not model:  # a deferred request whose job failed: no answer
        return 0
    if answered.cache == "hit-semantic":
        return replay.correctness(prompt, model, answered.content) or 0
    return replay.correctness(prompt, model) or 0


def _strategy(row: LedgerRecord) -> str:
    if row.strategy == "batch":
        return "batch"
    if row.cache_status == "hit-exact":
        return "exact_cache"
    if row.cache_status == "hit-semantic":
        return "semantic_cache"
    return "cascade" if "tier=" in row.route else "routed"


def _strategies(rows: list[LedgerRecord], saving: float) -> list[dict[str, Any]]:
    """Each strategy's requests and saving (see :mod:`skinflint.analytics.savings`): dollars
    are the baseline cost of the requests it answered less what they cost, cascade tiers that
    did not answer included (the ledger's saving); tokens are those no provider processed
    (a cache hit's whole call), less what the tiers a cascade escalated from processed. A
    batch line saves price only: its real-time price less its batch price, no token."""
    saved = {s.strategy: s for s in ledger_savings(rows, name=_strategy)}
    out = []
    for name in STRATEGIES:
        s = saved.get(name) or Saved(name)
        out.append({**s.as_dict(), "saving_usd": s.usd,
                    "share": s.usd / saving if saving else 0.0})
    return out


def _answered_by(answers: list[Answered]) -> list[dict[str, Any]]:
    """Who answered the requests the caches did not: task (``batch API`` for the deferred
    ones), model and cascade tier."""
    misses = [a for a in answers if not a.cache.startswith("hit")]
    counts = Counter(
        (
            "batch API" if a.deferred else a.route.split("task=")[-1].split(";")[0],
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
        "deferred": sum(a.deferred for a in answers),
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
    """Latencies of the requests answered in real time; a deferred one's answer waits for its
    batch on purpose (``deferred_ms``: from acceptance to the answer read)."""
    latencies = [a.ms for a in answers if not a.deferred]
    waits = [a.ms for a in answers if a.deferred]
    return {
        "latency_ms": {"p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95)},
        "deferred_ms": {"p50": percentile(waits, 0.5), "p95": percentile(waits, 0.95)},
        "latency_speedup": LATENCY_SPEEDUP,
        "wall_seconds": wall,
    }
