"""Offline search for the routing + cheap-first-cascade policy, on RouterBench recordings.

Usage: ``python scripts/explore_routing.py [--csv ROUTERBENCH_DIR] [--seed N] [--repeats R]
[--quick] [--json OUT.json] [--code-jaccard-gates]`` (about 1 minute, one process).

Reads the 2,217 recorded samples (the packaged extract by default, or the three RouterBench
CSVs with ``--csv``), each answered by 11 models with a 0/1 label and the USD paid, and
simulates request-time policies: a task is recognised from the prompt, then a cascade calls
cheap tiers in order, checks each answer with a gate, and escalates (finally to
gpt-4-1106-preview) when the gate refuses. A cascade pays for every tier it calls. Quality is
the mean label of the answer finally returned; both quality and spend are reported as % of
"always gpt-4-1106-preview" on the same samples.

Families searched, per task:

* ``vote``: up to 3 cheap tiers (ordered, any of the 10 non-GPT-4 models), a gate per tier, then
  a fallback (GPT-4, or none: return the best cheap answer). Multiple choice gates: "the
  plurality answer of the tiers called so far has >= v votes" (v = 1 is the structural check
  alone, v = 2 at tier 2 is "equals tier 1's answer"), or "never accept" (the tier is called in
  parallel with the next). Code gate: structural (Python that parses and defines a function);
  ``--code-jaccard-gates`` adds "token-Jaccard >= tau with an earlier tier" (overfits).
* ``scorer``: a shortlist of tier sequences (the vote frontier's) gated by a learned
  correctness scorer P(correct | answer, answers of earlier tiers) (FrugalGPT's method): numpy
  logistic regression over agreement/format features; the answer returned is the candidate
  with the highest score; one threshold per tier.
* ``core``: vote or scorer gates, but only over 3 fixed tier sequences per task (``CORE``).

Everything learned or selected is estimated by nested 5-fold cross-validation (stratified by
task): thresholds, the tier sequence shortlist and the operating point are chosen on 4 folds
(scorer inputs there are inner out-of-fold predictions) and scored on the 5th. "train" numbers
select and score on all samples. Also measured: a prompt-only learned router, and the task
classifier (rules, and hashed n-gram logistic regression).

numpy + standard library only (plus skinflint's packaged extract when ``--csv`` is not given).
"""

from __future__ import annotations

import argparse
import ast
import itertools
import re
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from skinflint.providers.replay import ReplayProvider
from skinflint.providers.replay import ReplaySample as Sample

GPT4 = "gpt-4-1106-preview"
TASKS = ("arc-challenge", "winogrande", "mbpp")
CHOICE_TASKS = ("arc-challenge", "winogrande")
K_FOLDS = 5
MAX_TIERS = 3
THETAS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)
JACCARD_TAUS: tuple[float, ...] = (0.3, 0.5, 0.7)
TARGETS = (0.98, 0.95)
SPEND_GOALS = {0.98: 0.45, 0.95: 0.20}
SCORER_LETTERS = True  # multiple-choice scorer: include the candidate's letter (position bias)

Array = np.ndarray[Any, Any]


# --------------------------------------------------------------------------- data


def load_samples(source: Path | None) -> list[Sample]:
    """The RouterBench CSVs in ``source``, else the packaged extract (the replay provider
    reads both, dropping the same malformed rows)."""
    return ReplayProvider(data_path=source).samples()


# --------------------------------------------------------------- answer normalisation

# Multiple choice: the allowed letters come from the prompt's LAST instruction
# 'Print only a single choice from "A" or "B" ...'; the answer is the leading capital letter of
# the reply (leading whitespace skipped) when it is not followed by another letter ("A", "A)",
# "A.", "A\n", "A questioning ..." -> A; "Based on ...", "I do not ..." -> none), and it is
# valid only if it is one of the allowed letters. This is exactly RouterBench's grading rule.
_LEAD = re.compile(r"\s*([A-Z])(?![A-Za-z])")
_OPTIONS = re.compile(r'Print only a single choice\s+from\s+((?:"[A-Z]"(?:\s+or\s+)?)+)')


def allowed_choices(prompt: str) -> list[str]:
    found = _OPTIONS.findall(prompt)
    return re.findall(r'"([A-Z])"', found[-1]) if found else []


def choice_answer(reply: str, allowed: Sequence[str]) -> str | None:
    match = _LEAD.match(reply)
    return match.group(1) if match and match.group(1) in allowed else None


# Code: blocks are ```python / ```py / ```python3 / unlabelled ``` fences (an unclosed fence runs
# to the end), then code-llama's [PYTHON]...[/PYTHON]; with none, the text from the first line
# starting with def/import/from/class. A block whose whole text does not parse is cut to its
# longest prefix of lines that does. The answer is valid when a block parses (ast.parse) and
# defines a top-level function; its signature is (name of the first def, number of arguments),
# and its token set (identifiers, numbers, single punctuation marks) feeds Jaccard agreement.
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+#.-]*)[^\n]*\n(.*?)(?:```|$)", re.S)
_PYTAG = re.compile(r"\[PYTHON\](.*?)(?:\[/PYTHON\]|$)", re.S)
_CODE_START = re.compile(r"^(?:def |import |from |class )", re.M)
_CODE_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|\S")
_PY_LANGS = ("python", "py", "python3", "")


def _parse_longest_prefix(code: str) -> ast.Module | None:
    try:
        return ast.parse(code)
    except SyntaxError:
        pass
    lines = code.split("\n")
    for k in range(len(lines) - 1, 0, -1):
        try:
            return ast.parse("\n".join(lines[:k]))
        except SyntaxError:
            continue
    return None


@dataclass(frozen=True, slots=True)
class CodeAnswer:
    signature: tuple[str, int]
    tokens: frozenset[str]
    code_chars: int


def code_answer(reply: str) -> CodeAnswer | None:
    text = reply.replace("\r\n", "\n")
    blocks = [body for lang, body in _FENCE.findall(text) if lang.lower() in _PY_LANGS]
    blocks += _PYTAG.findall(text)
    if not blocks:
        start = _CODE_START.search(text)
        if start:
            blocks = [text[start.start() :]]
    for block in blocks:
        tree = _parse_longest_prefix(block)
        if tree is None:
            continue
        defs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        if defs:
            return CodeAnswer(
                (defs[0].name, len(defs[0].args.args)),
                frozenset(_CODE_TOKEN.findall(block)),
                len(block),
            )
    return None


def jaccard(a: CodeAnswer | None, b: CodeAnswer | None) -> float:
    if a is None or b is None:
        return 0.0
    return len(a.tokens & b.tokens) / max(1, len(a.tokens | b.tokens))


# ------------------------------------------------------------------------ task recognition


def rule_task(prompt: str) -> str:
    """Deterministic recognition: the last 'Print only a single choice from ...' instruction
    names the letters: A/B -> winogrande (2-way), 3+ letters -> arc-challenge (4-way); no such
    instruction -> the open-ended/code route (mbpp)."""
    letters = allowed_choices(prompt)
    if letters == ["A", "B"]:
        return "winogrande"
    if len(letters) >= 3:
        return "arc-challenge"
    return "mbpp"


# ------------------------------------------------------------------ numpy logistic models

_WORD = re.compile(r"[a-z0-9_]+")


def hashed_ngrams(texts: Sequence[str], dim: int, chars: bool = False) -> Array:
    """log1p counts of crc32-hashed word unigrams+bigrams (and char 4-grams), L2-normalised."""
    x = np.zeros((len(texts), dim))
    for i, text in enumerate(texts):
        words = _WORD.findall(text.lower())
        grams = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
        if chars:
            joined = " ".join(words)
            grams += ["#" + joined[k : k + 4] for k in range(len(joined) - 3)]
        for g in grams:
            x[i, zlib.crc32(g.encode()) % dim] += 1.0
    x = np.log1p(x)
    return np.asarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))


