"""Compress stage benchmark: tokens removed by few-shot pruning, and the stage's CPU per request.

Data: the 5-shot prompts of RouterBench (``shared/data/routerbench/arc_challenge_train.csv``
and ``winograde_train.csv``; each ``prompt`` is a Python-list literal holding one string of
five worked examples then the question; see ``shared/data/README.md`` for their provenance).
Each prompt is sent as one user message through the real :class:`Compress` stage configured
``few_shot: {keep: 2}`` (word-bag similarity: the embedder is not loaded here), and the run
reports input tokens before and after (``TokenCounter.count_messages`` for gpt-4o) and checks
that the question (the text after the prompt's last blank line) ends the compressed prompt
byte for byte.

CPU, per call of the stage, p50/p99, at about 2k, 4k and 8k tokens, per strategy: ``few_shot``
(``keep: 2``) on prompts of distinct worked examples (the questions of successive prompts, each
answered by a letter) before one more question; ``all`` (``few_shot`` + ``context: {max_tokens:
2000}`` + ``history: {max_tokens: 4000}``) on the same; ``context_500`` (``context: {max_tokens:
500}``) on prompts made of distinct questions (each prompt's last) as context paragraphs before
one more question; ``history_1000`` on a conversation of whole prompts each answered by one
letter; ``system_prompt`` on a system prompt of worked examples with trailing spaces and every
paragraph twice. These forget every remembered text (word bags, line sets, message beginnings,
the token counts of paragraphs) before each call: nothing is reused, the worst case.
``few_shot_repeated`` and ``context_500_repeated`` send the same worked examples (documents) in
every request with a new question each, as a template does, and keep what was remembered.
Three figures:

* ``loop``: the event loop thread's CPU time (``time.thread_time``) during the call: what the
  request's own task costs on the loop;
* ``stage``: ``loop`` less the loop's CPU time while the downstream ran (the stand-in upstream's
  own cost and, while it sleeps, the loop's): the stage's own work alone;
* ``total``: the process's CPU time (``time.process_time``, every thread) during the call: the
  loop's plus the counting thread's (the exact tokens saved are counted there while the call
  is under way).

The call's downstream is an upstream that answers after ``--upstream-ms`` (sleeping, no CPU), as
a provider does; ``harness_loop_ms`` is the loop's CPU for that downstream alone (included in
``loop``, not in ``stage``). The CPU idles while it sleeps, and on a virtual machine the same
work then costs up to three times as much (caches gone cold). ``--busy-upstream`` makes it
spin instead, as other requests keep a loaded gateway's CPU busy: ``stage`` then shows the same
work with warm caches.
The unconfigured cost is that of a request whose feature has no setting, while others do (a lookup)
and of a gateway without a ``compression`` section (the stage is disabled: the pipeline never
calls it, so that cost is zero).

Each run appends one JSON object to ``bench/results/compress.jsonl`` and prints a summary.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import csv
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from skinflint import compression as cx
from skinflint.config import CompressionPolicy, Scoped
from skinflint.metrics import Metrics
from skinflint.pipeline.compress import Compress
from skinflint.pipeline.context import Reply, RequestContext
from skinflint.server.run import GC_THRESHOLDS
from skinflint.tokens import TokenCounter

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "routerbench"
FILES = ("arc_challenge_train.csv", "winograde_train.csv")
RESULTS = Path(__file__).resolve().parent / "results" / "compress.jsonl"
MODEL = "gpt-4o"
TOKENS = TokenCounter()
FEW_SHOT = {"few_shot": {"keep": 2}}
EVERYTHING = {**FEW_SHOT, "context": {"max_tokens": 2000}, "history": {"max_tokens": 4000}}


def load_prompts(data: Path) -> dict[str, list[str]]:
    csv.field_size_limit(1 << 30)
    found: dict[str, list[str]] = {}
    for name in FILES:
        with (data / name).open(newline="") as f:
            found[name] = [ast.literal_eval(row["prompt"])[0] for row in csv.DictReader(f)]
    return found


def stage(policy: dict[str, Any]) -> Compress:
    scoped = Scoped[CompressionPolicy].model_validate({"features": {"quiz": policy}})
    return Compress(scoped, TOKENS, Metrics())


def request(text: str | list[dict[str, str]], feature: str = "quiz") -> RequestContext:
    messages = [{"role": "user", "content": text}] if isinstance(text, str) else text
    body = {"model": MODEL, "messages": messages}
    return RequestContext("r", 0.0, 0.0, "chat", b"", {}, body=body, feature=feature,
                          requested_model=MODEL)


UPSTREAM_S = 0.02
BUSY = False  # the stand-in upstream spins (keeps the CPU busy) instead of sleeping
_downstream = [0.0]  # the loop's CPU time spent in the downstream, in s


async def _answer(ctx: RequestContext) -> Reply:
    return Reply(body={})


async def _upstream(ctx: RequestContext) -> Reply:
    start = time.thread_time()
    if BUSY:
        end = time.perf_counter() + UPSTREAM_S
        while time.perf_counter() < end:
            pass
    else:
        await asyncio.sleep(UPSTREAM_S)
    _downstream[0] += time.thread_time() - start
    return Reply(body={})


async def run_once(compress: Compress, ctx: RequestContext) -> tuple[float, float, float]:
    """The loop thread's CPU time for ``ctx``, the same without the downstream's, and the whole
    process's, in ms."""
    loop, total, _downstream[0] = time.thread_time(), time.process_time(), 0.0
    await compress(ctx, _upstream)
    loop, total = time.thread_time() - loop, time.process_time() - total
    return loop * 1e3, (loop - _downstream[0]) * 1e3, total * 1e3


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def few_shot_savings(prompts: dict[str, list[str]]) -> dict[str, Any]:
    compress, out = stage(FEW_SHOT), {}
    for name, texts in prompts.items():
        before = after = identical = pruned = 0
        cpu: list[float] = []
        for text in texts:
            ctx = request(text)
            cpu.append((await run_once(compress, ctx))[0])
            sent = ctx.body["messages"][0]["content"]
            question = text[text.rfind("\n\n") + 2:]
            identical += sent.endswith(question) and sent.count(question) >= 1
            pruned += ctx.compression is not None
            before += TOKENS.count_messages(MODEL, [{"role": "user", "content": text}])
            after += TOKENS.count_messages(MODEL, ctx.body["messages"])
        out[name] = {"prompts": len(texts), "pruned": pruned, "question_identical": identical,
                     "input_tokens_before": before, "input_tokens_after": after,
                     "reduction": round(1 - after / before, 4),
                     "loop_ms_p50": round(pct(cpu, 0.5), 4),
                     "loop_ms_p99": round(pct(cpu, 0.99), 4)}
    return out


