"""``skinflint train-router``: the task classifier and the correctness scorer, trained from
recorded data (RouterBench CSVs or a replay extract) or from labelled ``{prompt, task}`` lines."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from skinflint.providers.replay import ReplayProvider, ReplaySample
from skinflint.routing.classifier import TaskClassifier
from skinflint.routing.gates import answer_key
from skinflint.routing.scorer import CorrectnessScorer, Example

__all__ = ["FORMATS", "scorer_examples", "train_router"]

#: The answer format of each recorded benchmark, as a cascade gate would check it.
FORMATS: dict[str, tuple[str | None, str]] = {
    "arc-challenge": ("choice", "ABCD"), "winogrande": ("choice", "AB"), "mbpp": ("code", ""),
}


def _labelled(path: Path) -> tuple[list[str], list[str]]:
    texts, tasks = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
        if not isinstance(item, dict) or not {"prompt", "task"} <= set(item):
            raise ValueError(f"{path}:{n}: each line must be an object with prompt and task")
        texts.append(str(item["prompt"]))
        tasks.append(str(item["task"]))
    return texts, tasks


def _cv_accuracy(texts: Sequence[str], tasks: Sequence[str], folds: int = 5) -> float:
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    right = 0
    for k in range(folds):
        test = set(order[k::folds])
        train = [i for i in order if i not in test]
        clf = TaskClassifier.train([texts[i] for i in train], [tasks[i] for i in train])
        right += sum(clf.classify(texts[i])[0] == tasks[i] for i in test)
    return right / len(texts)


def scorer_examples(samples: Sequence[ReplaySample], seed: int = 0) -> list[Example]:
    """For every recorded answer: one example on its own, and one as a later cascade tier
    beside another model's answer (agreement 1 or 0), so the scorer learns both cases."""
    rng = random.Random(seed)
    out: list[Example] = []
    for s in samples:
        fmt, choices = FORMATS.get(s.eval, (None, ""))
        keys = {m: answer_key(r, fmt=fmt, choices=choices) for m, r in s.responses.items()}
        models = [m for m in s.responses if s.correct.get(m) is not None]
        for m in models:
            label = int(s.correct[m] or 0)
            out.append(Example(s.prompt, s.responses[m], m, None, label))
            other = rng.choice([o for o in models if o != m] or [m])
            agree = float(keys[m] == keys[other] and keys[m] != "")
            out.append(Example(s.prompt, s.responses[m], m, agree, label))
    return out


def _auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    order = np.argsort(scores)
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = np.asarray(labels) == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return 0.5
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _scorer_auc(samples: Sequence[ReplaySample]) -> float:
    """AUC on a held-out fifth of the prompts (no prompt seen in training)."""
    held = {s.id for i, s in enumerate(samples) if i % 5 == 0}
    train = scorer_examples([s for s in samples if s.id not in held])
    test = scorer_examples([s for s in samples if s.id in held])
    scorer = CorrectnessScorer.train(train)
    return _auc([scorer.score(e.prompt, e.answer, e.model, agreement=e.agreement) for e in test],
                [e.correct for e in test])


def train_router(dataset: Path, out: Path) -> dict[str, Any]:
    """Train and save ``out/classifier.npz`` (and ``out/scorer.npz`` from recorded answers).
    ``out`` is created only once the data is read and the classifier trained."""
    summary: dict[str, Any] = {"dataset": str(dataset)}
    samples: list[ReplaySample] = []
    if dataset.suffix == ".jsonl":
        texts, tasks = _labelled(dataset)
    else:
        samples = ReplayProvider(data_path=dataset).samples()
        texts, tasks = [s.prompt for s in samples], [s.eval for s in samples]
    summary.update(samples=len(texts), tasks=sorted(set(tasks)),
                   classifier_cv_accuracy=_cv_accuracy(texts, tasks))
    classifier = TaskClassifier.train(texts, tasks)
    scorer = None
    if samples:
        summary["scorer_auc"] = _scorer_auc(samples)
        scorer = CorrectnessScorer.train(scorer_examples(samples))
    out.mkdir(parents=True, exist_ok=True)
    classifier.save(out / "classifier.npz")
    if scorer is not None:
        scorer.save(out / "scorer.npz")
    return summary