def logreg_fit(x: Array, y: Array, l2: float = 1.0, iters: int = 30) -> Array:
    """Binary logistic regression, L2 on the weights (not the bias), Newton iterations."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(xb.shape[1])
    reg = np.eye(xb.shape[1]) * l2
    reg[-1, -1] = 1e-6
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(xb @ w, -30, 30)))
        grad = xb.T @ (p - y) + reg @ w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + reg
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-7:
            break
    return w


def logreg_predict(w: Array, x: Array) -> Array:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(x @ w[:-1] + w[-1], -30, 30))))


def multi_logreg(
    x: Array, y: Array, x_new: Array, l2: float = 1e-2, iters: int = 400, lr: float = 4.0
) -> Array:
    """Independent binary logistic regressions, one per column of y, by gradient descent with
    Nesterov momentum (rows of x are L2-normalised, so a fixed step is stable)."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros((xb.shape[1], y.shape[1]))
    v = w.copy()
    for _ in range(iters):
        look = w + 0.9 * v
        p = 1.0 / (1.0 + np.exp(-np.clip(xb @ look, -30, 30)))
        grad = xb.T @ (p - y) / len(x) + l2 * np.vstack([look[:-1], np.zeros((1, y.shape[1]))])
        v = 0.9 * v - lr * grad
        w = w + v
    xn = np.hstack([x_new, np.ones((len(x_new), 1))])
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(xn @ w, -30, 30))))