def long_prompts(texts: list[str], size: int, count: int) -> list[str]:
    """``count`` prompts of about ``size`` tokens: the questions of successive prompts (each
    different), each answered by one letter, as worked examples before one more question."""
    questions = [t[t.rfind("\n\n") + 2:] for t in texts]
    built: list[str] = []
    at = 0
    while len(built) < count:
        parts: list[str] = []
        while TOKENS.count_text(MODEL, "\n\n".join(parts)) < size - 200:
            parts.append(f"{questions[at % len(questions)]}\n{'ABCD'[at % 4]}")
            at += 1
        built.append("\n\n".join([*parts, questions[at % len(questions)]]))
        at += 1
    return built


def documents(texts: list[str], size: int, count: int) -> list[str]:
    """``count`` prompts of about ``size`` tokens with no repeated example: the questions of
    successive prompts (each different) as paragraphs of context, then one more question."""
    questions = [t[t.rfind("\n\n") + 2:] for t in texts]
    built: list[str] = []
    at = 0
    while len(built) < count:
        parts: list[str] = []
        while TOKENS.count_text(MODEL, "\n\n".join(parts)) < size - 100:
            parts.append(questions[at % len(questions)])
            at += 1
        built.append("\n\n".join(parts))
    return built


def conversations(texts: list[str], size: int, count: int) -> list[list[dict[str, str]]]:
    """``count`` conversations of about ``size`` tokens: whole prompts as user turns, each
    answered by one letter, then one more prompt."""
    built: list[list[dict[str, str]]] = []
    at = 0
    while len(built) < count:
        turns: list[dict[str, str]] = []
        while TOKENS.count_messages(MODEL, turns) < size - 200:
            turns += [{"role": "user", "content": texts[at % len(texts)]},
                      {"role": "assistant", "content": "ABCD"[at % 4]}]
            at += 1
        built.append([*turns, {"role": "user", "content": texts[at % len(texts)]}])
    return built


def system_prompts(texts: list[str], size: int, count: int) -> list[list[dict[str, str]]]:
    """``count`` requests with a system prompt of about ``size`` tokens: the paragraphs of
    successive prompts, each with trailing spaces and sent twice, then a question."""
    built: list[list[dict[str, str]]] = []
    at = 0
    while len(built) < count:
        parts: list[str] = []
        while TOKENS.count_text(MODEL, "\n\n".join(parts)) < size - 200:
            text = texts[at % len(texts)]
            at += 1
            parts += [p.replace("\n", "  \n") for p in text.split("\n\n")] * 2
        question = texts[at % len(texts)]
        built.append([{"role": "system", "content": "\n\n\n".join(parts)},
                      {"role": "user", "content": question[question.rfind("\n\n") + 2:]}])
    return built


def reused(prompts: list[str]) -> list[str]:
    """``prompts`` all sent with the first one's worked examples (or context), each with its
    own last paragraph (the question): a template whose examples come back in every request."""
    shared = prompts[0][:prompts[0].rfind("\n\n") + 2]
    return [shared + p[p.rfind("\n\n") + 2:] for p in prompts]


Scenario = tuple[str, dict[str, Any], list[list[dict[str, str]]], bool]


