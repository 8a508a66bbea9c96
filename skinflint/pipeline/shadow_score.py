"""How the shadow-evaluation guard scores a pair of answers, and how sure it is of a strategy's
score: pure functions and one rolling window, no I/O.

Scores are in [0, 1]. ``exact`` scores 1 when the answers are the same text once case, spacing
and trailing punctuation are set aside, or the same JSON value; ``similarity`` scores the
cosine of the two answers' embeddings when an embedder is at hand, else of their word counts
(a bag of words: it sees the same words in another order as the same answer, and a paraphrase
as a different one), and falls back to ``exact`` for short answers (at most
:data:`SHORT_WORDS` words) and JSON, where a near miss is a miss.

The bound is Hoeffding's, one-sided, which holds for any scores in [0, 1] (binary or not):
with probability at least ``1 - DELTA`` the strategy's true mean score is below
``mean + sqrt(ln(1 / DELTA) / (2 n))``. The guard switches a strategy off when that *upper*
bound falls below the floor: when it is 95% sure the strategy's quality is below the floor.
A lower bound would switch off a perfect strategy on its first samples (20 agreements in 20
give a lower bound of 0.73).

The bound is checked at every sample once the window holds ``min_samples``: what counts is how
often a strategy exactly at the floor is switched off over many checks. Hoeffding's slack keeps
that below ``DELTA`` (0.2-0.7% over 1,000 samples, 1.5-2.7% over 5,000: ``bench/shadow.py``);
the tighter Chernoff (KL) bound at the same 95% would switch off 13-15% and 53% of them, and at
99.9%, where its rate is Hoeffding's, it switches off at the same scores or later: no gain.
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
    "DELTA",
    "SHORT_WORDS",
    "WINDOW",
    "Window",
    "answer_text",
    "cosine",
    "exact_score",
    "is_structured",
    "upper_bound",
    "word_cosine",
]

DELTA = 0.05  # the bound holds with probability 1 - DELTA
SHORT_WORDS = 5  # answers of at most this many words are compared exactly
WINDOW = 200  # the samples a rolling score keeps

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


def upper_bound(mean: float, n: int, delta: float = DELTA) -> float:
    """Hoeffding's one-sided upper confidence bound on the mean of ``n`` scores in [0, 1]."""
    if n <= 0:
        return 1.0
    return min(1.0, mean + math.sqrt(math.log(1 / delta) / (2 * n)))


@dataclass
class Window:
    """The last :data:`WINDOW` scores of one strategy for one feature."""

    scores: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    total: float = 0.0

    def add(self, score: float) -> None:
        if len(self.scores) == self.scores.maxlen:
            self.total -= self.scores[0]
        self.scores.append(score)
        self.total += score

    @property
    def samples(self) -> int:
        return len(self.scores)

    @property
    def mean(self) -> float:
        return self.total / len(self.scores) if self.scores else 1.0

    @property
    def bound(self) -> float:
        return upper_bound(self.mean, self.samples)

    def clear(self) -> None:
        self.scores.clear()
        self.total = 0.0
