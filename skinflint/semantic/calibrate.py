"""Choose the semantic cache's similarity threshold from labelled pairs, and measure it.

Labelled pairs are JSONL rows ``{"text_a", "text_b", "label"}`` (label 1: one answer serves
both). A pair is a *hit* when the cosine of its embeddings reaches the threshold (and, with the
verifier, :func:`skinflint.semantic.verifier.verify` accepts it). Precision is the share of hits
that are true duplicates (1 - precision is the false-hit rate a user sees), recall the share of
duplicates that hit.

Safety margin: :func:`calibrate` picks the lowest threshold whose precision is at least the
target *with 95% confidence* (the one-sided Wilson lower bound, z = 1.645), not merely in the
sample. Picking the lowest threshold that passes favours thresholds whose sample precision is
luckily high, and the hit count near a high threshold is small (a few hundred pairs), so the
sample precision alone overstates what held-out pairs will show. :func:`split` gives a
deterministic 50/50 split to check the chosen threshold on pairs it was not chosen on, and
:func:`thirds` one for an encoder fine-tuned on pairs: train, calibrate, check.

Run ``python -m skinflint.semantic.calibrate PAIRS.jsonl --out FILE`` to calibrate on one half,
evaluate on the other and write the result (the shipped ``skinflint/data/semantic_default.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from skinflint.embed import Embedder, Vectors
from skinflint.semantic.verifier import verify

__all__ = [
    "CosineCache",
    "Pair",
    "calibrate",
    "curve",
    "evaluate",
    "load_pairs",
    "sample",
    "split",
    "thirds",
]

Z_95 = 1.645  # one-sided 95%
OPERATING_POINTS = (0.9, 0.92, 0.93, 0.94, 0.945, 0.95, 0.96, 0.97, 0.975, 0.98, 0.9825, 0.99)
GRID = tuple(round(0.5 + 0.0025 * i, 4) for i in range(201))  # 0.5 .. 1.0


@dataclass(frozen=True, slots=True)
class Pair:
    text_a: str
    text_b: str
    label: bool

    @property
    def digest(self) -> int:
        """A stable 32-bit hash of the pair, independent of the order of its texts."""
        a, b = sorted((self.text_a, self.text_b))
        return int(hashlib.sha256(f"{a}\x1f{b}".encode()).hexdigest()[:8], 16)


def load_pairs(path: Path, limit: int | None = None) -> list[Pair]:
    """The first ``limit`` (default all) pairs of a JSONL file of text_a, text_b, label.
    Raises ValueError, naming the line, for a line that is not such a pair, or for no pairs."""
    pairs: list[Pair] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(pairs) >= limit:
                break
            if line.strip():
                try:
                    row = json.loads(line)
                    pairs.append(Pair(row["text_a"], row["text_b"], bool(int(row["label"]))))
                except (ValueError, KeyError, TypeError):
                    raise ValueError(
                        f"{path}:{n}: each line must be an object with text_a, text_b, label"
                    ) from None
    if not pairs:
        raise ValueError(f"no pairs in {path}")
    return pairs


def split(pairs: Sequence[Pair]) -> tuple[list[Pair], list[Pair]]:
    """``(calibration half, held-out half)`` by the parity of each pair's hash: deterministic,
    and a pair keeps its side whatever else is in the list."""
    halves: tuple[list[Pair], list[Pair]] = ([], [])
    for pair in pairs:
        halves[pair.digest % 2].append(pair)
    return halves


def thirds(pairs: Sequence[Pair]) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """``(training, calibration, held out)``: hash half 0, and half 1 cut in two by the hash's
    next bit. The ``minilm-questions`` encoder is fine-tuned on the first, so its thresholds are
    chosen on the second and checked on the third, neither of which it has seen."""
    parts: tuple[list[Pair], list[Pair], list[Pair]] = ([], [], [])
    for pair in pairs:
        parts[0 if pair.digest % 2 == 0 else 1 + (pair.digest >> 1) % 2].append(pair)
    return parts


def sample(pairs: Sequence[Pair], n: int) -> list[Pair]:
    """``n`` pairs chosen by hash order: a deterministic, unbiased subset."""
    return sorted(pairs, key=lambda p: p.digest)[:n]


class CosineCache:
    """Cosines of pairs' embeddings, embedding each distinct text once (kept in memory)."""

    def __init__(self, embedder: Embedder, batch: int = 256) -> None:
        self.embedder = embedder
        self._batch = batch
        self._vectors: dict[str, Vectors] = {}

    def cosines(self, pairs: Sequence[Pair]) -> npt.NDArray[np.float64]:
        """One cosine per pair, in order."""
        self._embed_missing(t for p in pairs for t in (p.text_a, p.text_b))
        vectors = self._vectors
        return np.asarray(
            [float(vectors[p.text_a] @ vectors[p.text_b]) for p in pairs], dtype=np.float64
        )

    def _embed_missing(self, texts: Iterable[str]) -> None:
        todo = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        for start in range(0, len(todo), self._batch):
            chunk = todo[start : start + self._batch]
            for text, row in zip(chunk, self.embedder.embed(chunk), strict=True):
                self._vectors[text] = row


