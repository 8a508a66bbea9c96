"""The evaluation harness behind ``skinflint replay``: a recorded dataset through the real
pipeline (the gateway's own stages, classifier, cascades, gates and ledger) against the replay
provider, scored with the recorded correctness of the answer that was finally returned."""

from __future__ import annotations

import asyncio
import math
import statistics
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import yaml

from skinflint.analytics.savings import (
    baseline_prompt_usd,
    ledger_savings,
    savings_json,
    token_totals,
)
from skinflint.config import Settings, settings_from_dict
from skinflint.errors import SkinflintError
from skinflint.gateway import Gateway, price_catalog
from skinflint.models import LedgerRecord, is_attempt
from skinflint.providers.replay import ReplayProvider, ReplaySample
from skinflint.storage.ledger import MemoryLedger

__all__ = ["DEFAULT_ROUTE", "Outcome", "default_replay_config", "evaluate", "replay_dataset",
           "run_dataset"]

DEFAULT_ROUTE = "auto"
Progress = Callable[[int, int], None]


def default_replay_config() -> dict[str, Any]:
    """The shipped replay configuration: route ``auto`` over the recorded models."""
    text = (resources.files("skinflint") / "data" / "replay.yaml").read_text()
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


@dataclass(frozen=True, slots=True)
class Outcome:
    sample: ReplaySample
    model: str  # the recorded model whose answer was returned
    tier: str
    cost_usd: float
    correct: int


def _replay_settings(raw: dict[str, Any], dataset: Path | None, db: Path) -> Settings:
    raw = dict(raw)
    providers = {n: dict(p) for n, p in (raw.get("providers") or {}).items()}
    for p in providers.values():
        if p.get("kind") == "replay":
            p["latency_scale"] = 0.0
            if dataset is not None:
                p["data_path"] = str(dataset)
    raw["providers"] = providers
    raw["storage"] = {"sqlite_path": str(db)}
    raw["cache"] = {"exact": {"enabled": False}}  # every sample is asked once, on its merits
    return settings_from_dict(raw, env={})


async def _ask(gw: Gateway, replay: ReplayProvider, sample: ReplaySample, model: str) -> Outcome:
    body = {"model": model, "temperature": 0,
            "messages": [{"role": "user", "content": sample.prompt}]}
    ctx = gw.context("chat", orjson.dumps(body), {})
    try:
        await gw.pipeline.handle(ctx)
    except SkinflintError as exc:  # e.g. a recording with no response: a failed request
        return Outcome(sample, f"error ({exc.code or exc.error_type})", "error",
                       ctx.costs.cost_usd or 0.0, 0)
    assert ctx.answered is not None and ctx.costs.cost_usd is not None
    answered = ctx.answered.name
    tier = ctx.route.tier + 1 if ctx.route is not None and ctx.route.tiers else 1
    return Outcome(sample, answered, f"{answered} (tier {tier})", ctx.costs.cost_usd,
                   replay.correctness(sample.prompt, answered) or 0)


async def _run(settings: Settings, model: str, on_progress: Progress | None,
               concurrency: int) -> tuple[list[Outcome], list[LedgerRecord]]:
    ledger = MemoryLedger()
    gw = await Gateway.open(settings, ledger=ledger)
    try:
        replay = next(p for p in gw.providers.values() if isinstance(p, ReplayProvider))
        await asyncio.to_thread(replay.load)
        samples = replay.samples()
        gate = asyncio.Semaphore(concurrency)
        done: list[Outcome] = []

        async def one(sample: ReplaySample) -> Outcome:
            async with gate:
                outcome = await _ask(gw, replay, sample, model)
            done.append(outcome)
            if on_progress:
                on_progress(len(done), len(samples))
            return outcome

        outcomes = list(await asyncio.gather(*(one(s) for s in samples)))
    finally:
        await gw.close()
    return outcomes, ledger.records


def run_dataset(raw_config: dict[str, Any], dataset: Path | None, *, model: str = DEFAULT_ROUTE,
                on_progress: Progress | None = None, concurrency: int = 32) -> list[Outcome]:
    return replay_dataset(raw_config, dataset, model=model, on_progress=on_progress,
                          concurrency=concurrency)[0]


def replay_dataset(raw_config: dict[str, Any], dataset: Path | None, *,
                   model: str = DEFAULT_ROUTE, on_progress: Progress | None = None,
                   concurrency: int = 32) -> tuple[list[Outcome], list[LedgerRecord]]:
    """Every sample through the gateway: the outcomes and the ledger rows they wrote."""
    with tempfile.TemporaryDirectory(prefix="skinflint-replay-") as tmp:
        settings = _replay_settings(raw_config, dataset, Path(tmp) / "replay.db")
        return asyncio.run(_run(settings, model, on_progress, concurrency))


