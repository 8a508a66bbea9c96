"""The evaluation harness and router training on recorded data, through the real pipeline."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import sys
from pathlib import Path

import pytest

from skinflint.analytics.evaluation import (
    default_replay_config,
    evaluate,
    replay_dataset,
    run_dataset,
)
from skinflint.cli import main
from skinflint.providers.replay import ReplayProvider
from skinflint.routing.classifier import TaskClassifier
from tests.conftest import SHARED_DATA

ROUTERBENCH = SHARED_DATA / "routerbench"
needs_data = pytest.mark.skipif(not ROUTERBENCH.exists(),
                                reason=f"recorded data not found at {ROUTERBENCH}")


@pytest.fixture(scope="module")
def subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 40 rows of each RouterBench CSV, in the format as given."""
    if not ROUTERBENCH.exists():
        pytest.skip(f"recorded data not found at {ROUTERBENCH}")
    out = tmp_path_factory.mktemp("routerbench")
    csv.field_size_limit(sys.maxsize)
    for src in sorted(ROUTERBENCH.glob("*.csv")):
        with src.open(newline="") as fh, (out / src.name).open("w", newline="") as dst:
            reader = csv.reader(fh)
            writer = csv.writer(dst)
            for i, row in enumerate(reader):
                if i > 40:
                    break
                writer.writerow(row)
    return out


@pytest.fixture(scope="module")
def shipped_report() -> str:
    """What ``skinflint replay --json --no-curve`` prints for the shipped extract (a replay of
    it takes seconds, and two tests read the same report)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["replay", "--json", "--no-curve"]) == 0
    return out.getvalue()


def test_replay_without_a_dataset_uses_the_shipped_extract(shipped_report: str) -> None:
    """The README's replay example needs no data beside the package: the extract is shipped."""
    report = json.loads(shipped_report)
    assert report["requests"] == 2217  # every sample of the extract (PROVENANCE.md)
    assert 0.3 < report["skinflint"]["cost_share"] < 0.6
    assert report["skinflint"]["quality_share"] > 0.95