def wilson_lower(successes: int, trials: int, z: float = Z_95) -> float:
    """The Wilson score lower bound of a proportion (0 for no trials)."""
    if trials == 0:
        return 0.0
    p = successes / trials
    centre = p + z * z / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return (centre - spread) / (1 + z * z / trials)


def curve(
    cosines: npt.NDArray[np.float64],
    labels: npt.NDArray[np.bool_],
    passed: npt.NDArray[np.bool_],
    thresholds: Sequence[float] = GRID,
) -> list[dict[str, float]]:
    """Precision and recall at each threshold; ``passed`` marks pairs the verifier accepts
    (all True to ignore it). Precision is 1.0 where nothing hits."""
    hit_scores = np.sort(cosines[passed])
    true_scores = np.sort(cosines[passed & labels])
    positives = max(int(labels.sum()), 1)
    out: list[dict[str, float]] = []
    for t in thresholds:
        hits = len(hit_scores) - int(np.searchsorted(hit_scores, t, side="left"))
        true = len(true_scores) - int(np.searchsorted(true_scores, t, side="left"))
        out.append(
            {
                "threshold": float(t),
                "hits": float(hits),
                "precision": true / hits if hits else 1.0,
                "precision_lower": wilson_lower(true, hits),
                "recall": true / positives,
            }
        )
    return out


