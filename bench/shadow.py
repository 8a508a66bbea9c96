"""Shadow-evaluation guard benchmark: how many sampled requests the guard needs to switch a
degrading strategy off, and how often it switches off one that is not degrading.

The guard under test is the real :class:`skinflint.pipeline.shadow.ShadowGuard`, built with its
constructor and policy ``shadow: {sample: 1.0, floor: 0.9, judge: exact, min_samples: M}``,
in front of an in-process :class:`ShadowUpstream` whose shadow answer is the client's answer
with probability ``p`` (the strategy's true mean agreement) and another text otherwise, so the
``exact`` judge scores each sample 1 or 0. Each (p, M) is run ``--runs`` times (seeded: run
``i`` of a configuration draws its agreements from ``numpy.random.default_rng([p, M, i])``),
each run until the guard switches ``context`` off for the feature or ``--horizon`` sampled
requests have been scored. Reported per (p, M): the fraction of runs switched off, and the
median, p90 and max of the sampled requests it took (``>H``: not switched off within the
horizon), and whether that is within ``M``.

The guard's rule (:mod:`skinflint.pipeline.shadow_score`: a first check at ``M`` samples, then
testing by betting at every sample) is also replayed on the same agreement series by a
vectorised copy that reads its constants and the first check's limits from that module; the
bench checks that it switches off at the same sample as the real guard in every run, then uses
it, on ``--replay-runs`` seeded runs per figure, where the real guard would take too long. The
former rule (a rolling window of the last 200 scores, checked at every sample once it holds
``M``, against Hoeffding's one-sided upper 95% bound) is kept here only, replayed on the same
series, for comparison. Per rule and ``M``: the largest true agreement switched off within ``M``
samples in at least 90% of runs (0.01 grid); the median and p90 samples to switch-off at 0.8 and
0.85; the false switch-off rate at the floor (0.9) and at 0.95 within 1,000 and 10,000 samples;
and a drop that starts after 2,000 samples at 0.97 (to 0.8 and to 0.85): the share switched off
before it (false) and the samples to switch-off after it. The best any level-5% single check can
do at ``M`` samples (an exact binomial test at the floor) is computed exactly, as a reference.

End to end: a real gateway (:class:`skinflint.server.run.BackgroundServer`) in front of the
fake upstream of ``tests/fake_upstream.py``, which echoes the last user message, so trimming the
context (``context: {max_tokens: 200}``) changes every answer; with ``shadow: {sample: 1.0,
floor: 0.9, judge: exact, min_samples: N}`` the openai SDK sends one request at a time, waits
for its sample to be scored (``GET /api/shadow``), and the bench reports after which request
the strategy was switched off.

Each run (but a ``--quick`` one) appends one JSON object to ``bench/results/shadow.jsonl``
and prints a table.

    python bench/shadow.py [--runs 200] [--horizon 300] [--replay-runs 2000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from skinflint.config import ShadowPolicy
from skinflint.metrics import Metrics
from skinflint.models import Completion
from skinflint.pipeline.context import Compression, RequestContext, Target
from skinflint.pipeline.shadow import ShadowGuard
from skinflint.pipeline.shadow_score import (
    CAP,
    DELTA,
    FIRST_DELTA,
    MEMORY,
    PRIOR,
    WINDOW,
    first_check,
)
from skinflint.pricing import PriceCatalog
from skinflint.storage.ledger import MemoryLedger

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "shadow.jsonl"
FLOOR = 0.9
LEVELS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.5)
MIN_SAMPLES = (20, 50, 100)
FEATURE, STRATEGY = "docs", "context"
TARGET = Target("small", "p", "s-1")
CLIENT, OTHER = "The harbour opened in 1850", "The document is about a harbour"
BATCH = 50  # samples shown to the guard between two drains (its calls run in order)
OLD_DELTA = 0.05  # the former rule's per-check level
CHUNK = 500  # replayed runs at a time (memory)
Replay = Callable[[np.ndarray, int], np.ndarray]

# ---------------------------------------------------------------- the real guard


class AgreeingUpstream:
    """A :class:`ShadowUpstream` answering the shadow call as the client was answered when the
    next agreement of the series is 1, otherwise differently. It also notes how many calls had
    been scored when it first finds the strategy switched off: the guard's calls run one after
    the other, so that is the sample that switched it off."""

    def __init__(self, agreements: np.ndarray) -> None:
        self._agreements = agreements
        self.calls = 0
        self.guard: ShadowGuard | None = None
        self.off_after: int | None = None

    def resolve(self, name: str) -> Target:
        return TARGET

    async def complete(self, target: Target, body: dict[str, Any]) -> Completion:
        if self.off_after is None and self.guard and not self.guard.enabled(FEATURE, STRATEGY):
            self.off_after = self.calls
        same = bool(self._agreements[self.calls])
        self.calls += 1
        message = {"role": "assistant", "content": CLIENT if same else OTHER}
        return Completion({"choices": [{"index": 0, "message": message}],
                           "usage": {"prompt_tokens": 400, "completion_tokens": 8,
                                     "total_tokens": 408}})


def _request() -> RequestContext:
    original = {"model": "small", "messages": [{"role": "user", "content": "long document"}]}
    return RequestContext("r", 0.0, 0.0, "chat", b"{}", {}, body=original, feature=FEATURE,
                          requested_model="small", answered=TARGET, status=200,
                          compression=Compression((STRATEGY,), 300, original))


async def guard_run(agreements: np.ndarray, min_samples: int, metrics: Metrics) -> int | None:
    """The sampled request after which the real guard switched the strategy off (None: not
    within ``len(agreements)``)."""
    policy = ShadowPolicy(sample=1.0, floor=FLOOR, judge="exact", min_samples=min_samples)
    upstream = AgreeingUpstream(agreements)
    guard = ShadowGuard(lambda feature, route: policy, upstream, ledger=MemoryLedger(),
                        catalog=PriceCatalog({"small": (1.0, 2.0, None)}), metrics=metrics,
                        max_in_flight=BATCH, sampler=lambda: 0.0)
    upstream.guard = guard
    ctx, answer = _request(), {"choices": [{"message": {"content": CLIENT}}]}
    for start in range(0, len(agreements), BATCH):
        for _ in range(min(BATCH, len(agreements) - start)):
            guard.observe(ctx, answer)
        await guard.drain()
        if not guard.enabled(FEATURE, STRATEGY):
            return upstream.off_after or upstream.calls
    return None


def agreements(p: float, min_samples: int, run: int, horizon: int) -> np.ndarray:
    rng = np.random.default_rng([round(p * 1000), min_samples, run])
    return rng.random(horizon) < p


# ---------------------------------------------------------------- the rules, vectorised


def first_limit(min_samples: int) -> int:
    """The most agreements out of ``min_samples`` the guard's first check switches off on (-1:
    none)."""
    return max((k for k in range(min_samples + 1)
                if first_check(k / min_samples, min_samples, FLOOR)), default=-1)


def replay_betting(series: np.ndarray, min_samples: int) -> np.ndarray:
    """The guard's rule, per run (row of 0/1 agreements): the sample after which it switches
    off (0: never). The same float operations in the same order as
    :class:`skinflint.pipeline.shadow_score.Window`, so the same sample."""
    runs, horizon = series.shape
    sums = np.zeros((runs, horizon + 1))
    sums[:, 1:] = np.cumsum(series, 1)
    wealth, off = np.ones(runs), np.zeros(runs, np.int64)
    cap, spread = CAP / max(1.0 - FLOOR, 1e-9), max(FLOOR * (1.0 - FLOOR), 1e-9)
    limit, threshold = first_limit(min_samples), 1 / DELTA
    for t in range(1, horizon + 1):
        start = max(t - 1 - MEMORY, 0)
        estimate = (PRIOR * FLOOR + (sums[:, t - 1] - sums[:, start])) / (PRIOR + t - 1 - start)
        stake = np.where(estimate >= FLOOR, 0.0,
                         np.minimum(cap, (FLOOR - estimate) / spread))
        wealth = np.minimum(1e100, wealth * (1.0 + stake * (FLOOR - series[:, t - 1])))
        if t == min_samples:
            off[sums[:, t] <= limit] = t
        if t >= min_samples:
            off[(off == 0) & (wealth >= threshold)] = t
    return off


def hoeffding(mean: float, n: int) -> float:
    """The former rule's bound: Hoeffding's one-sided upper 95% bound on the mean of ``n``
    scores in [0, 1]."""
    return 1.0 if n <= 0 else min(1.0, mean + math.sqrt(math.log(1 / OLD_DELTA) / (2 * n)))


OLD_LIMITS = np.array([-1] + [next((k for k in range(n, -1, -1) if hoeffding(k / n, n) < FLOOR),
                                   -1) for n in range(1, WINDOW + 1)])


def replay_hoeffding(series: np.ndarray, min_samples: int) -> np.ndarray:
    """The former rule, per run: the sample after which it switched off (0: never)."""
    runs, horizon = series.shape
    sums = np.concatenate([np.zeros((runs, 1), np.int32), np.cumsum(series, 1, np.int32)], 1)
    t = np.arange(1, horizon + 1)
    held = sums[:, t] - sums[:, np.maximum(t - WINDOW, 0)]
    fire = (held <= OLD_LIMITS[np.minimum(t, WINDOW)]) & (t >= min_samples)
    return np.where(fire.any(1), fire.argmax(1) + 1, 0)


RULES: dict[str, Replay] = {"betting (shipped)": replay_betting,
                            "hoeffding (former)": replay_hoeffding}


def _simulate(rule: Replay, p: float, min_samples: int, runs: int, horizon: int, seed: int,
              before: tuple[int, float] | None = None) -> np.ndarray:
    """``rule`` on ``runs`` seeded series of agreement ``p`` (after ``before[0]`` samples of
    agreement ``before[1]``, when given), a chunk of runs at a time."""
    rng = np.random.default_rng([seed, round(p * 1000), min_samples])
    level = np.full(horizon, p)
    if before is not None:
        level[:before[0]] = before[1]
    out = []
    for start in range(0, runs, CHUNK):
        draws = rng.random((min(CHUNK, runs - start), horizon))
        out.append(rule((draws < level).astype(np.float64), min_samples))
    return np.concatenate(out)


def largest_caught(rule: Replay, min_samples: int, runs: int) -> float:
    """The highest p on a 0.01 grid below the floor switched off within ``min_samples``
    samples in at least 90% of runs."""
    for hundredths in range(round(FLOOR * 100) - 1, 0, -1):
        p = hundredths / 100
        if np.mean(_simulate(rule, p, min_samples, runs, min_samples, 7) > 0) >= 0.9:
            return p
    return 0.0


def _spread(off: np.ndarray, horizon: int) -> dict[str, Any]:
    """Median and p90 of the samples to switch-off (``horizon + 1``: not within it)."""
    taken = np.where(off > 0, off, horizon + 1)
    return {"median": float(np.median(taken)), "p90": float(np.quantile(taken, 0.9)),
            "off": round(float(np.mean(off > 0)), 4)}


def rule_figures(name: str, rule: Replay, sizes: tuple[int, ...], runs: int,
                 long: int) -> dict[str, Any]:
    out: dict[str, Any] = {"rule": name}
    for m in sizes:
        false = {}
        for p in (FLOOR, 0.95):
            off = _simulate(rule, p, m, runs, long, 11)
            false[f"false_off_at_{p}"] = {"within_1000": float(np.mean((off > 0) & (off <= 1000))),
                                          f"within_{long}": float(np.mean(off > 0))}
        drops = {f"p{p}": _spread(_simulate(rule, p, m, runs, 3000, 13), 3000)
                 for p in (0.8, 0.85)}
        change = {}
        for p in (0.8, 0.85):
            off = _simulate(rule, p, m, runs, 5000, 19, before=(2000, 0.97))
            after = np.where(off > 2000, off - 2000, 0)
            change[f"0.97_then_{p}"] = {"false_before": float(np.mean((off > 0) & (off <= 2000))),
                                        **_spread(after, 3000)}
        out[str(m)] = {"largest_caught_within_min_samples": largest_caught(rule, m, runs),
                       **false, "to_switch_off": drops, "after_2000_at_0.97": change}
    return out


def _binomial_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def first_check_reach(n: int, k: int) -> float:
    """The highest p (0.01 grid) with P(at most k agreements in n) >= 0.9."""
    grid = (h / 100 for h in range(round(FLOOR * 100) - 1, 0, -1))
    return next((p for p in grid if _binomial_cdf(k, n, p) >= 0.9), 0.0)


def exact_test_limit(n: int, level: float = OLD_DELTA) -> int:
    """The most agreements out of n a one-sided exact binomial test at ``level`` rejects
    ``mean >= floor`` on: the most powerful single check at that level."""
    return max(k for k in range(n + 1) if _binomial_cdf(k, n, FLOOR) <= level)


# ---------------------------------------------------------------- measurements


def _quantiles(off: list[int | None], horizon: int) -> dict[str, Any]:
    values = sorted(horizon + 1 if o is None else o for o in off)

    def show(q: float) -> int | str:
        v = values[min(len(values) - 1, math.ceil(q * len(values)) - 1)]
        return f">{horizon}" if v > horizon else v

    return {"switched_off": round(sum(o is not None for o in off) / len(off), 4),
            "median": show(0.5), "p90": show(0.9), "max": show(1.0)}


async def guard_table(runs: int, horizon: int, levels: tuple[float, ...],
                      sizes: tuple[int, ...]) -> tuple[list[dict[str, Any]], bool, float]:
    metrics, rows, same, started = Metrics(), [], True, time.perf_counter()
    for m in sizes:
        for p in levels:
            series = [agreements(p, m, i, horizon) for i in range(runs)]
            off = [await guard_run(s, m, metrics) for s in series]
            replayed = replay_betting(np.array(series, np.float64), m)
            same &= [o or 0 for o in off] == replayed.tolist()
            within = sum(o is not None and o <= m for o in off) / runs
            rows.append({"p": p, "min_samples": m, **_quantiles(off, horizon),
                         "within_min_samples": round(within, 4)})
    return rows, same, time.perf_counter() - started


def end_to_end(min_samples: int) -> dict[str, Any]:
    """A real gateway in front of the fake upstream: the request after which the guard
    switched ``context`` off."""
    import httpx
    import openai

    sys.path.insert(0, str(ROOT))
    from skinflint.config import settings_from_dict
    from skinflint.server.run import BackgroundServer
    from tests.fake_upstream import FakeUpstream

    shadow = {"sample": 1.0, "floor": FLOOR, "judge": "exact", "min_samples": min_samples}
    question = " ".join(f"Paragraph {i} of the manual says nothing of use." for i in range(200))
    question += "\n\nWhat does the manual say?"
    with FakeUpstream() as fake, _tempdir() as tmp:
        config = {
            "providers": {"fake": {"kind": "openai-compatible", "base_url": fake.base_url,
                                   "api_key": "sk-bench", "max_retries": 0, "timeout": 5}},
            "models": {"gpt-4o-mini": {"provider": "fake"}}, "default_provider": "fake",
            "storage": {"sqlite_path": str(Path(tmp) / "skinflint.db")},
            "admin_key": "bench-admin",
            "compression": {"features": {FEATURE: {"context": {"max_tokens": 200},
                                                   "shadow": shadow}}},
        }
        with BackgroundServer(settings_from_dict(config, env={})) as gw, openai.OpenAI(
            base_url=gw.base_url, api_key="k", max_retries=0, timeout=10) as client:

            def state(expect: int) -> dict[str, Any]:
                deadline = time.monotonic() + 10
                while True:
                    rows = httpx.get(gw.root_url + "/api/shadow", timeout=5, headers={
                        "authorization": "Bearer bench-admin"}).json()["data"]
                    if (rows and rows[0]["samples"] >= expect) or time.monotonic() > deadline:
                        return rows[0] if rows else {}
                    time.sleep(0.01)

            off_after, routes = None, []
            for i in range(1, 3 * min_samples + 1):
                raw = client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": question}],
                    extra_headers={"x-skinflint-feature": FEATURE})
                routes.append(raw.headers.get("x-skinflint-route", ""))
                row = state(i)
                if row.get("state") == "off":
                    off_after = i
                    break
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": question}],
                extra_headers={"x-skinflint-feature": FEATURE})
            after = raw.headers.get("x-skinflint-route", "")
            time.sleep(0.2)
            final = state(0)
    return {"min_samples": min_samples, "switched_off_after": off_after,
            "samples": final.get("samples"), "mean": final.get("mean"),
            "bound": final.get("bound"), "compressed_route": routes[0],
            "route_after_off": after, "shadowed_after_off": final.get("samples") != off_after}


def _tempdir() -> Any:
    import tempfile

    return tempfile.TemporaryDirectory()


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


async def main(args: argparse.Namespace) -> dict[str, Any]:
    levels = LEVELS if not args.quick else (1.0, 0.9, 0.7, 0.5)
    sizes = MIN_SAMPLES if not args.quick else (20,)
    table, same, seconds = await guard_table(args.runs, args.horizon, levels, sizes)
    started = time.perf_counter()
    long = 10_000 if not args.quick else 2_000
    rules = [rule_figures(name, rule, sizes, args.replay_runs, long)
             for name, rule in RULES.items()]
    exact = {m: {"limit": exact_test_limit(m),
                 "largest_caught": first_check_reach(m, exact_test_limit(m))} for m in sizes}
    return {"ts": time.time(), "commit": _commit(), "machine": platform.machine(),
            "python": platform.python_version(), "floor": FLOOR, "delta": DELTA,
            "first_delta": FIRST_DELTA, "memory": MEMORY, "prior": PRIOR, "cap": CAP,
            "window": WINDOW, "runs": args.runs, "horizon": args.horizon,
            "replay_runs": args.replay_runs, "quick": args.quick,
            "guard": table, "guard_seconds": round(seconds, 1),
            "replay_matches_guard": same, "first_check_limits": {
                m: first_limit(m) for m in sizes},
            "rules": rules, "replay_seconds": round(time.perf_counter() - started, 1),
            "exact_test_first_check": exact, "end_to_end": end_to_end(args.e2e_min_samples)}


def render(result: dict[str, Any]) -> Iterator[str]:
    h = result["horizon"]
    yield (f"real ShadowGuard, floor {result['floor']}, exact judge, {result['runs']} runs per"
           f" row, horizon {h} sampled requests ({result['guard_seconds']} s)")
    yield f"{'p':>5} {'M':>4} {'off':>6} {'<=M':>6} {'median':>7} {'p90':>7} {'max':>7}"
    for r in result["guard"]:
        yield (f"{r['p']:>5} {r['min_samples']:>4} {r['switched_off']:>6.3f}"
               f" {r['within_min_samples']:>6.3f} {r['median']!s:>7} {r['p90']!s:>7}"
               f" {r['max']!s:>7}")
    yield f"vectorised rule = real guard in every run: {result['replay_matches_guard']}"
    yield f"first check switches off on at most {result['first_check_limits']} agreements"
    yield (f"\n{result['replay_runs']} replayed runs per figure ({result['replay_seconds']} s);"
           " medians/p90 in samples (3001: not within 3,000)")
    for rule in result["rules"]:
        yield f"\n{rule['rule']}"
        yield (f"{'M':>4} {'caught@M':>8} {'false@.9 1k':>11} {'10k':>6} {'false@.95 1k':>12}"
               f" {'10k':>6} {'0.8 med/p90':>12} {'0.85 med/p90':>13}"
               f" {'.97>.8 after':>13} {'.97>.85 after':>14} {'false<2k':>8}")
        for m in (k for k in rule if k.isdigit()):
            f = rule[m]
            at, high = f[f"false_off_at_{FLOOR}"], f["false_off_at_0.95"]
            drops, change = f["to_switch_off"], f["after_2000_at_0.97"]
            far = list(at)[-1]

            def both(d: dict[str, Any]) -> str:
                return f"{d['median']:g}/{d['p90']:g}"

            yield (f"{m:>4} {f['largest_caught_within_min_samples']:>8}"
                   f" {at['within_1000']:>11.4f} {at[far]:>6.4f} {high['within_1000']:>12.4f}"
                   f" {high[far]:>6.4f} {both(drops['p0.8']):>12} {both(drops['p0.85']):>13}"
                   f" {both(change['0.97_then_0.8']):>13} {both(change['0.97_then_0.85']):>14}"
                   f" {change['0.97_then_0.8']['false_before']:>8.4f}")
    yield "\nbest level-5% single check at M samples (exact binomial): " + ", ".join(
        f"M={m}: <= {v['limit']} agreements, catches p <= {v['largest_caught']}"
        for m, v in result["exact_test_first_check"].items())
    yield f"end to end (gateway + fake upstream): {result['end_to_end']}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--horizon", type=int, default=300, help="sampled requests per run")
    parser.add_argument("--replay-runs", type=int, default=2000,
                        help="seeded runs per figure of the vectorised rules")
    parser.add_argument("--e2e-min-samples", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parsed = parser.parse_args()
    logging.getLogger("skinflint.shadow").setLevel(logging.ERROR)  # one line per switch-off
    if parsed.quick:
        parsed.runs, parsed.horizon, parsed.e2e_min_samples = 20, 120, 5
        parsed.replay_runs = 200
    outcome = asyncio.run(main(parsed))
    if not parsed.quick:  # a smoke run is not a result
        RESULTS.parent.mkdir(exist_ok=True)
        with RESULTS.open("a") as out:
            out.write(json.dumps(outcome) + "\n")
    print("\n".join(render(outcome)))
