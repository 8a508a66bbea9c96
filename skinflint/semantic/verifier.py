"""A word-level check that two texts ask the same thing, for pairs an embedder finds similar.

Sentence embedders score "convert string to int" and "convert int to string" at 0.99 or more:
a cosine threshold alone serves wrong answers for near-misses. :func:`verify` rejects a pair when
the texts differ in any of

* numbers (digits or number words; "few thousand" vs "few hundred"),
* dates (month, weekday and season names, today / tomorrow / yesterday),
* named entities (capitalised words, acronyms, camel case) missing from the other text,
* negation (not, no, never, without, n't, ...),
* the order of two words around a word both texts share: "from Paris to London" vs "from London
  to Paris", "F to C" vs "C to F", "is Apple better than Samsung" vs the reverse.

Each check errs towards rejecting: a wrong rejection costs one upstream call, a wrong hit serves
a wrong answer. :class:`Verifier` adds a learned score over the same evidence (see its docstring).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

__all__ = ["Evidence", "compare", "verify"]

_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+(?:['’][^\W\d_]+)?(?:\+\+|#)?")
_SENTENCE_END = re.compile(r"[.?!:;\n]")

STOPWORDS = frozenset(
    ["a", "about", "above", "after", "again", "against", "all", "am", "an", "and", "any", "are", "as", "at", "be", "because", "been", "before", "being", "below", "between", "both", "but", "by", "can", "could", "did", "do", "does", "doing", "down", "during", "each", "few", "for", "from", "further", "had", "has", "have", "having", "he", "her", "here", "hers", "herself", "him", "himself", "his", "how", "i", "if", "in", "into", "is", "it", "its", "itself", "just", "me", "more", "most", "my", "myself", "of", "off", "on", "once", "only", "or", "other", "our", "ours", "ourselves", "out", "over", "own", "same", "she", "should", "so", "some", "such", "than", "that", "the", "their", "theirs", "them", "themselves", "then", "there", "these", "they", "this", "those", "through", "to", "too", "under", "until", "up", "very", "was", "we", "were", "what", "when", "where", "which", "while", "who", "whom", "why", "will", "with", "would", "you", "your", "yours", "yourself", "yourselves", "i'm", "i've", "i'd", "i'll", "you're", "you've", "it's", "that's", "what's", "there's", "let's", "get", "got", "make", "want", "need", "best", "good", "way", "ways", "someone", "something", "anyone", "anything", "also", "really", "much", "many", "one", "ones", "please", "vs", "versus"]
)
_NEGATIONS = frozenset(
    ["not", "no", "never", "without", "none", "nobody", "nothing", "nowhere", "neither", "nor", "cannot", "dont", "cant", "wont", "isnt", "arent", "doesnt", "didnt", "wasnt", "werent", "shouldnt", "wouldnt", "couldnt", "hasnt", "havent", "hadnt", "aint", "mustnt", "neednt"]
)
_DATE_WORDS = frozenset(
    ["january", "february", "march", "april", "june", "july", "august", "september", "october", "november", "december", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "weekend", "weekday", "today", "tomorrow", "yesterday", "tonight", "morning", "afternoon", "evening", "spring", "summer", "autumn", "winter"]
)
_NUMBER_WORDS = dict(
    zip(
        ["zero", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred", "thousand", "million", "billion", "trillion", "hundreds", "thousands", "millions", "billions", "dozen", "half", "twice", "double", "triple", "first", "third", "fourth", "fifth", "tenth"],
        ["0", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16", "17", "18", "19", "20", "30", "40", "50", "60", "70", "80", "90", "100", "1000", "1e+06", "1e+09", "1e+12", "100", "1000", "1e+06", "1e+09", "12", "0.5", "2", "2", "3", "1", "3", "4", "5", "10"],
        strict=True,
    )
)
# "One" and "second" are left out: "how can one ..." and "a second" are not numbers.
# Words that may stand between two swapped words without changing the meaning.
_SYMMETRIC = frozenset({"and", "or", "vs", "versus", "&", "between", "with"})


@dataclass(frozen=True, slots=True)
class Evidence:
    """What differs between two texts; every field is empty or False for an accepted pair."""

    numbers: tuple[frozenset[str], frozenset[str]]
    dates: tuple[frozenset[str], frozenset[str]]
    entities: tuple[frozenset[str], frozenset[str]]
    negation: bool
    order: tuple[str, str, str] | None  # (first word, pivot, second word) swapped around pivot

    @property
    def reason(self) -> str:
        """The first difference found, as a short phrase; "" when there is none."""
        for label, (left, right) in (
            ("numbers", self.numbers),
            ("dates", self.dates),
            ("entities", self.entities),
        ):
            if left or right:
                return f"{label} differ: {_show(left)} vs {_show(right)}"
        if self.negation:
            return "negation differs"
        if self.order is not None:
            first, pivot, second = self.order
            return f"order differs: {first!r} and {second!r} swapped around {pivot!r}"
        return ""


def _show(words: frozenset[str]) -> str:
    return ",".join(sorted(words)) or "-"


def verify(a: str, b: str) -> tuple[bool, str]:
    """``(True, "")`` when no check finds a difference, else ``(False, reason)``.

    Symmetric in ``a`` and ``b`` up to the wording of the reason; case and punctuation are
    ignored except where capitals mark a named entity. Linear in the texts' length.
    """
    reason = compare(a, b).reason
    return not reason, reason


def compare(a: str, b: str) -> Evidence:
    """All the differences :func:`verify` looks for, for use as features."""
    left, right = _Parsed.of(a), _Parsed.of(b)
    return Evidence(
        numbers=_differ(left.numbers, right.numbers),
        dates=_differ(left.dates, right.dates),
        entities=(left.entities - right.stems, right.entities - left.stems),
        negation=left.negated != right.negated,
        order=_swap(left.words, right.words),
    )


def _differ(left: frozenset[str], right: frozenset[str]) -> tuple[frozenset[str], frozenset[str]]:
    return left - right, right - left


def stem(word: str) -> str:
    """A crude normal form: lower case, no possessive, no plural ``s``."""
    word = word.lower().replace("’", "'")
    if word.endswith("'s"):
        word = word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    return word


@dataclass(frozen=True, slots=True)
class _Parsed:
    words: list[str]  # stems, in order
    stems: frozenset[str]
    numbers: frozenset[str]
    dates: frozenset[str]
    entities: frozenset[str]
    negated: bool

    @classmethod
    def of(cls, text: str) -> _Parsed:
        tokens = [(m.group(), _starts_sentence(text, m.start())) for m in _TOKEN.finditer(text)]
        lower = [t.lower().replace("’", "'") for t, _ in tokens]
        words = [stem(t) for t, _ in tokens]
        return cls(
            words=words,
            stems=frozenset(words),
            numbers=frozenset(n for n in map(_number, lower) if n is not None),
            dates=frozenset(w for w in lower if w in _DATE_WORDS),
            entities=frozenset(stem(t) for t, first in tokens if _is_entity(t, first)),
            negated=any(w in _NEGATIONS or w.endswith("n't") for w in lower),
        )


def _starts_sentence(text: str, start: int) -> bool:
    before = text[:start].rstrip(" \t\"'(«“")
    return not before or _SENTENCE_END.fullmatch(before[-1]) is not None


def _number(word: str) -> str | None:
    if word[0].isdigit():
        digits = word.replace(",", "")
        try:
            value = float(digits)
        except ValueError:
            return digits
        return f"{value:g}" if value < 1e15 else digits
    return _NUMBER_WORDS.get(word)


def _is_entity(token: str, sentence_start: bool) -> bool:
    """Capitalised words that are not function words; at a sentence start only odd casing
    (``iPhone``, ``USA``) counts, since every first word is capitalised there."""
    if not any(c.isupper() for c in token) or token.lower() in STOPWORDS:
        return False
    if token.lower() in _NEGATIONS or token.lower() in _NUMBER_WORDS:
        return False  # compared by their own checks
    if sentence_start:
        return any(c.isupper() for c in token[1:])
    return True


def _swap(left: list[str], right: list[str]) -> tuple[str, str, str] | None:
    """Content words ``u`` before ``v`` in ``left`` but after it in ``right``, with a word ``p``
    between them in both texts: ``u p v`` against ``v p u``. Only words that occur once in each
    text are considered, so the positions are unambiguous. O(n) with prefix maxima."""
    once_left = [w for w, n in Counter(left).items() if n == 1]
    once_right = {w for w, n in Counter(right).items() if n == 1}
    shared = [w for w in once_left if w in once_right]  # in left's order
    where = {w: i for i, w in enumerate(right)}
    seq = [(w, where[w], w not in STOPWORDS) for w in shared]
    best_after: list[tuple[int, str] | None] = [None] * len(seq)
    low: tuple[int, str] | None = None
    for i in range(len(seq) - 1, -1, -1):
        best_after[i] = low
        word, pos, content = seq[i]
        if content and (low is None or pos < low[0]):
            low = (pos, word)
    high: tuple[int, str] | None = None
    for i, (word, pos, content) in enumerate(seq):
        after = best_after[i]
        if high is not None and after is not None and high[0] > pos > after[0]:
            if word not in _SYMMETRIC:
                return high[1], word, after[1]
        if content and (high is None or pos > high[0]):
            high = (pos, word)
    return None


_WH = ("what", "which", "how", "where", "when", "why", "who")
_AUX = frozenset(
    ["is", "are", "am", "was", "were", "do", "does", "did", "can", "could", "should", "would", "will", "shall", "may", "might", "must", "has", "have"]
)
FEATURES = (
    "cosine", "jaccard", "content_jaccard", "unmatched_min", "unmatched_max", "length_ratio",
    "wh_place_time_reason", "wh_other", "question_kind", "numbers", "dates", "entities",
    "negation", "order",
)


def features(a: str, b: str, cosine: float) -> list[float]:
    """The learned score's inputs, named by :data:`FEATURES`, for texts ``a``, ``b`` whose
    embeddings have cosine ``cosine``."""
    left, right = _Parsed.of(a), _Parsed.of(b)
    evidence = compare(a, b)
    content_l = {w for w in left.stems if w not in STOPWORDS}
    content_r = {w for w in right.stems if w not in STOPWORDS}
    only_l, only_r = len(content_l - content_r), len(content_r - content_l)
    wh_l = {w for w in left.stems if w in _WH}
    wh_r = {w for w in right.stems if w in _WH}
    strong = {"where", "when", "why", "who"}
    return [
        cosine,
        _jaccard(left.stems, right.stems),
        _jaccard(content_l, content_r),
        float(np.log1p(min(only_l, only_r))),
        float(np.log1p(max(only_l, only_r))),
        min(len(left.words), len(right.words)) / max(len(left.words), len(right.words), 1),
        float(wh_l & strong != wh_r & strong),
        float(wh_l - strong != wh_r - strong),
        float(_kind(left.words) != _kind(right.words)),
        float(bool(evidence.numbers[0] or evidence.numbers[1])),
        float(bool(evidence.dates[0] or evidence.dates[1])),
        float(bool(evidence.entities[0] or evidence.entities[1])),
        float(evidence.negation),
        float(evidence.order is not None),
    ]


def _jaccard(left: frozenset[str] | set[str], right: frozenset[str] | set[str]) -> float:
    union = len(left | right)
    return len(left & right) / union if union else 1.0


def _kind(words: list[str]) -> str:
    """"wh" for an open question, "yes-no" for a polar one, "" otherwise (by the first word)."""
    first = words[0] if words else ""
    return "wh" if first in _WH else "yes-no" if first in _AUX else ""
