"""Router decision latency: the time the route stage takes to pick a task for a prompt
(deterministic rules, then the trained classifier), on the recorded prompts.

Usage: ``python bench/router.py [--n 2000]``. Appends one JSON line to
``bench/results/router.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson

from skinflint.analytics.evaluation import default_replay_config
from skinflint.config import settings_from_dict
from skinflint.metrics import Metrics
from skinflint.pipeline.context import RequestContext
from skinflint.pipeline.route import Route
from skinflint.providers.replay import ReplayProvider
from skinflint.routing.classifier import TaskClassifier

RESULTS = Path(__file__).resolve().parent / "results" / "router.jsonl"


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(int(len(ordered) * q), len(ordered) - 1)]  # noqa: E731
    return {"p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": ordered[-1],
            "mean_ms": statistics.fmean(ordered)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    raw = default_replay_config()
    settings = settings_from_dict(raw, env={})
    from importlib import resources
    clf = TaskClassifier.from_bytes(
        (resources.files("skinflint") / "data" / "classifier.npz").read_bytes())
    route = Route(settings, classifiers={"auto": clf}, scorer=None, metrics=Metrics())
    plan = route.plans["auto"]
    prompts = [s.prompt for s in ReplayProvider().samples()][: args.n]
    figures = {}
    for name, classify in (("rules then classifier", plan.classify), ("classifier only", None)):
        times = []
        for p in prompts:
            body = {"model": "auto", "messages": [{"role": "user", "content": p}]}
            ctx = RequestContext("id", 0.0, 0.0, "chat", orjson.dumps(body), {}, body=body)
            started = time.perf_counter()
            if classify is not None:
                classify(ctx)
            else:
                clf.classify(p)
            times.append((time.perf_counter() - started) * 1000)
        figures[name] = _percentiles(times)
    prompt_chars = statistics.fmean(len(p) for p in prompts)
    result = {"ts": datetime.now(UTC).isoformat(), "prompts": len(prompts),
              "mean_prompt_chars": prompt_chars, "figures": figures}
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("a") as fh:
        fh.write(json.dumps(result) + "\n")
    for name, f in figures.items():
        print(f"{name:24s} p50 {f['p50_ms']:.3f} ms  p99 {f['p99_ms']:.3f} ms  "
              f"max {f['max_ms']:.3f} ms")


if __name__ == "__main__":
    main()
