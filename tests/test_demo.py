"""``skinflint demo``: the same seed gives the same figures, the saving is split by strategy, the
output fits 80 columns; and the request order that makes the figures reproducible."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from skinflint.analytics.report import read_records
from skinflint.cli import main
from skinflint.cli.output import count
from skinflint.cli.run import format_demo
from skinflint.config import settings_from_dict
from skinflint.demo import (
    DEFERRED_FEATURE,
    DEFERRED_SHARE,
    PREMIUM_MODEL,
    STRATEGIES,
    RequestOrder,
    build_workload,
)
from skinflint.embed import load_embedder
from skinflint.models import LedgerRecord
from skinflint.pipeline.cache import semantic_defaults
from skinflint.providers.replay import ReplayProvider

TIMINGS = ("latency_ms", "deferred_ms", "wall_seconds")


@pytest.fixture(scope="module")
def replay() -> ReplayProvider:
    return ReplayProvider()


@pytest.fixture(scope="module")
def new_order() -> Callable[[], RequestOrder]:
    """A fresh request order with the demo's embedder and the shipped threshold."""
    embedder = load_embedder("local")
    threshold = float(semantic_defaults()["threshold"])
    return lambda: RequestOrder(embedder, threshold, 1000)


def _prompt(replay: ReplayProvider, sample_id: str) -> str:
    return next(s.prompt for s in replay.samples() if s.id == sample_id)


def test_a_repeated_prompt_waits_for_its_latest_earlier_request(
    new_order: Callable[[], RequestOrder],
) -> None:
    a, b = "What is the capital of Peru?", "Write a haiku about autumn leaves."
    assert new_order().extend([a, b, a, a, b]) == [(), (), (0,), (2,), (1,)]


def test_questions_the_semantic_cache_could_match_wait_for_each_other(
    replay: ReplayProvider, new_order: Callable[[], RequestOrder]
) -> None:
    # similarity 0.987 with the shipped embedder, above the 0.9825 threshold
    element = _prompt(replay, "mbpp.dev.327")  # "... interchange the first and last element ..."
    elements = _prompt(replay, "mbpp.dev.297")  # "... interchange the first and last elements ..."
    quotes = _prompt(replay, "mbpp.dev.272")
    order = new_order()
    assert order.extend([element, quotes]) == [(), ()]
    assert order.extend([elements, element]) == [(0,), (0, 2)]
    assert order.similar == {element: {elements}, elements: {element}}


def test_the_same_question_after_another_document_does_not_wait(
    new_order: Callable[[], RequestOrder],
) -> None:
    question = "Question: who signed the contract?"
    first, second = ("lorem ipsum " * 100, "dolor sit amet " * 80)
    prompts = [f"{doc}\n\n{question}" for doc in (first, second)]
    assert all(len(p) > 1000 for p in prompts)  # compared by the question, within the document
    assert new_order().extend([*prompts, prompts[0]]) == [(), (), (0,)]


def test_planning_a_batch_at_a_time_gives_the_same_order(
    replay: ReplayProvider, new_order: Callable[[], RequestOrder]
) -> None:
    prompts = [r.sample.prompt for r in build_workload(replay.samples(), 120, 3)
               if not r.deferred]
    whole = new_order().extend(prompts)
    order = new_order()
    batched = [w for k in range(0, len(prompts), 7) for w in order.extend(prompts[k : k + 7])]
    assert batched == whole
    assert sum(1 for w in whole if w) >= 20  # repeats wait


def test_the_workload_depends_on_the_seed(replay: ReplayProvider) -> None:
    samples = replay.samples()
    ids = [[(r.sample.id, r.deferred) for r in build_workload(samples, 80, seed)]
           for seed in (1, 1, 2)]
    assert ids[0] == ids[1] != ids[2]


def test_a_share_of_the_workload_is_a_nightly_evaluation(replay: ReplayProvider) -> None:
    """Deferred requests: their share of the workload, distinct questions no live request
    asks, each with a recorded answer of the model they name, never streamed."""
    workload = build_workload(replay.samples(), 200, 5)
    nightly = [r for r in workload if r.deferred]
    live = [r for r in workload if not r.deferred]
    assert len(workload) == 200 and len(nightly) == round(200 * DEFERRED_SHARE) == 30
    ids = [r.sample.id for r in nightly]
    assert len(set(ids)) == len(ids)
    assert not set(ids) & {r.sample.id for r in live}
    assert all(r.sample.responses[PREMIUM_MODEL] and not r.stream for r in nightly)
    assert any(r.stream for r in live)
    positions = [i for i, r in enumerate(workload) if r.deferred]
    assert positions[0] < 50 and positions[-1] > 150  # spread over the run, not at one end


