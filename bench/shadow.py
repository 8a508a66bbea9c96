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

The guard's rule (a rolling window of the last 200 scores, checked at every sample once it
holds ``min_samples``, against Hoeffding's upper bound) is also replayed on the same agreement
series by a vectorised copy that reads its thresholds from
:func:`skinflint.pipeline.shadow_score.upper_bound`; the bench checks that it switches off at the
same sample as the real guard in every run, then uses it where the real guard would take too
long: the false switch-off rate at the floor over 1,000 and 5,000 sampled requests, the smallest
drop caught within ``M`` and within the 200-sample window (caught: in at least 90% of 2,000
runs, on a 0.01 grid of p), and the same figures for two what-if rules using the tighter
Chernoff/KL bound (Hoeffding's Theorem 1, valid for any scores in [0, 1]): at the same per-check
confidence (95%), and at 99.9%, which gives about the shipped rule's false switch-off rate.
The best any level-5% test can do at the first check (``M`` samples, an exact binomial test at
the floor) is computed exactly, as the limit no bound can beat.

End to end: a real gateway (:class:`skinflint.server.run.BackgroundServer`) in front of the
fake upstream of ``tests/fake_upstream.py``, which echoes the last user message, so trimming the
context (``context: {max_tokens: 200}``) changes every answer; with ``shadow: {sample: 1.0,
floor: 0.9, judge: exact, min_samples: N}`` the openai SDK sends one request at a time, waits
for its sample to be scored (``GET /api/shadow``), and the bench reports after which request
the strategy was switched off.

Each run (but a ``--quick`` one) appends one JSON object to ``bench/results/shadow.jsonl``
and prints a table.

    python bench/shadow.py [--runs 200] [--horizon 300] [--quick]
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
from skinflint.pipeline.shadow_score import DELTA, WINDOW, upper_bound
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
Bound = Callable[[float, int], float]

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


# ---------------------------------------------------------------- the same rule, vectorised


def hoeffding(mean: float, n: int) -> float:
    return upper_bound(mean, n)


def _kl(p: float, q: float) -> float:
    e = 1e-12
    p, q = min(max(p, e), 1 - e), min(max(q, e), 1 - e)
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def chernoff(mean: float, n: int, delta: float = DELTA) -> float:
    """The what-if: the largest q with ``n * KL(mean || q) <= ln(1 / delta)``."""
    lo, hi, limit = mean, 1.0, math.log(1 / delta) / n
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _kl(mean, mid) > limit else (mid, hi)
    return hi


def thresholds(bound: Bound) -> np.ndarray:
    """Per window size n: the most agreements out of n whose bound is below the floor (-1:
    none)."""
    found = np.full(WINDOW + 1, -1)
    for n in range(1, WINDOW + 1):  # the bound grows with k: the first k from the top
        found[n] = next((k for k in range(n, -1, -1) if bound(k / n, n) < FLOOR), -1)
    return found


def replay(series: np.ndarray, min_samples: int, limits: np.ndarray) -> np.ndarray:
    """Per run (row of 0/1 agreements): the sample after which the rule switches off (0:
    never)."""
    runs, horizon = series.shape
    sums = np.concatenate([np.zeros((runs, 1), np.int32), np.cumsum(series, 1, np.int32)], 1)
    t = np.arange(1, horizon + 1)
    held = sums[:, t] - sums[:, np.maximum(t - WINDOW, 0)]
    fire = (held <= limits[np.minimum(t, WINDOW)]) & (t >= min_samples)
    return np.where(fire.any(1), fire.argmax(1) + 1, 0)


def _simulate(p: float, min_samples: int, limits: np.ndarray, runs: int, horizon: int,
              seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, round(p * 1000), min_samples])
    return replay(rng.random((runs, horizon)) < p, min_samples, limits)


def smallest_drop(min_samples: int, limits: np.ndarray, within: int, runs: int) -> float:
    """The highest p on a 0.01 grid below the floor switched off within ``within`` samples in
    at least 90% of runs."""
    for hundredths in range(round(FLOOR * 100) - 1, 0, -1):
        p = hundredths / 100
        off = _simulate(p, min_samples, limits, runs, within, 7)
        if np.mean(off > 0) >= 0.9:
            return p
    return 0.0


def _binomial_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def first_check(n: int, k: int) -> float:
    """The highest p (0.01 grid) with P(at most k agreements in n) >= 0.9."""
    grid = (h / 100 for h in range(round(FLOOR * 100) - 1, 0, -1))
    return next((p for p in grid if _binomial_cdf(k, n, p) >= 0.9), 0.0)