def softmax_fit(
    x: Array, y: Array, classes: int, l2: float = 1e-3, iters: int = 300, lr: float = 2.0
) -> Array:
    """Multinomial logistic regression by full-batch gradient descent."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros((xb.shape[1], classes))
    onehot = np.eye(classes)[y]
    for _ in range(iters):
        z = xb @ w
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        w -= lr * (xb.T @ (p - onehot) / len(x) + l2 * w)
    return w


def auc(score: Array, y: Array) -> float:
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    _, inv, counts = np.unique(score, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inv, ranks) / counts)[inv]
    pos = y.sum()
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


# ------------------------------------------------------------------------- task tables


@dataclass
class Task:
    name: str
    samples: list[Sample]
    models: list[str]
    answer: Array  # (n, m) int answer id, -1 invalid
    correct: Array  # (n, m) 0/1, missing label = 0
    cost: Array  # (n, m) USD
    fold: Array  # (n,) outer fold
    reply_chars: Array  # (n, m)
    code: list[list[CodeAnswer | None]] = field(default_factory=list)
    prefix_cache: dict[tuple[int, ...], tuple[Array, Array]] = field(default_factory=dict)

    @property
    def is_choice(self) -> bool:
        return self.name in CHOICE_TASKS

    @property
    def g4(self) -> int:
        return self.models.index(GPT4)


def build_task(name: str, samples: list[Sample], models: list[str], seed: int) -> Task:
    n, m = len(samples), len(models)
    answer = np.full((n, m), -1)
    correct = np.zeros((n, m))
    cost = np.zeros((n, m))
    chars = np.zeros((n, m))
    code: list[list[CodeAnswer | None]] = []
    signatures: dict[tuple[str, int], int] = {}
    for i, s in enumerate(samples):
        allowed = allowed_choices(s.prompt)
        row: list[CodeAnswer | None] = []
        for j, model in enumerate(models):
            correct[i, j] = s.correct.get(model) or 0
            cost[i, j] = s.cost.get(model, 0.0)
            reply = s.responses.get(model, "")
            chars[i, j] = len(reply)
            if name in CHOICE_TASKS:
                letter = choice_answer(reply, allowed)
                answer[i, j] = -1 if letter is None else ord(letter) - 65
            else:
                parsed = code_answer(reply)
                row.append(parsed)
                if parsed is not None:
                    answer[i, j] = signatures.setdefault(parsed.signature, len(signatures))
        code.append(row)
    fold = np.arange(n) % K_FOLDS
    np.random.default_rng(seed + zlib.crc32(name.encode())).shuffle(fold)
    return Task(
        name,
        samples,
        models,
        answer,
        correct,
        cost,
        fold,
        chars,
        code if name not in CHOICE_TASKS else [],
    )


# ------------------------------------------------------------------- cascade simulation


@dataclass
class Stage:
    """One tier as the simulator sees it: what it costs, the correctness of the answer the
    cascade returns if it stops here, and one acceptance column per gate option."""

    cost: Array  # (n,)
    corr: Array  # (n,)
    accept: Array  # (n, g) bool
    labels: list[str]


def simulate(
    stages: Sequence[Stage], fb_cost: Array | None, fb_corr: Array | None
) -> tuple[Array, Array]:
    """Every combination of gate options at once (combos ordered like itertools.product of
    the stages' labels). Returns per-sample cost and correctness, shape (n, combos)."""
    n = len(stages[0].cost)
    pending = np.ones((n, 1), bool)
    cost = np.zeros((n, 1))
    corr = np.zeros((n, 1))
    for st in stages:
        g = st.accept.shape[1]
        cost = (cost + pending * st.cost[:, None])[:, :, None].repeat(g, 2).reshape(n, -1)
        newly = pending[:, :, None] & st.accept[:, None, :]
        corr = (corr[:, :, None] + newly * st.corr[:, None, None]).reshape(n, -1)
        pending = (pending[:, :, None] & ~st.accept[:, None, :]).reshape(n, -1)
    if fb_cost is not None and fb_corr is not None:
        cost = cost + pending * fb_cost[:, None]
        corr = corr + pending * fb_corr[:, None]
    return cost, corr


def plurality(task: Task, prefix: tuple[int, ...]) -> tuple[Array, Array]:
    """Votes for, and correctness of, the plurality valid answer among the prefix tiers
    (ties: the earliest tier's answer)."""
    if prefix in task.prefix_cache:
        return task.prefix_cache[prefix]
    sub = task.answer[:, list(prefix)]
    n = len(sub)
    best_votes = np.zeros(n, int)
    best_corr = task.correct[:, prefix[-1]].copy()
    for j, model in enumerate(prefix):
        a = sub[:, j]
        votes = ((sub == a[:, None]) & (a[:, None] >= 0)).sum(1)
        better = votes > best_votes
        best_votes = np.where(better, votes, best_votes)
        best_corr = np.where(better, task.correct[:, model], best_corr)
    task.prefix_cache[prefix] = (best_votes, best_corr)
    return best_votes, best_corr


_JACC_CACHE: dict[tuple[str, int, int], Array] = {}


def pair_jaccard(task: Task, a: int, b: int) -> Array:
    key = (task.name, min(a, b), max(a, b))
    if key not in _JACC_CACHE:
        _JACC_CACHE[key] = np.array([jaccard(row[a], row[b]) for row in task.code])
    return _JACC_CACHE[key]


def vote_stages(task: Task, tiers: tuple[int, ...], with_fallback: bool) -> list[Stage]:
    """Gate options of the ``vote`` family for each tier."""
    stages: list[Stage] = []
    last = len(tiers) - 1
    for k, model in enumerate(tiers):
        forced = k == last and not with_fallback
        if task.is_choice:
            votes, corr = plurality(task, tiers[: k + 1])
            options = [(f"votes>={v}", votes >= v) for v in range(1, k + 2)]
            if forced:  # no fallback: return the plurality answer (or the last reply)
                options = [("return plurality", np.ones(len(votes), bool))]
        else:
            valid = task.answer[:, model] >= 0
            corr = task.correct[:, model]
            options = [("valid python", valid)]
            for tau in JACCARD_TAUS if k else ():
                jac = np.max([pair_jaccard(task, model, t) for t in tiers[:k]], axis=0)
                options.append((f"valid & jaccard>={tau} w/ earlier", valid & (jac >= tau)))
            if forced:
                options = [("return", np.ones(len(valid), bool))]
        if not forced:
            options.append(("never (parallel)", np.zeros(len(task.answer), bool)))
        stages.append(
            Stage(
                task.cost[:, model],
                corr,
                np.column_stack([o[1] for o in options]),
                [o[0] for o in options],
            )
        )
    return stages


# ----------------------------------------------------------------------- learned scorer


def choice_features(sub: Array, letters: int) -> tuple[Array, Array]:
    """Multiple-choice candidate features from the answers so far, ``sub`` (n, tiers) with
    letter indices (-1 = invalid): per candidate (= the answer of tier p), agrees:<tier q>
    (tier q gave the same valid letter; includes q = p), letter one-hot without A, and the
    number of distinct valid answers / 3. The mask keeps the first tier of each valid answer."""
    n, cols = sub.shape
    valid = sub >= 0
    distinct = np.array([len(set(r[r >= 0].tolist())) for r in sub])[:, None] / 3.0
    feats = []
    for p in range(cols):
        agree = (sub == sub[:, [p]]) & valid & valid[:, [p]]
        letter = np.eye(letters)[np.clip(sub[:, p], 0, letters - 1)][:, 1:]
        parts = [agree, letter, distinct] if SCORER_LETTERS else [agree, distinct]
        feats.append(np.hstack(parts))
    first = np.ones((n, cols), bool)
    for p in range(cols):
        for q in range(p):
            first[:, p] &= ~((sub[:, q] == sub[:, p]) & valid[:, q])
    return np.stack(feats, 1), valid & first


def n_letters(task: Task) -> int:
    return 4 if task.name == "arc-challenge" else 2


def candidate_features(task: Task, tiers: tuple[int, ...], k: int) -> tuple[Array, Array, Array]:
    """Features of each candidate answer after tier k (one candidate per tier called so far),
    the candidate's correctness, and a mask of candidates that count. Shapes (n, k+1, f),
    (n, k+1), (n, k+1). Code candidates: from:<tier> one-hot, log1p(reply chars)/8,
    log1p(code chars)/8, max and mean token-Jaccard with the other tiers' code (0 when one
    side is invalid), number of valid tiers / 3."""
    n = len(task.samples)
    prefix = tiers[: k + 1]
    sub = task.answer[:, list(prefix)]
    if task.is_choice:
        x, mask = choice_features(sub, n_letters(task))
        return x, task.correct[:, list(prefix)], mask
    valid = sub >= 0
    cols = len(prefix)
    feats = []
    for p, model in enumerate(prefix):
        others = [pair_jaccard(task, model, t) for t in prefix if t != model]
        jac = np.column_stack(others) if others else np.zeros((n, 1))
        own = np.zeros((n, cols))
        own[:, p] = 1.0
        code_chars = np.array([getattr(c[model], "code_chars", 0) for c in task.code])
        feats.append(
            np.hstack(
                [
                    own,
                    np.log1p(task.reply_chars[:, [model]]) / 8.0,
                    np.log1p(code_chars)[:, None] / 8.0,
                    jac.max(1, keepdims=True),
                    jac.mean(1, keepdims=True),
                    valid.sum(1, keepdims=True) / 3.0,
                ]
            )
        )
    return np.stack(feats, 1), task.correct[:, list(prefix)], valid


def decision_table(
    task: Task, group: Group, combo: tuple[str, ...]
) -> tuple[list[str], list[list[str]]]:
    """A multiple-choice scorer policy as explicit rules: per tier, the answer tuples of the
    tiers called so far (letters, '-' = invalid) on which the cascade stops, and the letter
    it returns."""
    letters = n_letters(task)
    lines: list[str] = []
    tables: list[list[str]] = []
    for k, gate in enumerate(combo):
        tuples = np.array(list(itertools.product(range(-1, letters), repeat=k + 1)))
        x, mask = choice_features(tuples, letters)
        if group.family == "scorer":
            xa, ya, ma = candidate_features(task, group.tiers, k)
            w = fit_scorer(xa, ya, ma, np.ones(len(task.samples), bool))
            score = score_candidates(w, x, mask)
        else:  # vote: plurality count, earliest tier on ties
            score = np.where(mask, x[:, :, : k + 1].sum(2) - 0.01 * np.arange(k + 1), -1.0)
        best = score.argmax(1)
        top = score[np.arange(len(tuples)), best]
        if gate.startswith("score>="):
            stop = top >= float(gate.split(">=")[1])
        elif gate.startswith("votes>="):
            stop = (top + 0.01 * best) >= int(gate.split(">=")[1]) - 1e-6
        elif gate.startswith("return"):
            stop = np.ones(len(tuples), bool)
        else:
            stop = np.zeros(len(tuples), bool)
        stop &= mask.any(1) | gate.startswith("return")
        names = ",".join(short_name(task.models[t]) for t in group.tiers[: k + 1])
        rules = [
            (
                "".join("-" if a < 0 else chr(65 + a) for a in row)
                + "->"
                + ("-" if not mask[i].any() else chr(65 + row[best[i]]))
            )
            for i, row in enumerate(tuples)
            if stop[i]
        ]
        lines.append(
            f"tier {k + 1} ({gate}) stops on [{names}]: " + (" ".join(rules) if rules else "never")
        )
        tables.append(rules)
    return lines, tables


def scorer_names(task: Task, tiers: tuple[int, ...], k: int) -> list[str]:
    short = [short_name(task.models[t]) for t in tiers[: k + 1]]
    if task.is_choice:
        letters = ("BCD" if task.name == "arc-challenge" else "B") if SCORER_LETTERS else ""
        return [f"agrees:{s}" for s in short] + [f"letter={c}" for c in letters] + ["distinct/3"]
    return [f"from:{s}" for s in short] + [
        "log1p(reply chars)/8",
        "log1p(code chars)/8",
        "max jaccard other tiers",
        "mean jaccard other tiers",
        "valid tiers/3",
    ]


def fit_scorer(x: Array, y: Array, mask: Array, rows: Array) -> Array:
    sel = mask & rows[:, None]
    return logreg_fit(x[sel], y[sel], l2=1.0)


def score_candidates(w: Array, x: Array, mask: Array) -> Array:
    n, c, f = x.shape
    p = logreg_predict(w, x.reshape(n * c, f)).reshape(n, c)
    return np.where(mask, p, -1.0)


def scorer_scores(task: Task, tiers: tuple[int, ...], k: int) -> dict[str, Array]:
    """Candidate scores under each regime: 'train' (fit on all samples) and, for each outer
    fold f, 'f<f>': inner out-of-fold scores on the other folds, outer-fit scores on fold f."""
    x, y, mask = candidate_features(task, tiers, k)
    fold = task.fold
    out = {"train": score_candidates(fit_scorer(x, y, mask, np.ones(len(fold), bool)), x, mask)}
    for f in range(K_FOLDS):
        s = np.zeros(mask.shape)
        rows = fold != f
        s[~rows] = score_candidates(fit_scorer(x, y, mask, rows), x, mask)[~rows]
        for g in range(K_FOLDS):
            if g == f:
                continue
            inner = rows & (fold != g)
            s[fold == g] = score_candidates(fit_scorer(x, y, mask, inner), x, mask)[fold == g]
        out[f"f{f}"] = s
    return out


def scorer_stages(
    task: Task, tiers: tuple[int, ...], with_fallback: bool, scores: list[Array]
) -> list[Stage]:
    stages = []
    last = len(tiers) - 1
    for k, model in enumerate(tiers):
        s = scores[k]
        best = s.argmax(1)
        top = s[np.arange(len(s)), best]
        corr = task.correct[np.arange(len(s)), np.array(tiers)[best]]
        if k == last and not with_fallback:
            options = [("return best-scored", np.ones(len(s), bool))]
        else:
            options = [(f"score>={t}", top >= t) for t in THETAS]
            options.append(("never (parallel)", np.zeros(len(s), bool)))
        stages.append(
            Stage(
                task.cost[:, model],
                corr,
                np.column_stack([o[1] for o in options]),
                [o[0] for o in options],
            )
        )
    return stages


# --------------------------------------------------------------------------- candidates

REGIMES = ("train", *(f"f{f}" for f in range(K_FOLDS)))


@dataclass
class Group:
    """Policies sharing a tier sequence: one per combination of gate options. ``sums`` maps a
    regime to fold sums (combos, folds) of cost and correct; vote groups use one entry for all
    regimes. ``allowed`` lists the regimes whose selection may use this group."""

    family: str
    tiers: tuple[int, ...]
    fallback: bool
    labels: list[list[str]]
    sums: dict[str, tuple[Array, Array]]
    allowed: frozenset[str]
    stages: dict[str, list[Stage]] | None = None

    def get(self, regime: str) -> tuple[Array, Array]:
        return self.sums.get(regime, self.sums["train"])

    def combo(self, i: int) -> tuple[str, ...]:
        return next(itertools.islice(itertools.product(*self.labels), i, None))

    def per_sample(self, task: Task, regime: str, i: int) -> tuple[Array, Array]:
        stages = (
            self.stages[regime] if self.stages else vote_stages(task, self.tiers, self.fallback)
        )
        cost, corr = simulate(stages, *fallback_arrays(task, self.fallback))
        return cost[:, i], corr[:, i]


def fallback_arrays(task: Task, fallback: bool) -> tuple[Array | None, Array | None]:
    if not fallback:
        return None, None
    return task.cost[:, task.g4], task.correct[:, task.g4]


def fold_sums(task: Task, cost: Array, corr: Array) -> tuple[Array, Array]:
    onehot = (task.fold[None, :] == np.arange(K_FOLDS)[:, None]).astype(float)
    return (onehot @ cost).T, (onehot @ corr).T


def vote_groups(task: Task, max_tiers: int) -> list[Group]:
    cheap = [j for j in range(len(task.models)) if j != task.g4]
    groups = []
    for length in range(1, max_tiers + 1):
        for tiers in itertools.permutations(cheap, length):
            for fallback in (True, False):
                stages = vote_stages(task, tiers, fallback)
                cost, corr = simulate(stages, *fallback_arrays(task, fallback))
                groups.append(
                    Group(
                        "vote",
                        tiers,
                        fallback,
                        [st.labels for st in stages],
                        {"train": fold_sums(task, cost, corr)},
                        frozenset(REGIMES),
                    )
                )
    return groups


def train_rows(regime: str) -> Array:
    """Which folds a regime selects on (all for 'train', the other four for 'f<k>')."""
    rows = np.ones(K_FOLDS, bool)
    if regime != "train":
        rows[int(regime[1:])] = False
    return rows


def shortlist(task: Task, groups: list[Group], regime: str, size: int) -> list[tuple[int, ...]]:
    """Tier sequences of the vote frontier (selection-side sums only), cheapest first,
    restricted to points of >= 85% of GPT-4 quality on the task."""
    rows = train_rows(regime)
    cost = np.concatenate([g.get(regime)[0][:, rows].sum(1) for g in groups])
    corr = np.concatenate([g.get(regime)[1][:, rows].sum(1) for g in groups])
    owner = np.concatenate([[k] * len(g.get(regime)[0]) for k, g in enumerate(groups)])
    base = task.correct[:, task.g4][np.isin(task.fold, np.flatnonzero(rows))].sum()
    out: list[tuple[int, ...]] = []
    for i in pareto(cost, corr):
        tiers = groups[owner[i]].tiers
        if corr[i] >= 0.85 * base and tiers not in out and len(tiers) > 1:
            out.append(tiers)
    return out[:size]


def scorer_groups(
    task: Task, lists: dict[str, list[tuple[int, ...]]], core: Sequence[tuple[int, ...]] = ()
) -> list[Group]:
    """Scorer-gated policies for every shortlisted tier sequence (usable by the regimes that
    shortlisted it) and for the fixed ``core`` sequences."""
    wanted: list[tuple[int, ...]] = list(core)
    for seqs in lists.values():
        wanted += [s for s in seqs if s not in wanted]
    cache: dict[tuple[int, ...], dict[str, Array]] = {}
    groups = []
    for tiers in wanted:
        scores = []
        for k in range(len(tiers)):
            key = tiers[: k + 1]
            if key not in cache:
                cache[key] = scorer_scores(task, tiers, k)
            scores.append(cache[key])
        allowed = frozenset(r for r, seqs in lists.items() if tiers in seqs)
        for fallback in (True, False):
            sums, stages_by = {}, {}
            for regime in REGIMES:
                stages = scorer_stages(task, tiers, fallback, [s[regime] for s in scores])
                cost, corr = simulate(stages, *fallback_arrays(task, fallback))
                sums[regime] = fold_sums(task, cost, corr)
                stages_by[regime] = stages
            groups.append(
                Group(
                    "scorer",
                    tiers,
                    fallback,
                    [st.labels for st in stages],
                    sums,
                    allowed,
                    stages_by,
                )
            )
    return groups


def describe(task: Task, group: Group, combo: tuple[str, ...]) -> str:
    parts = [f"{short_name(task.models[t])} [{g}]" for t, g in zip(group.tiers, combo, strict=True)]
    tail = " -> gpt-4-1106 [always]" if group.fallback else ""
    return f"{group.family}: " + " -> ".join(parts) + tail


def short_name(model: str) -> str:
    return model.split("/")[-1].replace("-chat", "").replace("-instruct", "")


# ---------------------------------------------------------------------------- selection


def pareto(cost: Array, corr: Array) -> Array:
    """Indices of the Pareto frontier (lower cost, more correct), sorted by cost."""
    order = np.lexsort((-corr, cost))
    q = corr[order]
    prev = np.concatenate([[-np.inf], np.maximum.accumulate(q)[:-1]])
    return np.asarray(order[q > prev + 1e-9])


def combine(fronts: list[tuple[Array, Array]]) -> tuple[Array, Array, Array]:
    """Pareto frontier of the sum over tasks of one point each: cost, correct, and the index
    chosen in each task's front."""
    cost, corr = fronts[0]
    idx = np.arange(len(cost))[:, None]
    for c2, q2 in fronts[1:]:
        cc = (cost[:, None] + c2[None, :]).ravel()
        qq = (corr[:, None] + q2[None, :]).ravel()
        ii = np.hstack([np.repeat(idx, len(c2), 0), np.tile(np.arange(len(c2)), len(idx))[:, None]])
        keep = pareto(cc, qq)
        cost, corr, idx = cc[keep], qq[keep], ii[keep]
    return cost, corr, idx


@dataclass
class Choice:
    """A selected policy per task, with selection-side and evaluation-side sums."""

    picks: dict[str, tuple[Group, int]]
    train: dict[str, tuple[float, float]]  # task -> (cost, correct) on the selection folds
    test: dict[str, tuple[float, float]]  # task -> (cost, correct) on the evaluation folds
    base_train: dict[str, tuple[float, float]]
    base_test: dict[str, tuple[float, float]]


class Selector:
    """Per regime: each task's frontier on the selection folds, and their pooled frontier."""

    def __init__(
        self, tasks: dict[str, Task], groups: dict[str, list[Group]], regime: str, family: str
    ) -> None:
        self.tasks, self.regime = tasks, regime
        rows = train_rows(regime)
        self.test_rows = rows if regime == "train" else ~rows
        self.fronts: dict[str, tuple[Array, Array, Array, Array, list[tuple[Group, int]]]] = {}
        for t, task in tasks.items():
            use = [g for g in groups[t] if in_family(family, task, g, regime)]
            cost = np.vstack([g.get(regime)[0] for g in use])
            corr = np.vstack([g.get(regime)[1] for g in use])
            refs = [(g, i) for g in use for i in range(len(g.get(regime)[0]))]
            ctr, qtr = cost[:, rows].sum(1), corr[:, rows].sum(1)
            keep = pareto(ctr, qtr)
            self.fronts[t] = (
                ctr[keep],
                qtr[keep],
                cost[keep][:, self.test_rows].sum(1),
                corr[keep][:, self.test_rows].sum(1),
                [refs[i] for i in keep],
            )
        self.base_train = {t: self._base(task, rows) for t, task in tasks.items()}
        self.base_test = {t: self._base(task, self.test_rows) for t, task in tasks.items()}
        self.pooled = combine([(f[0], f[1]) for f in self.fronts.values()])

    @staticmethod
    def _base(task: Task, rows: Array) -> tuple[float, float]:
        sel = np.isin(task.fold, np.flatnonzero(rows))
        return float(task.cost[sel, task.g4].sum()), float(task.correct[sel, task.g4].sum())

    def _choice(self, idx: dict[str, int]) -> Choice:
        fr = self.fronts
        return Choice(
            {t: fr[t][4][i] for t, i in idx.items()},
            {t: (float(fr[t][0][i]), float(fr[t][1][i])) for t, i in idx.items()},
            {t: (float(fr[t][2][i]), float(fr[t][3][i])) for t, i in idx.items()},
            {t: self.base_train[t] for t in idx},
            {t: self.base_test[t] for t in idx},
        )

    def pick_pooled(self, quality: float) -> Choice | None:
        need = quality * sum(b[1] for b in self.base_train.values())
        cost, corr, idx = self.pooled
        ok = np.flatnonzero(corr >= need - 1e-9)
        if not len(ok):
            return None
        best = ok[np.argmin(cost[ok])]
        return self._choice(dict(zip(self.fronts, idx[best].tolist(), strict=True)))

    def pick_each(self, quality: float) -> Choice | None:
        """Every task on its own at >= quality of GPT-4 on that task."""
        idx = {}
        for t, f in self.fronts.items():
            ok = np.flatnonzero(f[1] >= quality * self.base_train[t][1] - 1e-9)
            if not len(ok):
                return None
            idx[t] = int(ok[np.argmin(f[0][ok])])
        return self._choice(idx)


def ratios(choice: Choice, side: str, tasks: Sequence[str] | None = None) -> tuple[float, float]:
    """(spend, quality) as fractions of always-GPT-4, pooled over ``tasks``."""
    sums = choice.train if side == "train" else choice.test
    base = choice.base_train if side == "train" else choice.base_test
    names = list(tasks or sums)
    return (
        sum(sums[t][0] for t in names) / sum(base[t][0] for t in names),
        sum(sums[t][1] for t in names) / sum(base[t][1] for t in names),
    )


def cross_validate(
    selectors: list[Selector], quality: float, margin: float, mode: str = "pooled"
) -> tuple[float, float, float, list[Choice]]:
    """Nested CV: select on 4 folds at quality + margin, score on the 5th; returns pooled
    spend and quality ratios over all held-out folds, the worst fold's quality, the choices."""
    cost = corr = base_c = base_q = 0.0
    worst = np.inf
    choices = []
    for sel in selectors:
        ch = (
            sel.pick_pooled(quality + margin)
            if mode == "pooled"
            else sel.pick_each(quality + margin)
        )
        if ch is None:
            return np.nan, np.nan, np.nan, []
        choices.append(ch)
        cost += sum(v[0] for v in ch.test.values())
        corr += sum(v[1] for v in ch.test.values())
        base_c += sum(v[0] for v in ch.base_test.values())
        base_q += sum(v[1] for v in ch.base_test.values())
        worst = min(worst, ratios(ch, "test")[1])
    return cost / base_c, corr / base_q, worst, choices


# --------------------------------------------------------------------------------- main


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    body = [
        "  ".join(
            str(c).rjust(w) if j else str(c).ljust(w)
            for j, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    return "\n".join([line, "-" * len(line), *body])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--csv", type=Path, help="RouterBench CSV folder instead of the extract")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="repeats of the nested 5-fold CV with different fold splits",
    )
    ap.add_argument("--quick", action="store_true", help="<= 2 cheap tiers, 1 CV repeat")
    ap.add_argument(
        "--code-jaccard-gates",
        action="store_true",
        help="also search code gates 'Jaccard >= tau with an earlier tier' "
        "(they overfit mbpp's 299 samples: off by default)",
    )
    ap.add_argument("--json", type=Path, help="write the recommended policies here")
    args = ap.parse_args(argv)
    return run(args)


FAMILIES = ("vote", "vote+scorer", "core")
CURVE = (0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0)
MARGINS = (0.0, 0.0025, 0.005, 0.0075, 0.01, 0.015)
EACH = (0.90, 0.93, 0.95, 0.97, 0.98, 0.99, 1.0)
Stats = dict[tuple[Any, ...], tuple[float, float]]


def build_groups(tasks: dict[str, Task], max_tiers: int) -> dict[str, list[Group]]:
    groups = {t: vote_groups(task, max_tiers) for t, task in tasks.items()}
    for t, task in tasks.items():
        lists = {r: shortlist(task, groups[t], r, size=10) for r in REGIMES}
        groups[t] += scorer_groups(task, lists, core_sequences(task))
    return groups


# A fixed, small set of tier sequences per task (the structures the full search keeps picking):
# selecting only among these (gates and thresholds still tuned) overfits far less.
CORE = {
    "arc-challenge": [
        ("mistralai/mixtral-8x7b-chat", "zero-one-ai/Yi-34B-Chat"),
        ("mistralai/mixtral-8x7b-chat", "zero-one-ai/Yi-34B-Chat", "claude-instant-v1"),
        ("zero-one-ai/Yi-34B-Chat",),
    ],
    "winogrande": [
        ("mistralai/mixtral-8x7b-chat", "zero-one-ai/Yi-34B-Chat"),
        ("mistralai/mistral-7b-chat", "mistralai/mixtral-8x7b-chat", "zero-one-ai/Yi-34B-Chat"),
        ("zero-one-ai/Yi-34B-Chat",),
    ],
    "mbpp": [
        ("gpt-3.5-turbo-1106",),
        ("gpt-3.5-turbo-1106", "mistralai/mixtral-8x7b-chat"),
        ("gpt-3.5-turbo-1106", "mistralai/mixtral-8x7b-chat", "mistralai/mistral-7b-chat"),
    ],
}


def core_sequences(task: Task) -> list[tuple[int, ...]]:
    return [
        tuple(task.models.index(m) for m in seq)
        for seq in CORE[task.name]
        if all(m in task.models for m in seq)
    ]


def in_family(family: str, task: Task, group: Group, regime: str) -> bool:
    if family == "vote":
        return group.family == "vote"
    if family == "vote+scorer":
        return regime in group.allowed
    return group.tiers in core_sequences(task)  # "core": vote or scorer gates, fixed tiers


def cv_stats(tasks: dict[str, Task], selectors: dict[str, dict[str, Selector]]) -> Stats:
    """Nested-CV (spend, quality) ratios for every report cell, for one fold split."""
    out: Stats = {}
    for name in FAMILIES:
        folds = folds_of(selectors[name])
        for q in sorted(set(CURVE) | {t + m for t in TARGETS for m in MARGINS}):
            c, k, _, _ = cross_validate(folds, round(q, 4), 0.0)
            out[("pooled", name, round(q, 4))] = (c, k)
    folds = folds_of(selectors["vote+scorer"])
    for q in EACH:
        _, _, _, chs = cross_validate(folds, q, 0.0, mode="each")
        for t in tasks:
            if chs:
                out[("each", t, q)] = (
                    sum(ch.test[t][0] for ch in chs) / sum(ch.base_test[t][0] for ch in chs),
                    sum(ch.test[t][1] for ch in chs) / sum(ch.base_test[t][1] for ch in chs),
                )
            else:
                out[("each", t, q)] = (np.nan, np.nan)
    return out


def mean_stats(runs: list[Stats]) -> Stats:
    return {
        k: (float(np.mean([r[k][0] for r in runs])), float(np.mean([r[k][1] for r in runs])))
        for k in runs[0]
    }


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    global JACCARD_TAUS
    if not args.code_jaccard_gates:
        JACCARD_TAUS = ()
    samples = load_samples(args.csv)
    models = list(samples[0].responses)
    split = {t: [s for s in samples if s.eval == t] for t in TASKS}
    tasks = {t: build_task(t, split[t], models, args.seed) for t in TASKS}
    print(
        f"{len(samples)} samples ({', '.join(f'{t} {len(tasks[t].samples)}' for t in TASKS)})"
        f", {len(models)} models; loaded in {time.time() - t0:.1f}s"
    )
    report_models(tasks)
    report_task_classifier(samples)
    report_router(tasks)

    max_tiers = 2 if args.quick else MAX_TIERS
    repeats = 1 if args.quick else max(1, args.repeats)
    runs: list[Stats] = []
    selectors: dict[str, dict[str, Selector]] = {}
    groups: dict[str, list[Group]] = {}
    for rep in range(repeats):
        rep_tasks = (
            tasks
            if rep == 0
            else {t: build_task(t, split[t], models, args.seed + 1000 * rep) for t in TASKS}
        )
        _JACC_CACHE.clear()
        rep_groups = build_groups(rep_tasks, max_tiers)
        rep_sel = {
            name: {r: Selector(rep_tasks, rep_groups, r, name) for r in REGIMES}
            for name in FAMILIES
        }
        runs.append(cv_stats(rep_tasks, rep_sel))
        if rep == 0:
            selectors, groups = rep_sel, rep_groups
            n = {
                f: sum(
                    int(np.prod([len(x) for x in g.labels]))
                    for gs in groups.values()
                    for g in gs
                    if g.family == f
                )
                for f in ("vote", "scorer")
            }
            print(
                f"\nsearched {n['vote']} vote policies and {n['scorer']} scorer policies "
                f"(per CV regime) over 3 tasks; {time.time() - t0:.0f}s"
            )
        print(f"nested-CV repeat {rep + 1}/{repeats} done ({time.time() - t0:.0f}s)")
    cv = mean_stats(runs)
    spread = {
        k: (float(np.std([r[k][0] for r in runs])), float(np.std([r[k][1] for r in runs])))
        for k in runs[0]
    }
    print(f"CV numbers below: mean over {repeats} repeat(s) of nested 5-fold CV")
    report_static(tasks)
    report_per_task(tasks, selectors["vote+scorer"], cv)
    report_curve(selectors, cv)
    margins = report_margins(cv, spread)
    report_policies(tasks, selectors, cv, margins, args.json)
    report_rules(tasks)
    print(f"\ndone in {time.time() - t0:.0f}s")
    return 0


def folds_of(selectors: dict[str, Selector]) -> list[Selector]:
    return [selectors[r] for r in REGIMES if r != "train"]


def pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}"


def report_static(tasks: dict[str, Task]) -> None:
    """Reference: the best single model per task (no cascade), in-sample."""
    print("\n== Reference: best single model per task (no cascade), pooled, train ==")
    choices = {
        t: [(task.cost[:, j].sum(), task.correct[:, j].sum(), j) for j in range(len(task.models))]
        for t, task in tasks.items()
    }
    base_c = sum(task.cost[:, task.g4].sum() for task in tasks.values())
    base_q = sum(task.correct[:, task.g4].sum() for task in tasks.values())
    for tgt in TARGETS:
        best: tuple[float, str] = (np.inf, "")
        for combo in itertools.product(*choices.values()):
            c = sum(x[0] for x in combo) / base_c
            q = sum(x[1] for x in combo) / base_q
            if q >= tgt and c < best[0]:
                best = (
                    c,
                    ", ".join(
                        f"{t}={short_name(tasks[t].models[x[2]])}"
                        for t, x in zip(tasks, combo, strict=True)
                    ),
                )
        print(f"  >= {100 * tgt:.0f}% quality: spend {pct(best[0])}%  ({best[1]})")


def report_per_task(tasks: dict[str, Task], selectors: dict[str, Selector], cv: Stats) -> None:
    print("\n== Per-task frontier (vote + scorer families; each task on its own) ==")
    print(
        "cheapest policy with task quality >= q x GPT-4's on that task; train = selected and "
        "scored on all samples; CV = nested"
    )
    rows = []
    for q in EACH:
        tr = selectors["train"].pick_each(q)
        row = [f"{100 * q:.0f}%"]
        for t in tasks:
            row.append(pct(ratios(tr, "train", [t])[0]) if tr else "n/a")
            row += [pct(cv[("each", t, q)][0]), pct(cv[("each", t, q)][1])]
        rows.append(row)
    header = ["q"]
    for t in tasks:
        header += [f"{t[:4]} $% train", "$% CV", "Q% CV"]
    print(table(rows, header))
    tr_sel = selectors["train"]
    for q in (0.95, 0.98):
        ch = tr_sel.pick_each(q)
        if ch is None:
            continue
        for t in tasks:
            g, i = ch.picks[t]
            c, k = ratios(ch, "train", [t])
            print(
                f"  {t} @{100 * q:.0f}%: spend {pct(c)}%, quality {pct(k)}%: "
                f"{describe(tasks[t], g, g.combo(i))}"
            )


def report_curve(selectors: dict[str, dict[str, Selector]], cv: Stats) -> None:
    print("\n== Pooled cost-quality curve (all samples pooled, as the evaluation does) ==")
    print("cheapest set of per-task policies with pooled quality >= q; % of always-GPT-4")
    rows = []
    for q in CURVE:
        row = [f"{100 * q:.0f}%"]
        for name in FAMILIES:
            tr = selectors[name]["train"].pick_pooled(q)
            c, k = ratios(tr, "train") if tr else (np.nan, np.nan)
            cc, ck = cv[("pooled", name, round(q, 4))]
            row += [pct(c), pct(k), pct(cc), pct(ck)]
        rows.append(row)
    header = ["q"]
    for name in FAMILIES:
        header += [f"{name}: $% train", "Q% train", "$% CV", "Q% CV"]
    print(table(rows, header))


def report_margins(cv: Stats, spread: Stats) -> dict[float, dict[str, float]]:
    """Select at target + margin; per family, the smallest margin whose CV quality meets the
    target (when none does, the largest tried)."""
    print("\n== Robustness: select at target + margin (nested CV; +- = s.d. over repeats) ==")
    rows = []
    chosen: dict[float, dict[str, float]] = {}
    for tgt in TARGETS:
        chosen[tgt] = {}
        for margin in MARGINS:
            row = [f"{100 * tgt:.0f}%", f"+{100 * margin:.2f}"]
            for name in FAMILIES:
                key = ("pooled", name, round(tgt + margin, 4))
                c, q = cv[key]
                sc, sq = spread[key]
                row += [f"{pct(c)} +-{100 * sc:.1f}", f"{pct(q)} +-{100 * sq:.1f}"]
                if q >= tgt and name not in chosen[tgt]:
                    chosen[tgt][name] = margin
            rows.append(row)
        for name in FAMILIES:
            chosen[tgt].setdefault(name, MARGINS[-1])
    header = ["target", "margin pts"]
    for name in FAMILIES:
        header += [f"{name}: $% CV", "Q% CV"]
    print(table(rows, header))
    for tgt, per in chosen.items():
        print(
            f"  >= {100 * tgt:.0f}%: smallest margin with CV quality >= target: "
            + ", ".join(f"{n} +{100 * m:.2f}" for n, m in per.items())
        )
    return chosen


def bootstrap(
    tasks: dict[str, Task], choice: Choice, draws: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Sampling s.d. of the quality and spend ratios on a fresh set of the same size and mix."""
    cost, corr, g4c, g4q = [], [], [], []
    for t, task in tasks.items():
        g, i = choice.picks[t]
        c, k = g.per_sample(task, "train", i)
        cost.append(c)
        corr.append(k)
        g4c.append(task.cost[:, task.g4])
        g4q.append(task.correct[:, task.g4])
    cost_a, corr_a, g4c_a, g4q_a = (np.concatenate(x) for x in (cost, corr, g4c, g4q))
    rng = np.random.default_rng(seed)
    q_draws, c_draws = [], []
    for _ in range(draws // 200):
        idx = rng.integers(0, len(cost_a), (200, len(cost_a)))
        q_draws.append(corr_a[idx].sum(1) / g4q_a[idx].sum(1))
        c_draws.append(cost_a[idx].sum(1) / g4c_a[idx].sum(1))
    return float(np.concatenate(q_draws).std()), float(np.concatenate(c_draws).std())


def policy_json(task: Task, group: Group, combo: tuple[str, ...]) -> dict[str, Any]:
    tiers = []
    for k, (model, gate) in enumerate(zip(group.tiers, combo, strict=True)):
        tier: dict[str, Any] = {"model": task.models[model], "gate": gate}
        if group.family == "scorer":
            x, y, mask = candidate_features(task, group.tiers, k)
            w = fit_scorer(x, y, mask, np.ones(len(task.samples), bool))
            tier["scorer"] = {
                "bias": round(float(w[-1]), 4),
                "weights": {
                    n: round(float(v), 4)
                    for n, v in zip(scorer_names(task, group.tiers, k), w[:-1], strict=True)
                },
            }
        tiers.append(tier)
    if task.is_choice:
        for tier, rules in zip(tiers, decision_table(task, group, combo)[1], strict=True):
            tier["stops_on"] = rules
    return {"family": group.family, "tiers": tiers, "fallback": GPT4 if group.fallback else None}


def report_policies(
    tasks: dict[str, Task],
    selectors: dict[str, dict[str, Selector]],
    cv: Stats,
    chosen: dict[float, dict[str, float]],
    json_path: Path | None,
) -> None:
    print("\n== Operating points (policy selected on all samples at target + margin) ==")
    export: dict[str, Any] = {}
    for tgt in TARGETS:
        for name in FAMILIES:
            margin = chosen[tgt][name]
            ch = selectors[name]["train"].pick_pooled(round(tgt + margin, 4))
            if ch is None:
                print(f"[{name}] >= {100 * tgt:.0f}%: infeasible")
                continue
            tr_c, tr_q = ratios(ch, "train")
            cv_c, cv_q = cv[("pooled", name, round(tgt + margin, 4))]
            sd_q, sd_c = bootstrap(tasks, ch)
            star = " <- recommended (fixed tiers, simplest to run)" if name == "core" else ""
            print(
                f"\n[{name}] >= {100 * tgt:.0f}% quality (spend goal <= "
                f"{100 * SPEND_GOALS[tgt]:.0f}%), selected at +{100 * margin:.2f} pts{star}"
            )
            print(
                f"  train: spend {pct(tr_c)}%, quality {pct(tr_q)}%  |  nested CV: spend "
                f"{pct(cv_c)}%, quality {pct(cv_q)}%  |  sampling s.d. on a fresh "
                f"{sum(len(t.samples) for t in tasks.values())}-sample set: quality "
                f"{100 * sd_q:.2f} pts, spend {100 * sd_c:.2f} pts"
            )
            entry: dict[str, Any] = {
                "train": {"spend": tr_c, "quality": tr_q},
                "cv": {"spend": cv_c, "quality": cv_q},
                "margin": margin,
                "tasks": {},
            }
            for t, task in tasks.items():
                g, i = ch.picks[t]
                c, k = ratios(ch, "train", [t])
                print(
                    f"  {t:13s} spend {pct(c):>5}%  quality {pct(k):>5}%  "
                    f"{describe(task, g, g.combo(i))}"
                )
                if g.family == "scorer":
                    print_scorer(task, g)
                if task.is_choice:
                    for line in decision_table(task, g, g.combo(i))[0]:
                        print(f"      {line}")
                entry["tasks"][t] = {"spend": c, "quality": k, **policy_json(task, g, g.combo(i))}
            export[f"{name}@{tgt}"] = entry
    if json_path:
        import json

        json_path.write_text(json.dumps(export, indent=1))
        print(f"\npolicies written to {json_path}")


# Hand-written rule versions of the recommended operating points (what the decision tables of
# the core family reduce to): mixtral and Yi are called in parallel on multiple choice, and
# ``stop(mixtral letter, Yi letter)`` says whether Yi's letter is returned (else GPT-4).
RULES: dict[str, dict[str, tuple[str, ...]]] = {
    ">=98%": {
        "arc-challenge": ("agree",),
        "winogrande": ("agree-on-B",),
        "mbpp": ("gpt-3.5-turbo-1106", "mistralai/mixtral-8x7b-chat"),
    },
    ">=95%": {
        "arc-challenge": ("agree", "yi-says-B-or-D"),
        "winogrande": ("agree", "yi-says-B"),
        "mbpp": ("gpt-3.5-turbo-1106", "mistralai/mixtral-8x7b-chat"),
    },
}


def rule_policy(task: Task, rule: tuple[str, ...]) -> tuple[Array, Array]:
    """Per-sample cost and correctness of a hand-written rule (see ``RULES``)."""
    g4 = task.g4
    if not task.is_choice:  # structural cascade: first valid python, else GPT-4
        cost, corr = np.zeros(len(task.samples)), np.zeros(len(task.samples))
        done = np.zeros(len(cost), bool)
        for model in (task.models.index(m) for m in rule):
            cost[~done] += task.cost[~done, model]
            ok = ~done & (task.answer[:, model] >= 0)
            corr[ok] = task.correct[ok, model]
            done |= ok
        cost[~done] += task.cost[~done, g4]
        corr[~done] = task.correct[~done, g4]
        return cost, corr
    mx = task.models.index("mistralai/mixtral-8x7b-chat")
    yi = task.models.index("zero-one-ai/Yi-34B-Chat")
    a, b = task.answer[:, mx], task.answer[:, yi]
    agree = (a == b) & (b >= 0)
    stop = np.zeros(len(a), bool)
    for part in rule:
        stop |= {
            "agree": agree,
            "agree-on-B": agree & (b == 1),
            "yi-says-B": b == 1,
            "yi-says-B-or-D": (b == 1) | (b == 3),
        }[part]
    cost = task.cost[:, mx] + task.cost[:, yi] + ~stop * task.cost[:, g4]
    corr = np.where(stop, task.correct[:, yi], task.correct[:, g4])
    return cost, corr


def report_rules(tasks: dict[str, Task]) -> None:
    print("\n== Hand-written rule versions (no learned weights; train = all samples) ==")
    print("multiple choice: mixtral-8x7b and Yi-34B called in parallel, Yi's letter returned when")
    print("the rule holds, else gpt-4-1106; mbpp: first tier whose reply holds valid python, else")
    print("gpt-4-1106. The rules were read off the core family's decision tables, so expect the")
    print("train->CV loss that the nested CV above shows for that family.")
    for name, rules in RULES.items():
        cost, corr, g4c, g4q, parts = [], [], [], [], []
        for t, task in tasks.items():
            c, k = rule_policy(task, rules[t])
            cost.append(c)
            corr.append(k)
            g4c.append(task.cost[:, task.g4])
            g4q.append(task.correct[:, task.g4])
            parts.append(
                f"{t} {' + '.join(short_name(r) for r in rules[t])}: "
                f"{pct(c.sum() / g4c[-1].sum())}% / {pct(k.sum() / g4q[-1].sum())}%"
            )
        ca, qa, gc, gq = (np.concatenate(x) for x in (cost, corr, g4c, g4q))
        print(f"  {name}: spend {pct(ca.sum() / gc.sum())}%, quality {pct(qa.sum() / gq.sum())}%")
        for line in parts:
            print(f"      {line}")


def print_scorer(task: Task, group: Group) -> None:
    for k in range(len(group.tiers)):
        x, y, mask = candidate_features(task, group.tiers, k)
        w = fit_scorer(x, y, mask, np.ones(len(task.samples), bool))
        names = scorer_names(task, group.tiers, k)
        terms = ", ".join(f"{n} {v:+.2f}" for n, v in zip(names, w[:-1], strict=True))
        print(f"      scorer after tier {k + 1}: logit = {w[-1]:+.2f} + {terms}")


def report_models(tasks: dict[str, Task]) -> None:
    print("\n== Per-model accuracy and spend (spend as % of always-GPT-4 on that task) ==")
    models = next(iter(tasks.values())).models
    header = (
        ["model"]
        + [f"{t} acc" for t in TASKS]
        + [f"{t} $%" for t in TASKS]
        + ["pooled acc", "pooled $%"]
    )
    rows = []
    g4c = {t: tasks[t].cost[:, tasks[t].g4].sum() for t in TASKS}
    for j, m in enumerate(models):
        acc = [tasks[t].correct[:, j].mean() for t in TASKS]
        spend = [tasks[t].cost[:, j].sum() / g4c[t] for t in TASKS]
        n_all = sum(len(tasks[t].samples) for t in TASKS)
        pooled_acc = sum(tasks[t].correct[:, j].sum() for t in TASKS) / n_all
        pooled_spend = sum(tasks[t].cost[:, j].sum() for t in TASKS) / sum(g4c.values())
        rows.append(
            [short_name(m)]
            + [f"{a:.3f}" for a in acc]
            + [f"{100 * s:.1f}" for s in spend]
            + [f"{pooled_acc:.3f}", f"{100 * pooled_spend:.1f}"]
        )
    oracle = [tasks[t].correct.max(1).mean() for t in TASKS]
    rows.append(["(oracle: any correct)"] + [f"{a:.3f}" for a in oracle] + ["", "", "", "", ""])
    print(table(rows, header))
    for t in TASKS:
        task = tasks[t]
        valid = (task.answer >= 0).mean(0)
        print(
            f"  {t}: structurally valid answers per model: "
            + ", ".join(
                f"{short_name(m)} {100 * v:.0f}%" for m, v in zip(models, valid, strict=True)
            )
        )


def report_task_classifier(samples: list[Sample]) -> None:
    print("\n== Task recognition ==")
    truth = [s.eval for s in samples]
    rule = [rule_task(s.prompt) for s in samples]
    print(f"rules: {sum(a == b for a, b in zip(rule, truth, strict=True))}/{len(truth)} correct")
    labels = np.array([TASKS.index(t) for t in truth])
    x = hashed_ngrams([s.prompt[-1500:] for s in samples], 1024, chars=True)
    fold = np.arange(len(samples)) % K_FOLDS
    np.random.default_rng(1).shuffle(fold)
    pred = np.zeros(len(samples), int)
    for f in range(K_FOLDS):
        w = softmax_fit(x[fold != f], labels[fold != f], len(TASKS))
        xb = np.hstack([x[fold == f], np.ones(((fold == f).sum(), 1))])
        pred[fold == f] = (xb @ w).argmax(1)
    conf = Counter(zip(labels.tolist(), pred.tolist(), strict=True))
    print(
        f"hashed word+char n-gram softmax (1024 dims, last 1,500 chars), 5-fold CV: "
        f"{(pred == labels).mean():.4f}; confusions: "
        + (
            ", ".join(f"{TASKS[a]}->{TASKS[b]}: {n}" for (a, b), n in conf.items() if a != b)
            or "none"
        )
    )


def report_router(tasks: dict[str, Task]) -> None:
    """Prompt-only router: P(model correct | prompt) from hashed n-grams of the question."""
    print("\n== Learned prompt-only router (hashed n-grams of the question, 256 dims, L2 LR) ==")
    rows = []
    for t in TASKS:
        task = tasks[t]
        q = [s.prompt if t == "mbpp" else s.prompt.rstrip().split("\n\n")[-1] for s in task.samples]
        x = hashed_ngrams(q, 256)
        cheap = [j for j in range(len(task.models)) if task.models[j] != GPT4]
        y = task.correct[:, cheap]
        oof = np.zeros((len(q), len(task.models)))
        for f in range(K_FOLDS):
            tr = task.fold != f
            oof[np.ix_(~tr, cheap)] = multi_logreg(x[tr], y[tr], x[~tr])
        ins = multi_logreg(x, y, x)
        aucs_cv = [auc(oof[:, j], y[:, k]) for k, j in enumerate(cheap)]
        aucs_tr = [auc(ins[:, k], y[:, k]) for k in range(len(cheap))]
        # routing: best predicted cheap model; escalate to GPT-4 below a threshold
        pick = np.array(cheap)[oof[:, cheap].argmax(1)]
        top = oof[np.arange(len(q)), pick]
        g4 = task.g4
        base_c, base_q = task.cost[:, g4].sum(), task.correct[:, g4].sum()
        best: dict[float, float] = {}
        for th in np.unique(np.quantile(top, np.linspace(0, 1, 41))):
            esc = top < th
            c = (task.cost[np.arange(len(q)), pick] * ~esc + task.cost[:, g4] * esc).sum()
            ok = (task.correct[np.arange(len(q)), pick] * ~esc + task.correct[:, g4] * esc).sum()
            for tgt in TARGETS:
                if ok >= tgt * base_q and c < best.get(tgt, np.inf):
                    best[tgt] = c
        rows.append(
            [
                t,
                f"{np.mean(aucs_tr):.2f}",
                f"{np.mean(aucs_cv):.2f}",
                f"{min(aucs_cv):.2f}-{max(aucs_cv):.2f}",
            ]
            + [f"{100 * best.get(tgt, np.nan) / base_c:.0f}%" for tgt in TARGETS]
        )
    print(
        table(
            rows,
            [
                "task",
                "train AUC",
                "CV AUC (mean)",
                "CV AUC range",
                "$% at 98% (OOF)",
                "$% at 95% (OOF)",
            ],
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
