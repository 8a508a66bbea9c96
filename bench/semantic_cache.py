"""Semantic cache benchmark: hit and false-hit rates per embedder, and lookup latency.

Quality, on labelled Quora duplicate pairs (``shared/data/semantic_cache/qqp_pairs_dev.jsonl``),
split by hash as :func:`skinflint.semantic.calibrate.thirds` does (half 0 trained the
``minilm-questions`` encoder and is not used here): for each embedder (the local default,
``minilm-questions``, WordLlama when installed, character hashing), a threshold is calibrated on
``--pairs`` pairs of the calibration quarter for each ``--targets`` precision (for the local
embedder, the shipped default is also measured) and applied, with and without the verifier, to
``--pairs`` pairs of the held-out quarter.
*Hit rate* is the share of held-out pairs served from the cache, *false-hit rate* the share of
non-duplicate pairs served (a wrong answer), precision the share of hits that were right. For
each embedder the run also reports the best precision any threshold reaches while serving
``--recall`` of the held-out duplicates, and, over all pairs, how many pairs have the same text
but for case, spaces and punctuation yet are labelled "not duplicate" (the labels' own noise).

Latency: single-text embedding time by text length; index search alone and embedding plus
search, p50/p99 over ``--queries`` queries, with 1k, 10k and 100k entries in one scope (the worst
case: a scope's search scans only that scope), and through the gateway's embedded store filled
with ``--store-entries`` additions. Entries are random unit vectors: search time does
not depend on their content. HNSW is built at sizes up to ``--hnsw-max``, as a graph even at
1k entries (the gateway's index scans a scope exactly until it holds 5k). Latency is measured
as the gateway runs: with the garbage-collector thresholds ``skinflint serve`` sets and one BLAS
thread (the ``skinflint`` command sets ``OPENBLAS_NUM_THREADS=1`` and its siblings unless they
are set; so does this script, before numpy loads).

Each run appends one JSON object to ``bench/results/semantic_cache.jsonl`` and prints a summary.
Runtime: about a minute with the defaults on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

# As the skinflint command does, before numpy loads: one BLAS thread unless told otherwise.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from skinflint.embed import Embedder, load_embedder  # noqa: E402
from skinflint.semantic.calibrate import (  # noqa: E402
    CosineCache,
    Pair,
    calibrate,
    evaluate,
    load_pairs,
    sample,
    scored,
    thirds,
)
from skinflint.semantic.index import HnswIndex, NumpyIndex, VectorIndex  # noqa: E402
from skinflint.server.run import GC_THRESHOLDS  # noqa: E402
from skinflint.storage.semantic import LocalSemanticIndex  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results" / "semantic_cache.jsonl"
PAIRS = ROOT.parent / "shared" / "data" / "semantic_cache" / "qqp_pairs_dev.jsonl"
DEFAULT = ROOT / "skinflint" / "data" / "semantic_default.json"
SIZES = (1_000, 10_000, 100_000)


def percentiles(samples_s: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4),
            "p99_ms": round(float(np.percentile(ms, 99)), 4)}


def timed(calls: Sequence[Callable[[], object]]) -> list[float]:
    out = []
    for call in calls:
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


def embedders() -> list[str]:
    names = ["local", "minilm-questions"]
    if importlib.util.find_spec("wordllama") is not None:
        names.append("wordllama")
    return [*names, "hashing"]


def quality(name: str, cache: CosineCache, cal: list[Pair], held: list[Pair],
            targets: Sequence[float], shipped: dict[str, Any]) -> list[dict[str, Any]]:
    """Held-out hit and false-hit rates at the embedder's own threshold calibrated for each
    target precision (and, for the shipped embedder, at the shipped threshold), with and
    without the verifier."""
    settings: list[tuple[str, float, float, bool | None]] = []
    if name == shipped.get("embedder"):
        settings.append(("shipped", float(shipped["target_precision"]),
                         float(shipped["threshold"]), None))
    for target in targets:
        chosen = calibrate(cal, target, cache=cache)
        settings.append(("calibrated", target, float(chosen["threshold"]), bool(chosen["met"])))
    rows = []
    for source, target, threshold, met in settings:
        for verifier in (True, False):
            result = evaluate(held, threshold, verifier, cache=cache)
            rows.append({
                "embedder": name, "model": cache.embedder.name, "threshold_source": source,
                "target": target, "threshold": threshold, "verifier": verifier,
                "pairs": result["pairs"],
                "hit_rate": round(result["hits"] / max(result["pairs"], 1), 4),
                "false_hit_rate": round(result["false_hit_rate"], 4),
                "precision": round(result["precision"], 4),
                "recall": round(result["recall"], 4),
                "calibration_met": met,
            })
    return rows


def frontier(cache: CosineCache, held: list[Pair], recall: float) -> list[dict[str, Any]]:
    """The best precision any threshold of this embedder reaches on the held-out pairs while
    serving at least ``recall`` of the duplicates, with and without the verifier."""
    cosines, labels, passed = scored(held, cache)
    rows = []
    for verifier in (True, False):
        mask = passed if verifier else np.ones_like(passed)
        ranked = labels[mask][np.argsort(-cosines[mask], kind="stable")]
        true = np.cumsum(ranked)
        reach = np.flatnonzero(true >= recall * labels.sum())
        precision = float(true[reach[0]] / (reach[0] + 1)) if len(reach) else None
        rows.append({"embedder": cache.embedder.name, "verifier": verifier, "recall": recall,
                     "best_precision": None if precision is None else round(precision, 4)})
    return rows


def label_check(pairs: list[Pair]) -> dict[str, int]:
    """Pairs whose two texts are the same but for case, spaces and sentence punctuation, and
    how many of them are labelled "not duplicate": hits that no cache can avoid counting as
    false on these labels."""
    def bare(text: str) -> str:
        return re.sub(r"[\s.,;:!?]+", "", text.lower())
    same = [p for p in pairs if bare(p.text_a) == bare(p.text_b)]
    return {"pairs": len(pairs), "same_text": len(same),
            "same_text_labelled_different": sum(not p.label for p in same)}


def embed_latency(embedder: Embedder, texts: list[str]) -> dict[str, Any]:
    """Single-text embedding time over real queries, and by length for a repeated sentence."""
    embedder.embed(texts[:5])  # warm-up
    out: dict[str, Any] = {"queries": percentiles(timed([partial(embedder.embed, [t])
                                                         for t in texts]))}
    sentence = "the quick brown fox jumps over the lazy dog and "
    for words in (10, 50, 100, 200):
        text = " ".join((sentence * 25).split()[:words])
        out[f"{words}_words"] = percentiles(timed([partial(embedder.embed, [text])] * 30))
    return out


def _lookup(embedder: Embedder, index: VectorIndex, query: str) -> object:
    return index.search("bench", embedder.embed([query])[0], 4)


def lookup_latency(embedder: Embedder, queries: list[str], hnsw_max: int) -> list[dict[str, Any]]:
    """Index-only and embed+search latency with one scope of each size."""
    rng = np.random.default_rng(0)
    query_vectors = embedder.embed(queries)
    rows = []
    makers: list[tuple[str, Callable[[int], VectorIndex]]] = [("numpy", NumpyIndex)]
    if importlib.util.find_spec("hnswlib") is not None:
        # a graph at every size, built before the search is timed
        makers.append(("hnsw", partial(HnswIndex, exact_up_to=0, background=False)))
    for size in SIZES:
        table = rng.standard_normal((size, embedder.dim)).astype(np.float32)
        table /= np.linalg.norm(table, axis=1, keepdims=True)
        keys = [f"k{i}" for i in range(size)]
        for kind, make in makers:
            if kind == "hnsw" and size > hnsw_max:
                continue
            index = make(embedder.dim)
            start = time.perf_counter()
            index.add_many("bench", keys, table)
            build_s = time.perf_counter() - start
            only = timed([partial(index.search, "bench", v, 4) for v in query_vectors])
            both = timed([partial(_lookup, embedder, index, q) for q in queries])
            rows.append({"index": kind, "entries": size, "build_s": round(build_s, 2),
                         "search": percentiles(only), "embed_and_search": percentiles(both)})
    return rows


def store_latency(embedder: Embedder, queries: list[str], entries: int) -> dict[str, Any]:
    """Search and embed+search through the gateway's embedded store (``LocalSemanticIndex``:
    SQLite behind, the default capacity, so a scope past 5k entries gets its HNSW graph),
    filled by ``entries`` additions as the gateway makes them."""
    async def measure() -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as folder:
            store = LocalSemanticIndex(str(Path(folder) / "s.db"), embedder.name, embedder.dim)
            rng = np.random.default_rng(1)
            table = rng.standard_normal((entries, embedder.dim)).astype(np.float32)
            table /= np.linalg.norm(table, axis=1, keepdims=True)
            start = time.perf_counter()
            for i in range(entries):
                await store.add("bench", f"k{i}", "q", table[i])
            while getattr(store._index, "_building", None):  # the graph, built in background
                await asyncio.sleep(0.05)
            fill_s = time.perf_counter() - start
            vectors = embedder.embed(queries)
            only, both = [], []
            for query, vector in zip(queries, vectors, strict=True):
                t0 = time.perf_counter()
                await store.search("bench", vector, 4)
                t1 = time.perf_counter()
                await store.search("bench", embedder.embed([query])[0], 4)
                both.append(time.perf_counter() - t1)
                only.append(t1 - t0)
            await store.close()
        return {"index": "store", "entries": entries, "build_s": round(fill_s, 2),
                "search": percentiles(only), "embed_and_search": percentiles(both)}
    return asyncio.run(measure())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pairs", type=int, default=2000,
                        help="pairs from each quarter (calibration and held out)")
    parser.add_argument("--targets", type=float, nargs="+", default=None,
                        help="precisions to calibrate for (default: the shipped default's)")
    parser.add_argument("--recall", type=float, default=0.40,
                        help="recall at which each embedder's best precision is reported")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--hnsw-max", type=int, default=10_000,
                        help="largest index size at which HNSW is built (100k takes ~1 min)")
    parser.add_argument("--latency-only", action="store_true", help="skip hit and false-hit rates")
    parser.add_argument("--store-entries", type=int, default=10_000,
                        help="entries added through the gateway's embedded store (0: skip)")
    parser.add_argument("--data", type=Path, default=PAIRS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def summary(record: dict[str, Any]) -> str:
    lines = ["embedder         source     target threshold verifier hit_rate false_hits precision "
             "recall"]
    for r in record["quality"]:
        lines.append(f"{r['embedder']:<16} {r['threshold_source']:<10} {r['target']:>6.2f} "
                     f"{r['threshold']:>9.4f} "
                     f"{r['verifier']!s:<8} {r['hit_rate']:>8.3f} {r['false_hit_rate']:>10.4f} "
                     f"{r['precision']:>9.3f} {r['recall']:>6.3f}")
    for r in record["frontier"]:
        best = r["best_precision"]
        lines.append(f"best precision at recall {r['recall']:.2f}: {r['embedder']}, verifier "
                     f"{'on' if r['verifier'] else 'off'}: "
                     + ("out of reach" if best is None else f"{best:.3f}"))
    if "labels" in record:
        labels = record["labels"]
        lines.append(f"labels: {labels['same_text']} of {labels['pairs']} pairs have the same "
                     f"text but for case, spaces and punctuation; "
                     f"{labels['same_text_labelled_different']} of those are labelled different")
    lines.append("embedding (local), ms p50/p99: " + ", ".join(
        f"{k} {v['p50_ms']:.2f}/{v['p99_ms']:.2f}" for k, v in record["embed_latency"].items()))
    lines.append("index       entries  search p50/p99 ms  embed+search p50/p99 ms")
    for r in record["lookup"]:
        s, b = r["search"], r["embed_and_search"]
        lines.append(f"{r['index']:<10} {r['entries']:>8}  {s['p50_ms']:>7.3f}/{s['p99_ms']:<8.3f}"
                     f"  {b['p50_ms']:>7.3f}/{b['p99_ms']:.3f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if not args.data.is_file():
        print(f"labelled pairs not found at {args.data}", file=sys.stderr)
        return 2
    shipped = json.loads(DEFAULT.read_text())
    pairs = load_pairs(args.data)
    _, cal, held = (sample(part, args.pairs) for part in thirds(pairs))
    targets = args.targets or [float(shipped.get("target_precision", 0.95))]
    started = time.perf_counter()
    local = load_embedder("local")
    queries = [p.text_a for p in held[: args.queries]]
    record: dict[str, Any] = {
        "bench": "semantic_cache",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "processor": platform.processor()},
        "pairs_per_quarter": args.pairs, "target_precisions": targets,
        "quality": [], "frontier": [],
        "gc_thresholds": GC_THRESHOLDS,
        "blas_threads": os.environ["OPENBLAS_NUM_THREADS"],
    }
    if not args.latency_only:
        record["labels"] = label_check(pairs)
        for name in embedders():
            cache = CosineCache(load_embedder(name))
            record["quality"] += quality(name, cache, cal, held, targets, shipped)
            record["frontier"] += frontier(cache, held, args.recall)
    gc.set_threshold(*GC_THRESHOLDS)
    record["embed_latency"] = embed_latency(local, queries)
    record["lookup"] = lookup_latency(local, queries, args.hnsw_max)
    if args.store_entries:
        record["lookup"].append(store_latency(local, queries, args.store_entries))
    record["runtime_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(summary(record))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