def scored(
    pairs: Sequence[Pair], cache: CosineCache
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Per pair: the cosine, the label, and whether the verifier accepts it."""
    cosines = cache.cosines(pairs)
    labels = np.asarray([p.label for p in pairs], dtype=bool)
    passed = np.asarray([verify(p.text_a, p.text_b)[0] for p in pairs], dtype=bool)
    return cosines, labels, passed


def calibrate(
    pairs: Sequence[Pair],
    target_precision: float,
    *,
    embedder: Embedder | None = None,
    cache: CosineCache | None = None,
) -> dict[str, Any]:
    """The lowest threshold whose precision on ``pairs`` is at least ``target_precision`` with
    95% confidence, with and without the verifier; the variant with more recall wins (or, when
    neither meets the target, the one with the better-proven precision).

    Returns ``{"threshold", "verifier", "precision", "recall", "precision_lower", "hits",
    "target_precision", "met", "embedder", "pairs", "curve"}``, the curve being the winner's.
    When no threshold meets the target, ``met`` is False and the threshold is the one with the
    highest lower bound, i.e. the most precise that the pairs can vouch for. Pass ``cache`` to
    reuse embeddings across calls, else ``embedder``.
    """
    cache = _cache(embedder, cache)
    cosines, labels, passed = scored(pairs, cache)
    everything = np.ones_like(passed)
    best: dict[str, Any] | None = None
    for use_verifier, mask in ((False, everything), (True, passed)):
        points = curve(cosines, labels, mask)
        chosen = _lowest_meeting(points, target_precision)
        candidate = {"verifier": use_verifier, **chosen, "curve": points}
        if best is None or _rank(candidate) > _rank(best):
            best = candidate
    assert best is not None
    best.update(target_precision=target_precision, embedder=cache.embedder.name, pairs=len(pairs))
    return best


def _rank(candidate: dict[str, Any]) -> tuple[bool, float]:
    """Among variants meeting the target, more recall wins; otherwise better-proven precision."""
    met = bool(candidate["met"])
    return met, float(candidate["recall"] if met else candidate["precision_lower"])


def _lowest_meeting(points: list[dict[str, float]], target: float) -> dict[str, Any]:
    for point in points:
        if point["hits"] > 0 and point["precision_lower"] >= target:
            return {**point, "met": True}
    # Out of reach: the threshold whose precision is best established (highest lower bound).
    best = max(points, key=lambda p: (p["precision_lower"], p["threshold"]))
    return {**best, "met": False}


def evaluate(
    pairs: Sequence[Pair],
    threshold: float,
    verifier: bool,
    *,
    embedder: Embedder | None = None,
    cache: CosineCache | None = None,
) -> dict[str, Any]:
    """Hits, precision, recall and false-hit rate at ``threshold`` on ``pairs``.

    Returns ``{"pairs", "positives", "hits", "false_hits", "precision", "precision_lower",
    "recall", "false_hit_rate", "threshold", "verifier", "embedder"}``; the false-hit rate is
    the share of non-duplicate pairs that hit.
    """
    cache = _cache(embedder, cache)
    cosines, labels, passed = scored(pairs, cache)
    hit = (cosines >= threshold) & (passed if verifier else True)
    hits, true = int(hit.sum()), int((hit & labels).sum())
    positives = int(labels.sum())
    return {
        "pairs": len(pairs),
        "positives": positives,
        "hits": hits,
        "false_hits": hits - true,
        "precision": true / hits if hits else 1.0,
        "precision_lower": wilson_lower(true, hits),
        "recall": true / positives if positives else 0.0,
        "false_hit_rate": (hits - true) / max(len(pairs) - positives, 1),
        "threshold": threshold,
        "verifier": verifier,
        "embedder": cache.embedder.name,
    }


def _cache(embedder: Embedder | None, cache: CosineCache | None) -> CosineCache:
    if cache is not None:
        return cache
    if embedder is None:
        raise ValueError("pass an embedder or a CosineCache")
    return CosineCache(embedder)


def default_config(
    pairs: Sequence[Pair], target_precision: float, cache: CosineCache, source: str, embedder: str
) -> dict[str, Any]:
    """Calibrate on one half of ``pairs``, evaluate on the other: the shipped default's body.
    ``embedder`` is the name :func:`skinflint.embed.load_embedder` knows the embedder by."""
    calibration, held_out = split(pairs)
    chosen = calibrate(calibration, target_precision, cache=cache)
    check = evaluate(held_out, chosen["threshold"], chosen["verifier"], cache=cache)
    return {
        "embedder": embedder,
        "embedder_model": cache.embedder.name,
        "threshold": chosen["threshold"],
        "verifier": chosen["verifier"],
        "precision": round(check["precision"], 4),
        "recall": round(check["recall"], 4),
        "false_hit_rate": round(check["false_hit_rate"], 5),
        "calibrated_on": f"{source}, hash half 0 ({len(calibration)} pairs)",
        "pairs": check["pairs"],
        "evaluated_on": f"{source}, hash half 1 (held out)",
        "target_precision": target_precision,
        "target_met": chosen["met"],
        "calibration": {k: chosen[k] for k in ("precision", "precision_lower", "recall", "hits")},
        "held_out_curve": [_point(held_out, t, cache) for t in OPERATING_POINTS],
    }


def _point(pairs: Sequence[Pair], threshold: float, cache: CosineCache) -> dict[str, float]:
    result = evaluate(pairs, threshold, True, cache=cache)
    return {k: round(float(result[k]), 4) for k in ("threshold", "precision", "recall")}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: calibrate, evaluate on the held-out half, print and optionally write."""
    from skinflint.embed import load_embedder

    parser = argparse.ArgumentParser(prog="python -m skinflint.semantic.calibrate")
    parser.add_argument("pairs", type=Path)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--embedder", default="local")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cache = CosineCache(load_embedder(args.embedder))
    pairs = load_pairs(args.pairs, args.limit)
    result = default_config(pairs, args.target, cache, args.pairs.name, args.embedder)
    text = json.dumps(result, indent=2) + "\n"
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
