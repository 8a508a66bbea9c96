"""How the shadow-evaluation guard scores a pair of answers, and how sure it is of a strategy's
score: pure functions and one rolling window, no I/O.

Scores are in [0, 1]. ``exact`` scores 1 when the answers are the same text once case, spacing
and trailing punctuation are set aside, or the same JSON value; ``similarity`` scores the
cosine of the two answers' embeddings when an embedder is at hand, else of their word counts
(a bag of words: it sees the same words in another order as the same answer, and a paraphrase
as a different one), and falls back to ``exact`` for short answers (at most
:data:`SHORT_WORDS` words) and JSON, where a near miss is a miss.

Whether a strategy is below its floor is a sequential test of "the mean score is at least the
floor", valid for any scores in [0, 1] (binary or not), made of two parts:

* **The first check**, once, when ``min_samples`` scores are in: their mean ``m`` is below the
  floor at level :data:`FIRST_DELTA` when ``n * KL(m || floor) >= ln(1 / FIRST_DELTA)``
  (Hoeffding's Chernoff bound: the chance that ``n`` scores of mean at least ``floor`` average
  ``m`` or less is at most ``exp(-n KL(m || floor))``). One check, so no repeated chances.
* **Testing by betting**, at every sample: a wealth that starts at 1 and is multiplied by
  ``1 + bet * (floor - score)`` per score, where ``bet`` (:func:`bet`) is chosen from the scores
  before it: the Kelly bet against the estimate of the last :data:`MEMORY` scores (shrunk
  towards the floor by :data:`PRIOR` pseudo-scores), nothing while that estimate is at or above
  the floor, at most :data:`CAP` of what a score of 1 could lose. While the true mean is at least
  the floor the wealth is a nonnegative supermartingale, so by Ville's inequality the chance it
  *ever* reaches ``1 / DELTA`` is at most :data:`DELTA`: however many samples are checked, the
  chance of switching off a strategy at or above its floor stays below
  ``FIRST_DELTA + DELTA``, 3% (measured exactly at the floor: 0.6-0.8% within 1,000 samples,
  0.85-0.9% within 10,000, where the former rule, Hoeffding's upper bound on the last 200
  scores checked at every sample, went from 0.45-0.55% to 3.6-4.8%: ``bench/shadow.py``).
  The wealth is not restarted, which is what keeps that guarantee; a long good history does
  not hide a later drop because the bet is nothing while the recent scores are above the
  floor, so the wealth stays near 1 (a strategy that sits *just* above the floor for a long
  time loses a little of it, and a later drop then takes a little longer to catch). The floor
  may change between samples: each factor uses the floor of its sample.

Both count from the window's start (the process's start, or an operator's re-enable), so a
``min_samples`` beyond the window decides too. The rolling window of the last :data:`WINDOW`
scores gives the mean shown to operators.
"""

from __future__ import annotations

import math
import re
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = [
    "CAP",
    "DELTA",
    "FIRST_DELTA",
    "MEMORY",
    "PRIOR",
    "SHORT_WORDS",
    "WINDOW",
    "Window",
    "answer_text",
    "bet",
    "cosine",
    "exact_score",
    "first_check",
    "is_structured",
    "kl",
    "word_cosine",
]

DELTA = 0.01  # betting: switched off once the wealth reaches 1 / DELTA
FIRST_DELTA = 0.02  # the first check's level, at min_samples
MEMORY = 100  # the last scores a bet is sized from
PRIOR = 10  # pseudo-scores at the floor that estimate starts from
CAP = 0.5  # the largest bet, as the share of the wealth a score of 1 could lose
SHORT_WORDS = 5  # answers of at most this many words are compared exactly
WINDOW = 200  # the samples a rolling score keeps
_TINY = 1e-9  # keeps a floor of 0 or 1 from dividing by zero
_MOST = 1e100  # the wealth kept at most (far past 1 / DELTA; keeps it finite, and JSON)

_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


def answer_text(body: dict[str, Any]) -> str:
    """The first choice's text (its tool calls, as JSON, when it calls tools)."""
    choices = body.get("choices") or [{}]
    message = choices[0].get("message") or {}
    calls = message.get("tool_calls")
    if calls:
        return orjson.dumps([c.get("function") for c in calls]).decode()
    content = message.get("content")
    return content if isinstance(content, str) else ""


def _json(text: str) -> Any:
    stripped = text.strip()
    if not stripped or stripped[0] not in "[{":
        return None
    try:
        return orjson.loads(stripped)
    except orjson.JSONDecodeError:
        return None