def exact_test_limit(n: int) -> int:
    """The most agreements out of n a one-sided exact binomial test at level DELTA rejects
    ``mean >= floor`` on: the most powerful single check a 5% rule can make."""
    return max(k for k in range(n + 1) if _binomial_cdf(k, n, FLOOR) <= DELTA)


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
    limits = thresholds(hoeffding)
    for m in sizes:
        for p in levels:
            series = [agreements(p, m, i, horizon) for i in range(runs)]
            off = [await guard_run(s, m, metrics) for s in series]
            replayed = replay(np.array(series), m, limits)
            same &= [o or 0 for o in off] == replayed.tolist()
            within = sum(o is not None and o <= m for o in off) / runs
            rows.append({"p": p, "min_samples": m, **_quantiles(off, horizon),
                         "within_min_samples": round(within, 4)})
    return rows, same, time.perf_counter() - started


def rule_figures(name: str, bound: Bound, sizes: tuple[int, ...], runs: int) -> dict[str, Any]:
    limits = thresholds(bound)
    out: dict[str, Any] = {"limits": {n: int(limits[n]) for n in (20, 50, 100, 200)}}
    for m in sizes:
        false = {h: float(np.mean(_simulate(FLOOR, m, limits, runs, h, 11) > 0))
                 for h in (1000, 5000)}
        moderate = {p: _simulate(p, m, limits, runs, 1000, 13) for p in (0.85, 0.8)}
        out[str(m)] = {
            "false_off_at_floor": {f"within_{h}": v for h, v in false.items()},
            "false_off_at_0.95_within_5000": float(np.mean(
                _simulate(0.95, m, limits, runs, 5000, 17) > 0)),
            "smallest_drop_at_first_check": first_check(m, int(limits[m])),
            "smallest_drop_within_window": smallest_drop(m, limits, WINDOW, runs),
            **{f"p{p}_off_within_1000": float(np.mean(o > 0)) for p, o in moderate.items()},
            **{f"p{p}_median": float(np.median(np.where(o > 0, o, 1001)))
               for p, o in moderate.items()},
        }
    return {"rule": name, **out}


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
    replay_runs = 200 if args.quick else 2000
    rules = [rule_figures("hoeffding (shipped)", hoeffding, sizes, replay_runs),
             rule_figures("chernoff-kl (what-if)", chernoff, sizes, replay_runs),
             rule_figures("chernoff-kl at 0.001 per check (what-if)",
                          lambda mean, n: chernoff(mean, n, 0.001), sizes, replay_runs)]
    exact = {m: {"limit": exact_test_limit(m),
                 "smallest_drop": first_check(m, exact_test_limit(m))} for m in sizes}
    return {"ts": time.time(), "commit": _commit(), "machine": platform.machine(),
            "python": platform.python_version(), "floor": FLOOR, "delta": DELTA,
            "window": WINDOW, "runs": args.runs, "horizon": args.horizon, "quick": args.quick,
            "guard": table, "guard_seconds": round(seconds, 1),
            "replay_matches_guard": same, "rules": rules, "exact_test_first_check": exact,
            "end_to_end": end_to_end(args.e2e_min_samples)}


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
    for rule in result["rules"]:
        yield f"\n{rule['rule']}: agreements out of n that switch off {rule['limits']}"
        yield (f"{'M':>4} {'false@0.9/1k':>12} {'/5k':>6} {'false@.95/5k':>12}"
               f" {'caught@M':>9} {'caught<=200':>11} {'0.85 off/1k':>11} {'0.8 median':>10}")
        for m in (k for k in rule if k.isdigit()):
            f = rule[m]
            yield (f"{m:>4} {f['false_off_at_floor']['within_1000']:>12.4f}"
                   f" {f['false_off_at_floor']['within_5000']:>6.3f}"
                   f" {f['false_off_at_0.95_within_5000']:>12.4f}"
                   f" {f['smallest_drop_at_first_check']:>9} {f['smallest_drop_within_window']:>11}"
                   f" {f['p0.85_off_within_1000']:>11.3f} {f['p0.8_median']:>10}")
    yield "\nbest level-5% test at the first check (exact binomial): " + ", ".join(
        f"M={m}: <= {v['limit']} agreements, catches p <= {v['smallest_drop']}"
        for m, v in result["exact_test_first_check"].items())
    yield f"end to end (gateway + fake upstream): {result['end_to_end']}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--horizon", type=int, default=300, help="sampled requests per run")
    parser.add_argument("--e2e-min-samples", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parsed = parser.parse_args()
    logging.getLogger("skinflint.shadow").setLevel(logging.ERROR)  # one line per switch-off
    if parsed.quick:
        parsed.runs, parsed.horizon, parsed.e2e_min_samples = 20, 120, 5
    outcome = asyncio.run(main(parsed))
    if not parsed.quick:  # a smoke run is not a result
        RESULTS.parent.mkdir(exist_ok=True)
        with RESULTS.open("a") as out:
            out.write(json.dumps(outcome) + "\n")
    print("\n".join(render(outcome)))