def _demo_json(*args: str, hash_seed: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    done = subprocess.run(
        [sys.executable, "-m", "skinflint.cli", "demo", "--json", *args],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    )
    figures: dict[str, Any] = json.loads(done.stdout)
    return figures


def test_the_same_seed_gives_the_same_figures() -> None:
    """Whatever the concurrency and the hash seed: a request the caches could answer from an
    earlier one is sent once that one is answered, so which requests hit is decided by the
    seed alone."""
    runs = [
        _demo_json("--requests", "100", "--seed", "11", "--concurrency", c, hash_seed=h)
        for c, h in (("4", "1"), ("32", "2"))
    ]
    for run in runs:
        for key in TIMINGS:
            run.pop(key)
    assert runs[0] == runs[1]
    assert runs[0]["seed"] == 11 and runs[0]["strategies"][0]["requests"] > 0


def test_demo_splits_the_saving_by_strategy(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    assert main(["demo", "--requests", "150", "--json", "--ledger", str(db)]) == 0
    result = json.loads(capsys.readouterr().out)
    _check_tokens_against_the_ledger(result, read_records(settings_from_dict({}), db=str(db)))
    assert result["requests"] == 150 and result["ledger_rows"] >= 150
    base, ours = result["baseline"], result["skinflint"]
    assert 0 < ours["cost_usd"] < base["cost_usd"]
    assert result["saving_usd"] == pytest.approx(base["cost_usd"] - ours["cost_usd"])
    assert result["cut"] == pytest.approx(result["saving_usd"] / base["cost_usd"])
    strategies = {s["name"]: s for s in result["strategies"]}
    assert list(strategies) == list(STRATEGIES)
    assert sum(s["requests"] for s in strategies.values()) == 150
    assert math.fsum(s["saving_usd"] for s in strategies.values()) == pytest.approx(
        result["saving_usd"])
    assert math.fsum(s["share"] for s in strategies.values()) == pytest.approx(1.0)
    assert strategies["exact_cache"]["requests"] > 0
    assert strategies["batch"]["requests"] == result["deferred"] == round(150 * DEFERRED_SHARE)
    assert strategies["batch"]["saving_usd"] > 0
    assert strategies["exact_cache"]["saving_usd"] > 0 and strategies["cascade"]["saving_usd"] > 0
    answered_by = result["answered_by"]
    assert sum(a["share"] for a in answered_by) == pytest.approx(1.0)
    misses = 150 - strategies["exact_cache"]["requests"] - strategies["semantic_cache"]["requests"]
    assert sum(a["requests"] for a in answered_by) == misses
    assert {"task", "model", "tier"} <= set(answered_by[0])
    assert result["quality_retained"] > 0.85
    assert result["latency_speedup"] == 20

    console = Console(file=io.StringIO(), width=80, no_color=True)
    for part in format_demo(result):
        console.print(part)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    _check_text(text)
    exact = strategies["exact_cache"]
    assert re.search(r"│ batch API \(deferred requests\) +│ +"
                     + str(strategies["batch"]["requests"]) + r" │ +0 │ +\$\d[\d.,]* +│", text)
    assert re.search(r"│ exact cache \(same request\) +│ +\d+ │ +"
                     + re.escape(count(exact["tokens_saved"]))
                     + r" │ +\$\d[\d.,]* +│ +\d+\.\d%", text)
    assert f"{count(result['tokens']['baseline'])} / {count(result['tokens']['processed'])}" in text


def _check_tokens_against_the_ledger(result: dict[str, Any], rows: list[LedgerRecord]) -> None:
    """Tokens saved, from the rows the run wrote: an exact hit saves its whole call; a cascade
    spends the tokens of the tiers it escalated from on top of the baseline's."""
    assert len(rows) == result["ledger_rows"]
    s = {x["name"]: x for x in result["strategies"]}
    hits = [r for r in rows if r.cache_status == "hit-exact"]
    escalated = [r for r in rows if r.strategy == "cascade_escalated"]
    assert escalated and len(hits) == s["exact_cache"]["requests"]
    assert s["exact_cache"]["input_tokens_saved"] == sum(r.input_tokens for r in hits) > 0
    assert s["exact_cache"]["output_tokens_saved"] == sum(r.output_tokens for r in hits) > 0
    assert s["exact_cache"]["saving_usd"] == pytest.approx(math.fsum(r.saved_usd or 0.0
                                                                     for r in hits))
    assert s["cascade"]["input_tokens_saved"] == -sum(r.input_tokens for r in escalated)
    assert s["cascade"]["output_tokens_saved"] == -sum(r.output_tokens for r in escalated)
    assert s["routed"]["tokens_saved"] == 0
    clients = [r for r in rows if r.strategy != "cascade_escalated"]
    baseline = sum(r.input_tokens + r.output_tokens for r in clients)
    processed = sum(r.input_tokens + r.output_tokens for r in rows
                    if not r.cache_status.startswith("hit"))
    batch = [r for r in rows if r.strategy == "batch"]
    assert len(batch) == result["deferred"] == s["batch"]["requests"]
    assert {(r.feature, r.model, r.status) for r in batch} == {
        (DEFERRED_FEATURE, PREMIUM_MODEL, 200)}
    for r in batch:  # half the real-time price: the replay provider's batch discount
        assert r.cost_usd == pytest.approx(r.baseline_cost_usd * 0.5)
    assert s["batch"]["tokens_saved"] == 0  # the same tokens, at a lower price
    assert s["batch"]["saving_usd"] == pytest.approx(math.fsum(r.saved_usd or 0 for r in batch))
    assert result["tokens"] == {"baseline": baseline, "processed": processed,
                                "saved": baseline - processed}
    assert sum(x["tokens_saved"] for x in s.values()) == baseline - processed


def test_demo_prints_a_table_that_fits_80_columns(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["demo", "--requests", "40"]) == 0
    _check_text(capsys.readouterr().out)


def _check_text(text: str) -> None:
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert sum("total cut" in line for line in lines) == 1
    assert "quality retained" in text and "exact cache (same request)" in text
    # tier rows name the task and the model, each on one line
    assert re.search(r"│ \w+: [\w./-]+ \(tier \d/\d\) +│ +\d+\.\d% │", text)
    words = " ".join(text.split())
    assert "played 20 times faster so that the demo takes seconds" in words