def is_structured(text: str) -> bool:
    """Short or JSON: an answer only an exact comparison judges fairly."""
    return len(text.split()) <= SHORT_WORDS or _json(text) is not None


def _normalise(text: str) -> str:
    return _SPACE.sub(" ", text).strip().rstrip(".!?;:").strip().casefold()


def exact_score(a: str, b: str) -> float:
    """1.0 when the two answers are the same JSON value, or the same normalised text."""
    ja, jb = _json(a), _json(b)
    if ja is not None or jb is not None:
        return float(ja == jb)
    return float(_normalise(a) == _normalise(b))


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """The cosine of two vectors, clipped to [0, 1] (opposite answers score 0)."""
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return min(1.0, max(0.0, dot / norm)) if norm else 0.0


def word_cosine(a: str, b: str) -> float:
    """The cosine of the two texts' word counts."""
    ca, cb = Counter(_WORD.findall(a.casefold())), Counter(_WORD.findall(b.casefold()))
    if not ca and not cb:
        return 1.0
    dot = sum(n * cb[w] for w, n in ca.items())
    norm = math.sqrt(sum(n * n for n in ca.values())) * math.sqrt(sum(n * n for n in cb.values()))
    return dot / norm if norm else 0.0


def kl(p: float, q: float) -> float:
    """The Kullback-Leibler divergence of a coin of bias ``p`` from one of bias ``q``."""

    def term(a: float, b: float) -> float:
        if a == 0.0:
            return 0.0
        return a * math.log(a / b) if b > 0.0 else math.inf

    return term(p, q) + term(1.0 - p, 1.0 - q)


def first_check(mean: float, n: int, floor: float, delta: float = FIRST_DELTA) -> bool:
    """True when ``n`` scores in [0, 1] averaging ``mean`` put the true mean below ``floor`` at
    level ``delta`` (one check: Hoeffding's Chernoff bound)."""
    return n > 0 and mean < floor and n * kl(mean, floor) >= math.log(1 / delta)


def bet(estimate: float, floor: float) -> float:
    """The share of the wealth bet that the next score is below ``floor``: the Kelly bet
    against a coin of bias ``estimate`` (the worst case of any scores of that mean), nothing
    when ``estimate`` is at or above the floor, at most :data:`CAP` of what a score of 1
    loses."""
    if estimate >= floor:
        return 0.0
    cap = CAP / max(1.0 - floor, _TINY)
    return min(cap, (floor - estimate) / max(floor * (1.0 - floor), _TINY))


@dataclass
class Window:
    """One strategy's scores for one feature: the last :data:`WINDOW` of them (their mean is
    shown), and the test that it is below its floor (the module docstring): the samples and
    their total since the window started, and the wealth bet against the floor."""

    scores: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    total: float = 0.0
    recent: float = 0.0  # the total of the last MEMORY scores
    seen: int = 0
    seen_total: float = 0.0
    wealth: float = 1.0

    def add(self, score: float, floor: float) -> None:
        """One more score, bet on before it is counted (the bet is sized from the earlier
        ones)."""
        scores = self.scores
        held = min(len(scores), MEMORY)
        estimate = (PRIOR * floor + self.recent) / (PRIOR + held)
        self.wealth = min(_MOST, self.wealth * (1.0 + bet(estimate, floor) * (floor - score)))
        if len(scores) >= MEMORY:
            self.recent -= scores[-MEMORY]
        if len(scores) == scores.maxlen:
            self.total -= scores[0]
        scores.append(score)
        self.total += score
        self.recent += score
        self.seen += 1
        self.seen_total += score

    @property
    def samples(self) -> int:
        return len(self.scores)

    @property
    def mean(self) -> float:
        return self.total / len(self.scores) if self.scores else 1.0

    def below(self, floor: float, min_samples: int) -> str | None:
        """Why the strategy is below ``floor`` (None: not shown, or too early to say): the
        first check at exactly ``min_samples`` samples, or the wealth at any sample since."""
        if self.seen < min_samples:
            return None
        if self.seen == min_samples and first_check(self.seen_total / self.seen, self.seen,
                                                    floor):
            return f"the mean of its first {self.seen} samples"
        if self.wealth >= 1 / DELTA:
            return f"the evidence {self.wealth:.4g} >= {1 / DELTA:g}"
        return None

    def clear(self) -> None:
        self.scores.clear()
        self.total = self.recent = self.seen_total = 0.0
        self.seen = 0
        self.wealth = 1.0