def test_replay_json_report(subset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(subset), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["requests"] == len(ReplayProvider(data_path=subset).samples()) > 100
    assert report["baseline"]["model"] == "gpt-4-1106-preview"
    assert set(report["skinflint"]) >= {"cost_usd", "quality"}
    assert 0 < report["skinflint"]["cost_usd"] < report["baseline"]["cost_usd"]
    assert report["cheapest"]["cost_usd"] <= report["best_single"]["cost_usd"]
    assert {p["route"] for p in report["curve"]} == {"auto", "auto-lean"}
    assert sum(report["traffic"].values()) == pytest.approx(1.0)


def test_quality_is_the_label_of_the_returned_answer(subset: Path) -> None:
    outcomes = run_dataset(default_replay_config(), subset, model="auto")
    replay = ReplayProvider(data_path=subset)
    for o in outcomes:
        assert o.correct == (replay.correctness(o.sample.prompt, o.model) or 0)
    cascaded = [o for o in outcomes if "gpt-4" not in o.model]
    assert cascaded, "the route should answer some requests below the premium tier"
    # every premium answer costs at least the premium call itself
    for o in outcomes:
        if o.model == "gpt-4-1106-preview":
            assert o.cost_usd >= o.sample.cost["gpt-4-1106-preview"] - 1e-12


def test_replay_is_deterministic(subset: Path) -> None:
    first = evaluate(subset, curve=False)
    second = evaluate(subset, curve=False)
    assert first["skinflint"] == second["skinflint"] and first["traffic"] == second["traffic"]


def test_single_model_route_matches_recorded_costs(subset: Path) -> None:
    raw = default_replay_config()
    outcomes = run_dataset(raw, subset, model="gpt-4-1106-preview")
    assert sum(o.cost_usd for o in outcomes) == pytest.approx(
        sum(o.sample.cost["gpt-4-1106-preview"] for o in outcomes), rel=1e-9)


def test_train_router_from_recorded_data(subset: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train-router", str(subset), "--out", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tasks"] == ["arc-challenge", "mbpp", "winogrande"]
    assert summary["classifier_cv_accuracy"] > 0.9
    assert 0.5 < summary["scorer_auc"] <= 1.0
    clf = TaskClassifier.load(tmp_path / "classifier.npz")
    assert clf.classify("Write a function to reverse the words of a sentence.")[0] == "mbpp"
    assert (tmp_path / "scorer.npz").exists()


def test_train_router_from_labelled_lines(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    lines = [{"prompt": f"please refund order {i}", "task": "billing"} for i in range(10)]
    lines += [{"prompt": f"my app crashes on screen {i}", "task": "support"} for i in range(10)]
    data = tmp_path / "labelled.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines))
    assert main(["train-router", str(data), "--out", str(tmp_path / "out")]) == 0
    assert "trained on 20 samples" in capsys.readouterr().out
    clf = TaskClassifier.load(tmp_path / "out" / "classifier.npz")
    assert clf.classify("refund my order please")[0] == "billing"
    data.write_text('{"prompt": "no task"}')
    assert main(["train-router", str(data), "--out", str(tmp_path / "o2")]) == 2


@needs_data
def test_shipped_classifier_routes_recorded_prompts() -> None:
    samples = ReplayProvider().samples()[:200]
    from importlib import resources
    clf = TaskClassifier.from_bytes(
        (resources.files("skinflint") / "data" / "classifier.npz").read_bytes())
    assert sum(clf.classify(s.prompt)[0] == s.eval for s in samples) / len(samples) > 0.95


def test_a_missing_recording_is_a_failed_request_not_a_crash(subset: Path, tmp_path: Path) -> None:
    src = next(subset.glob("mbpp*.csv"))
    with src.open(newline="") as fh:
        rows = list(csv.reader(fh))
    header = rows[0]
    gone = header.index("gpt-4-1106-preview|model_response")
    rows[1][gone] = ""  # the premium model's answer to the first prompt was not recorded
    with (tmp_path / src.name).open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    outcomes = run_dataset(default_replay_config(), tmp_path, model="gpt-4-1106-preview")
    failed = [o for o in outcomes if o.tier == "error"]
    assert len(failed) == 1 and failed[0].correct == 0
    assert len(outcomes) == len(rows) - 1


def test_replay_shows_each_strategys_tokens_and_dollars_saved(
        shipped_report: str, capsys: pytest.CaptureFixture[str]) -> None:
    """On the shipped extract: the saving of each strategy is what its ledger rows say; a
    cascade spends the tokens of the tiers it escalated from; the parts add up to the ledger
    baseline less what was spent."""
    report = json.loads(shipped_report)
    _, rows = replay_dataset(default_replay_config(), None)
    attempts = ("cascade_escalated", "retried_attempt")
    clients = [r for r in rows if r.strategy not in attempts]
    s = {x["name"]: x for x in report["strategies"]}
    assert set(s) == {r.strategy or "none" for r in clients}
    for name, mine in s.items():
        answered = [r for r in clients if (r.strategy or "none") == name]
        ids = {r.request_id for r in answered}
        extra = [r for r in rows if r.strategy in attempts and r.request_id.split(".")[0] in ids]
        assert mine["requests"] == len(answered)
        assert mine["saved_usd"] == pytest.approx(sum(r.saved_usd or 0.0 for r in answered))
        assert mine["input_tokens_saved"] == -sum(r.input_tokens for r in extra)
        assert mine["output_tokens_saved"] == -sum(r.output_tokens for r in extra)
    assert s["cascade"]["input_tokens_saved"] < 0 and s["route"]["tokens_saved"] == 0
    assert report["ledger_baseline_usd"] == pytest.approx(
        sum(r.baseline_cost_usd or 0.0 for r in clients))
    assert sum(x["saved_usd"] for x in s.values()) == pytest.approx(
        report["ledger_baseline_usd"] - report["skinflint"]["cost_usd"])
    assert report["tokens"]["processed"] - report["tokens"]["baseline"] == -sum(
        x["tokens_saved"] for x in s.values())

    assert main(["replay", "--no-curve"]) == 0
    text = capsys.readouterr().out
    assert "Saved by each strategy" in text
    assert re.search(r"cascade +│ +[\d,]+ │ +-[\d.,]+[kM]? │ +-[\d.,]+[kM]? │ +\$[\d.]+", text)