def _summary(outcomes: Sequence[Outcome]) -> dict[str, float]:
    return {"cost_usd": sum(o.cost_usd for o in outcomes),
            "quality": statistics.fmean(o.correct for o in outcomes) if outcomes else 0.0}


def _single_models(samples: Sequence[ReplaySample]) -> dict[str, dict[str, float]]:
    """Each recorded model alone, from its recorded cost and correctness (the replay provider
    charges exactly the recorded cost, so this equals running it through the gateway)."""
    models = list(samples[0].cost) if samples else []
    return {m: {"cost_usd": sum(s.cost[m] for s in samples),
                "quality": statistics.fmean(s.correct[m] or 0 for s in samples)} for m in models}


def evaluate(dataset: Path | None, raw_config: dict[str, Any] | None = None, *,
             model: str = DEFAULT_ROUTE, curve: bool = True,
             on_progress: Progress | None = None) -> dict[str, Any]:
    """The report ``skinflint replay --json`` prints. ``curve`` adds the cost-quality point of
    every other route in the configuration (the shipped one has a 98% and a 95% route).
    ``dataset`` None is the RouterBench extract shipped in the package. Raises OSError or
    ValueError when ``dataset`` cannot be read."""
    raw = raw_config if raw_config is not None else default_replay_config()
    if not ReplayProvider(data_path=dataset).samples():  # fail before any work
        raise ValueError(f"no recorded samples in {dataset or 'the shipped extract'}")
    outcomes, rows = replay_dataset(raw, dataset, model=model, on_progress=on_progress)
    samples = [o.sample for o in outcomes]
    singles = _single_models(samples)
    route = (raw.get("routes") or {}).get(model) or {}
    premium = route.get("baseline") or raw.get("baseline_model") or max(
        singles, key=lambda m: singles[m]["cost_usd"])
    cheapest = min(singles, key=lambda m: singles[m]["cost_usd"])
    best = max(singles, key=lambda m: (singles[m]["quality"], -singles[m]["cost_usd"]))
    mine = _summary(outcomes)
    base = singles[premium]
    report: dict[str, Any] = {
        "requests": len(outcomes),
        "route": model,
        "baseline": {"model": premium, **base},
        "skinflint": {**mine,
                      "cost_share": mine["cost_usd"] / base["cost_usd"] if base["cost_usd"] else 0,
                      "quality_share": mine["quality"] / base["quality"] if base["quality"] else 0},
        "cheapest": {"model": cheapest, **singles[cheapest]},
        "best_single": {"model": best, **singles[best]},
        "traffic": _shares(Counter(o.tier for o in outcomes), len(outcomes)),
        "models": singles,
        **_savings(rows, raw),
    }
    if curve:
        report["curve"] = sorted(
            [{"route": model, **report["skinflint"]}]
            + [_curve_point(raw, dataset, r, base) for r in raw.get("routes") or {} if r != model],
            key=lambda p: p["cost_usd"])
    return report


def _savings(rows: list[LedgerRecord], raw: dict[str, Any]) -> dict[str, Any]:
    """Tokens and dollars each strategy saved (:mod:`skinflint.analytics.savings`), against
    the ledger's baseline: the tokens sent, priced at the baseline model. That differs from
    the recorded always-baseline cost above by the baseline model's own answer lengths."""
    settings = settings_from_dict(raw, env={})
    rate = baseline_prompt_usd(price_catalog(settings), settings.baseline_model,
                               {n: r.baseline for n, r in settings.routes.items() if r.baseline})
    clients = [r for r in rows if not is_attempt(r.strategy)]
    return {
        "ledger_baseline_usd": math.fsum(r.baseline_cost_usd or 0.0 for r in clients),
        "tokens": token_totals(rows),
        "strategies": savings_json(ledger_savings(rows, rate)),
    }


def _shares(counts: Counter[str], total: int) -> dict[str, float]:
    return {k: n / total for k, n in counts.most_common()}


def _curve_point(raw: dict[str, Any], dataset: Path | None, route: str,
                 base: dict[str, float]) -> dict[str, Any]:
    s = _summary(run_dataset(raw, dataset, model=route))
    return {"route": route, **s, "cost_share": s["cost_usd"] / base["cost_usd"],
            "quality_share": s["quality"] / base["quality"]}