def scenarios(texts: list[str], size: int, count: int) -> list[Scenario]:
    """(label, policy, requests, fresh): a fresh scenario forgets every remembered text before
    each call (nothing reused: the worst case); a ``_repeated`` one sends the same worked
    examples or documents in every request, as a template does, with a new question each."""
    shot_texts, doc_texts = long_prompts(texts, size, count), documents(texts, size, count)
    shots = [[{"role": "user", "content": t}] for t in shot_texts]
    docs = [[{"role": "user", "content": t}] for t in doc_texts]
    return [("few_shot", FEW_SHOT, shots, True),
            ("all", EVERYTHING, shots, True),
            ("context_500", {"context": {"max_tokens": 500}}, docs, True),
            ("history_1000", {"history": {"max_tokens": 1000}},
             conversations(texts, size, count), True),
            ("system_prompt", {"system_prompt": {"normalize": True}},
             system_prompts(texts, size, count), True),
            ("few_shot_repeated", FEW_SHOT,
             [[{"role": "user", "content": t}] for t in reused(shot_texts)], False),
            ("context_500_repeated", {"context": {"max_tokens": 500}},
             [[{"role": "user", "content": t}] for t in reused(doc_texts)], False)]


async def timed(compress: Compress, prompts: list[list[dict[str, str]]],
                fresh: bool) -> list[tuple[float, float, float]]:
    runs = []
    for messages in prompts:
        if fresh:
            cx.clear_caches()
            TOKENS.forget_parts()
        runs.append(await run_once(compress, request(messages)))
    return runs


async def cpu_by_size(texts: list[str], count: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size in (2000, 4000, 8000):
        for label, policy, prompts, fresh in scenarios(texts, size, count):
            compress = stage(policy)
            await timed(compress, prompts[:3], fresh)  # warm: first calls of a new stage, thread
            runs = await timed(compress, prompts, fresh)
            loop, own, total = ([r[i] for r in runs] for i in range(3))
            out[f"{size}/{label}"] = {"loop_ms_p50": round(pct(loop, 0.5), 4),
                                      "loop_ms_p99": round(pct(loop, 0.99), 4),
                                      "stage_ms_p50": round(pct(own, 0.5), 4),
                                      "stage_ms_p99": round(pct(own, 0.99), 4),
                                      "total_ms_p50": round(pct(total, 0.5), 4),
                                      "total_ms_p99": round(pct(total, 0.99), 4)}
    return out


async def harness_cost(calls: int) -> float:
    """The loop's CPU for the sleeping upstream alone, p50, in ms."""
    ctx, cpu = request("What is the capital of France?"), []
    for _ in range(calls):
        start = time.thread_time()
        await _upstream(ctx)
        cpu.append((time.thread_time() - start) * 1e3)
    return round(pct(cpu, 0.5), 4)


async def unconfigured_cost(calls: int) -> dict[str, Any]:
    compress, ctx = stage(FEW_SHOT), request("What is the capital of France?", "other")
    start = time.perf_counter()
    for _ in range(calls):
        await compress(ctx, _answer)
    other_feature = (time.perf_counter() - start) / calls * 1e3
    start = time.perf_counter()
    for _ in range(calls):
        await _answer(ctx)
    bare = (time.perf_counter() - start) / calls * 1e3
    disabled = Compress(Scoped[CompressionPolicy](), TOKENS, Metrics())
    return {"other_feature_ms": round(max(0.0, other_feature - bare), 6),
            "no_compression_section": "stage disabled (enabled=False): never called",
            "disabled": not disabled.enabled}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    global UPSTREAM_S, BUSY
    UPSTREAM_S, BUSY = args.upstream_ms / 1e3, args.busy_upstream
    if not args.data.exists():
        sys.exit(f"no RouterBench data at {args.data}: this benchmark needs shared/data")
    gc.set_threshold(*GC_THRESHOLDS)  # as the server runs
    load = _load()
    TOKENS.warm()
    prompts = load_prompts(args.data)
    savings = await few_shot_savings(prompts)
    everything = [t for texts in prompts.values() for t in texts]
    sizes = await cpu_by_size(prompts["arc_challenge_train.csv"], args.long)
    return {"ts": time.time(), "commit": _commit(), "machine": platform.machine(),
            "python": platform.python_version(), "few_shot_keep_2": savings,
            "total_reduction": round(1 - sum(s["input_tokens_after"] for s in savings.values())
                                     / sum(s["input_tokens_before"] for s in savings.values()), 4),
            "prompts": len(everything), "upstream_ms": UPSTREAM_S * 1e3,
            "busy_upstream": BUSY,
            "gc_thresholds": list(gc.get_threshold()), "load_at_start": load,
            "load_at_end": _load(),
            "harness_loop_ms": await harness_cost(200), "cpu_by_size": sizes,
            "unconfigured": await unconfigured_cost(args.calls)}


def _load() -> float:
    """The machine's 1-minute load average (other processes' CPU skews the percentiles)."""
    return round(os.getloadavg()[0], 2)


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False)
    return done.stdout.strip()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--long", type=int, default=200, help="prompts per size")
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--upstream-ms", type=float, default=20.0,
                        help="how long the stand-in upstream takes to answer")
    parser.add_argument("--busy-upstream", action="store_true",
                        help="the stand-in upstream spins instead of sleeping (warm caches)")
    result = asyncio.run(main(parser.parse_args()))
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=2))
