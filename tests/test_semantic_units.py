"""Semantic-cache building blocks: the verifier, the vector indexes, threshold calibration."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from skinflint.embed import Vectors
from skinflint.errors import ConfigError
from skinflint.semantic.calibrate import (
    CosineCache,
    Pair,
    calibrate,
    curve,
    evaluate,
    load_pairs,
    sample,
    scored,
    split,
    thirds,
    wilson_lower,
)
from skinflint.semantic.index import HnswIndex, NumpyIndex, VectorIndex
from skinflint.semantic.verifier import verify

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
QQP = DATA / "semantic_cache" / "qqp_pairs_dev.jsonl"
DEFAULT = Path(__file__).resolve().parents[1] / "skinflint" / "data" / "semantic_default.json"

# --- verifier ---------------------------------------------------------------------------------

SAME = [
    ("How do I convert a string to an int in Python?", "how to convert string into int in python"),
    ("What is the capital of France?", "what's the capital of france"),
    ("Why can't I sleep at night?", "Why I cannot sleep at night"),
    ("What is 1,000 + 2?", "What is 1000 + 2?"),
    ("How do I become a good software architect?", "How do you become a good software architect?"),
    ("Which universities for MS in CS should I apply to?",
     "Which universities should I apply for MS in CS?"),
    ("What is the difference between a virus and bacteria?",
     "What is the difference between bacteria and a virus?"),
    ("What happened in the 1990s?", "what happened in the 1990s"),
    ("Which is the best dancing academy in town?", "Which is the best dance academy in town?"),
    ("What if my dog tried to bite me?", "What if my dog tries to bite me?"),
    ("How do I move to Canada from India?", "How can I move from India to Canada?"),
    ("How do I get from the airport to the city?", "How do I get to the city from the airport?"),
]
DIFFERENT = [
    ("convert string to int", "convert int to string", "order"),
    ("How do I convert 5 F to C?", "How do I convert 5 C to F?", "order"),
    ("Flights from Paris to London", "flights from London to Paris", "order"),
    ("Is Apple better than Samsung?", "Is Samsung better than Apple?", "order"),
    # "to" twice: the pointing word repeats
    ("how to go from paris to london by train", "how to go from london to paris by train",
     "order"),
    ("how to convert kilometers to miles", "how to convert miles to kilometers", "order"),
    ("How to copy files from the server to my laptop",
     "How to copy files from my laptop to the server", "order"),
    ("What is 2 + 3?", "What is 2 + 4?", "numbers"),
    ("I found a few thousand dollars", "I found a few hundred dollars", "numbers"),
    ("Show sales for 2016", "Show sales for 2017", "numbers"),
    ("Book a table for Monday", "Book a table for Tuesday", "dates"),
    ("Schedule it for March", "Schedule it for April", "dates"),
    ("Why is the sky blue?", "Why is the sky not blue?", "negation"),
    ("Can I run it without root?", "Can I run it with root?", "negation"),
    ("Why doesn't my code compile?", "Why does my code compile?", "negation"),
    # both negate once elsewhere: a negation added is still a difference
    ("Michael was a better employer than Joel so _ did not have to worry about retaining "
     "employees. Answer without explanation.",
     "Michael was a better employer than Joel so _ had to worry about retaining employees. "
     "Answer without explanation.", "negation"),
    ("How do I learn Java quickly?", "How do I learn Python quickly?", "entities"),
    ("Best rehab center near Warren County", "Best rehab center near Peach County", "entities"),
    ("She watered the rose, the soil of the _ was already wet.",
     "She watered the rose, the soil of the _ was already dry.", "one word replaced"),
    ("Should I increase the dose slowly?", "Should I reduce the dose slowly?", "one word replaced"),
    ("How do I restart the server?", "How do I restore the server?", "one word replaced"),
    ("Monica enjoys vodka but Felicia prefers whiskey because _ likes dark liquors. A) Monica "
     "B) Felicia", "Monica enjoys vodka but Felicia prefers whiskey because _ likes clear "
     "liquors. A) Felicia B) Monica", "one word replaced"),  # and two words moved
    ("Why does my laptop overclock?", "Why does my laptop overheat?", "one word replaced"),
    ("Compare the HP LaserJet M604n", "Compare the HP LaserJet M604dn", "entities"),
    ("What does ~ mean in C++?", "What does % mean in C++?", "symbols"),
    ("Where was Mike Shinoda born?", "When was Mike Shinoda born?", "question"),
    ("Arguments for virtue ethics", "Arguments against virtue ethics", "opposites"),
    ("How do I encrypt a file?", "How do I decrypt a file?", "opposites"),
]


@pytest.mark.parametrize(("a", "b"), SAME)
def test_verifier_accepts_rewordings(a: str, b: str) -> None:
    assert verify(a, b) == (True, "")
    assert verify(b, a) == (True, "")


@pytest.mark.parametrize(("a", "b", "kind"), DIFFERENT)
def test_verifier_rejects_near_misses_and_says_why(a: str, b: str, kind: str) -> None:
    for left, right in ((a, b), (b, a)):
        ok, reason = verify(left, right)
        assert not ok
        assert kind in reason


def test_verifier_is_fast_on_long_prompts() -> None:
    long_a = " ".join(f"word{i} and Name{i}" for i in range(3000))
    ok, _ = verify(long_a, long_a + " tail")
    assert ok


# --- indexes ----------------------------------------------------------------------------------

def _unit(seed: int, n: int, dim: int = 8) -> Vectors:
    rows = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return np.asarray(rows / np.linalg.norm(rows, axis=1, keepdims=True), dtype=np.float32)


def _graph_only(dim: int) -> VectorIndex:
    return HnswIndex(dim, exact_up_to=0, background=False)


def _promoting(dim: int) -> VectorIndex:
    return HnswIndex(dim, exact_up_to=10, background=False)  # the tests' scopes outgrow it


def _indexes() -> list[Callable[[int], VectorIndex]]:
    makers: list[Callable[[int], VectorIndex]] = [NumpyIndex]
    if importlib.util.find_spec("hnswlib") is not None:
        makers += [HnswIndex, _graph_only, _promoting]
    return makers


@pytest.fixture(params=_indexes(), ids=lambda make: getattr(make, "__name__", "index"))
def index(request: pytest.FixtureRequest) -> VectorIndex:
    make: Callable[[int], VectorIndex] = request.param
    return make(8)


needs_hnswlib = pytest.mark.skipif(importlib.util.find_spec("hnswlib") is None,
                                   reason="hnswlib is not installed")


@needs_hnswlib
def test_hnsw_index_keeps_small_scopes_exact_and_frees_empty_graphs() -> None:
    """An hnswlib graph costs megabytes however few entries it holds: only a scope that
    outgrows the exact scan gets one, and it goes when the scope empties."""
    index = HnswIndex(8, exact_up_to=10, background=False)
    vectors = _unit(5, 12)
    for scope in range(50):  # many small scopes, as conversations make
        index.add(f"c{scope}", f"c{scope}-k", vectors[0])
    assert index.graphs() == 0 and len(index) == 50
    for i, v in enumerate(vectors):
        index.add("big", f"k{i}", v)
    assert index.graphs() == 1 and len(index) == 62
    assert index.search("big", vectors[3], k=1)[0][0] == "k3"
    assert index.search("c7", vectors[0], k=2) == [("c7-k", pytest.approx(1.0, abs=1e-5))]
    for i in range(12):
        index.remove(f"k{i}")
    assert index.graphs() == 0 and index.search("big", vectors[3], k=1) == []
    index.add("big", "again", vectors[1])  # an emptied scope starts over, scanned
    assert index.graphs() == 0 and index.search("big", vectors[1], k=1)[0][0] == "again"


def test_index_finds_the_nearest_vector_first(index: VectorIndex) -> None:
    vectors = _unit(1, 50)
    for i, v in enumerate(vectors):
        index.add("tenant:1", f"k{i}", v)
    assert len(index) == 50
    hits = index.search("tenant:1", vectors[7], k=3)
    assert hits[0][0] == "k7" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert len(hits) == 3 and hits[0][1] >= hits[1][1] >= hits[2][1]
    assert len(index.search("tenant:1", vectors[0], k=500)) == 50


def test_index_scopes_are_isolated(index: VectorIndex) -> None:
    v = _unit(2, 1)[0]
    index.add("user:a", "answer-a", v)
    assert index.search("user:b", v, k=5) == []
    index.add("user:b", "answer-b", v)
    assert [key for key, _ in index.search("user:b", v, k=5)] == ["answer-b"]
    assert [key for key, _ in index.search("user:a", v, k=5)] == ["answer-a"]


def test_index_remove_and_replace(index: VectorIndex) -> None:
    vectors = _unit(3, 20)
    for i, v in enumerate(vectors):
        index.add("s", f"k{i}", v)
    assert index.remove("k5") and not index.remove("k5")
    assert all(key != "k5" for key, _ in index.search("s", vectors[5], k=20))
    assert len(index) == 19
    index.add("s", "k6", vectors[5])  # replaces k6's vector
    assert index.search("s", vectors[5], k=1)[0][0] == "k6"
    index.add("other", "k6", vectors[5])  # moves k6 to another scope
    assert all(key != "k6" for key, _ in index.search("s", vectors[5], k=20))
    assert len(index) == 19
    for i in range(20):
        index.remove(f"k{i}")
    assert len(index) == 0 and index.search("s", vectors[0], k=3) == []


def test_index_add_many_matches_add(index: VectorIndex) -> None:
    vectors = _unit(4, 30)
    index.add("s", "k0", vectors[29])
    keys = [f"k{i}" for i in range(30)]
    index.add_many("s", [*keys, "k1"], np.vstack([vectors, vectors[2:3]]))
    assert len(index) == 30
    assert index.search("s", vectors[0], k=1)[0][0] == "k0"  # replaced by its new row
    hits = dict(index.search("s", vectors[2], k=30))
    assert set(hits) == set(keys) and hits["k1"] == pytest.approx(1.0, abs=1e-5)


def test_index_rejects_vectors_of_the_wrong_size(index: VectorIndex) -> None:
    with pytest.raises(ValueError):
        index.add("s", "k", np.ones(3, dtype=np.float32))


@needs_hnswlib
def test_hnsw_graph_built_in_the_background_keeps_changes_made_meanwhile() -> None:
    """The scope is scanned while its graph is built; additions, replacements and removals
    made meanwhile are all in the graph once it is swapped in."""
    index = HnswIndex(8, exact_up_to=200)
    vectors = _unit(6, 400)
    index.add_many("s", [f"k{i}" for i in range(201)], vectors[:201])  # starts the build
    index.add("s", "late", vectors[300])
    index.add("s", "k5", vectors[301])  # replaced
    index.remove("k7")
    assert index.search("s", vectors[300], k=1)[0][0] == "late"  # scanned or graph: found
    deadline = time.monotonic() + 30
    while index.graphs() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert index.graphs() == 1 and len(index) == 201
    assert index.search("s", vectors[300], k=1)[0][0] == "late"
    assert index.search("s", vectors[301], k=1)[0][0] == "k5"
    assert all(key != "k7" for key, _ in index.search("s", vectors[7], k=5))
    assert index.search("s", vectors[9], k=1)[0][0] == "k9"


@needs_hnswlib
def test_hnsw_try_search_never_waits_for_the_index() -> None:
    index = HnswIndex(8, exact_up_to=0, background=False)
    vectors = _unit(7, 3)
    index.add_many("s", ["a", "b", "c"], vectors)
    assert index.try_search("s", vectors[1], k=1) == index.search("s", vectors[1], k=1)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with index._lock:  # as a graph growing on another thread holds it
            held.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    try:
        assert index.try_search("s", vectors[1], k=1) is None
    finally:
        release.set()
        holder.join()


# --- calibration ------------------------------------------------------------------------------

class _TableEmbedder:
    """Unit vectors read from a table, so cosines are exactly what a test sets."""

    name = "table"
    dim = 2

    def __init__(self, angles: dict[str, float]) -> None:
        self.angles = angles

    def embed(self, texts: list[str]) -> Vectors:
        a = np.asarray([self.angles[t] for t in texts], dtype=np.float64)
        return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def _pairs_with_cosines(rows: list[tuple[float, bool]]) -> tuple[list[Pair], _TableEmbedder]:
    angles: dict[str, float] = {}
    pairs = []
    for i, (cos, label) in enumerate(rows):
        a, b = f"question number {i}", f"question number {i} reworded"
        angles[a], angles[b] = 0.0, float(np.arccos(cos))
        pairs.append(Pair(a, b, label))
    return pairs, _TableEmbedder(angles)


def test_calibrate_picks_the_lowest_threshold_proven_precise() -> None:
    # Above 0.9 every pair is a duplicate; below it, half are.
    rows = [(0.95, True)] * 200 + [(0.85, True), (0.85, False)] * 100 + [(0.5, False)] * 100
    pairs, embedder = _pairs_with_cosines(rows)
    result = calibrate(pairs, 0.95, embedder=embedder)
    assert result["met"] and 0.85 < result["threshold"] <= 0.95
    assert result["precision"] == 1.0 and result["recall"] == pytest.approx(200 / 300)
    check = evaluate(pairs, result["threshold"], result["verifier"], embedder=embedder)
    assert check["precision"] == 1.0 and check["false_hits"] == 0
    unreachable = calibrate(pairs, 0.999, embedder=embedder)
    assert not unreachable["met"]


def test_curve_and_wilson_bound() -> None:
    cos = np.asarray([0.99, 0.9, 0.8, 0.7])
    labels = np.asarray([True, True, False, True])
    points = curve(cos, labels, np.ones(4, dtype=bool), thresholds=[0.75, 0.95, 1.0])
    assert [p["hits"] for p in points] == [3, 1, 0]
    assert points[0]["precision"] == pytest.approx(2 / 3)
    assert points[0]["recall"] == pytest.approx(2 / 3)
    assert points[2]["precision"] == 1.0
    assert 0.0 < wilson_lower(9, 10) < wilson_lower(900, 1000) < 0.9
    assert wilson_lower(0, 0) == 0.0


def test_scored_pairs_carry_cosine_label_and_verdict() -> None:
    pairs, embedder = _pairs_with_cosines([(0.99, True), (0.5, False)])
    pairs.append(Pair("convert string to int", "convert int to string", False))
    embedder.angles.update({"convert string to int": 0.0, "convert int to string": 0.0})
    cosines, labels, passed = scored(pairs, CosineCache(embedder))
    assert cosines == pytest.approx([0.99, 0.5, 1.0], abs=1e-6)
    assert labels.tolist() == [True, False, False]
    assert passed.tolist() == [True, True, False]  # the verifier sees the swapped order


def _semantic_bench() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "bench" / "semantic_cache.py"
    spec = importlib.util.spec_from_file_location("semantic_cache_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_reports_the_best_precision_at_a_recall_and_the_labels_noise() -> None:
    bench = _semantic_bench()
    rows = [(0.99, True)] * 40 + [(0.98, False)] * 10 + [(0.9, True)] * 60 + [(0.5, False)] * 10
    pairs, embedder = _pairs_with_cosines(rows)
    cache = CosineCache(embedder)
    off = next(r for r in bench.frontier(cache, pairs, 0.4) if not r["verifier"])
    assert off["best_precision"] == 1.0  # the 40 pairs at 0.99 are all duplicates
    off = next(r for r in bench.frontier(cache, pairs, 0.5) if not r["verifier"])
    assert off["best_precision"] == pytest.approx(50 / 60, abs=1e-4)  # past the ten at 0.98
    labels = bench.label_check([
        Pair("How do I overcome fear ?", "how do I overcome fear?", False),
        Pair("What is C++?", "What is C?", False),
        Pair("Why is the sky blue?", "Why is the sky blue", True),
    ])
    assert labels == {"pairs": 3, "same_text": 2, "same_text_labelled_different": 1}


def test_split_is_deterministic_and_order_free() -> None:
    pairs = [Pair(f"a{i}", f"b{i}", i % 2 == 0) for i in range(200)]
    first, second = split(pairs)
    assert len(first) + len(second) == 200 and 60 < len(first) < 140
    assert split(list(reversed(pairs)))[0] == list(reversed(first))
    assert Pair("x", "y", True).digest == Pair("y", "x", True).digest
    assert sample(pairs, 10) == sample(list(reversed(pairs)), 10)


def test_thirds_keep_training_pairs_out_of_calibration_and_evaluation() -> None:
    pairs = [Pair(f"a{i}", f"b{i}", i % 2 == 0) for i in range(400)]
    training, calibration, held_out = thirds(pairs)
    assert training == split(pairs)[0]  # the half minilm-questions was trained on
    assert sorted(calibration + held_out, key=pairs.index) == split(pairs)[1]
    assert 50 < len(calibration) < 150 and 50 < len(held_out) < 150
    assert thirds(list(reversed(pairs)))[1] == list(reversed(calibration))


needs_data = pytest.mark.skipif(
    not QQP.is_file(), reason=f"labelled pairs not found at {QQP} (shared data is absent)"
)


@needs_data
def test_calibration_on_a_quora_subset_reaches_the_asked_precision() -> None:
    pairs = sample(load_pairs(QQP, limit=4000), 300)
    from skinflint.embed import load_embedder

    try:
        embedder = load_embedder("local")
    except Exception as exc:  # the model's packages may be missing; hashing still tests the logic
        if "not installed" not in str(exc):
            raise
        embedder = load_embedder("hashing")
    cache = CosineCache(embedder)
    result = calibrate(pairs, 0.8, cache=cache)
    assert result["met"], result
    check = evaluate(pairs, result["threshold"], result["verifier"], cache=cache)
    assert check["precision"] >= 0.8 and check["hits"] > 0
    assert check["recall"] == pytest.approx(result["recall"])


@needs_data
def test_the_fine_tuned_encoder_separates_unseen_quora_pairs_better() -> None:
    """On pairs the fine-tuning never saw, a duplicate outranks a non-duplicate more often."""
    from skinflint.embed import load_embedder

    try:
        tuned, published = load_embedder("minilm-questions"), load_embedder("local")
    except ConfigError as exc:
        pytest.skip(str(exc))
    pairs = sample(thirds(load_pairs(QQP))[2], 1500)
    labels = np.asarray([p.label for p in pairs])
    aucs = []
    for embedder in (tuned, published):
        scores = CosineCache(embedder).cosines(pairs)
        ranks = scores.argsort().argsort()  # ties are rare among float cosines
        positives = int(labels.sum())
        aucs.append((ranks[labels].sum() - positives * (positives - 1) / 2)
                    / (positives * (len(pairs) - positives)))
    assert aucs[0] > aucs[1] + 0.015, aucs


def test_another_embedder_needs_its_own_threshold() -> None:
    """The shipped threshold belongs to the embedder it was calibrated for; any other embedder's
    vectors need a threshold chosen for them, so the gateway refuses to guess one."""
    from skinflint.config import settings_from_dict
    from skinflint.pipeline.cache import semantic_setting

    def setting(semantic: dict[str, object]) -> tuple[float, bool]:
        return semantic_setting(settings_from_dict({"cache": {"semantic": semantic}}, env={}))

    shipped = json.loads(DEFAULT.read_text())
    assert setting({"enabled": True})[0] == shipped["threshold"]
    assert setting({"enabled": True, "embedder": "minilm"})[0] == shipped["threshold"]  # alias
    assert setting({"enabled": True, "embedder": "minilm-questions", "threshold": 0.97})[0] == 0.97
    assert setting({"embedder": "hashing"})[0] == shipped["threshold"]  # off: nothing to guess
    for semantic in ({"enabled": True, "embedder": "minilm-questions"},
                     {"embedder": "hashing", "features": {"support": {"enabled": True}}}):
        with pytest.raises(ConfigError, match="skinflint cache calibrate"):
            setting(semantic)


def test_shipped_default_is_complete() -> None:
    default = json.loads(DEFAULT.read_text())
    for key in ("embedder", "threshold", "verifier", "precision", "recall", "calibrated_on",
                "pairs"):
        assert key in default
    assert 0.5 < default["threshold"] <= 1.0 and isinstance(default["verifier"], bool)


# --- long messages ----------------------------------------------------------------------------


def test_split_question_keeps_short_text_whole_and_splits_long_text() -> None:
    from skinflint.pipeline.cache import split_question

    assert split_question("What is my balance?", 100) == ("", "What is my balance?")
    doc = "x" * 150
    assert split_question(f"{doc}\n\nWhat is my balance?\n", 100) == (doc, "What is my balance?")
    assert split_question(f"{doc}\nline two\n" + "y" * 150 + "\nWhat now?", 100) == (
        f"{doc}\nline two\n" + "y" * 150, "What now?")
    assert split_question(doc + " What is my balance?", 100) is None
    assert split_question(f"{doc}\n\n" + "z" * 150, 100) is None
