"""A word-level check that two texts ask the same thing, for pairs an embedder finds similar.

Sentence embedders score "convert string to int" and "convert int to string" at 0.99 or more:
a cosine threshold alone serves wrong answers for near-misses. :func:`verify` rejects a pair when
the texts differ in any of

* numbers (digits or number words; "few thousand" vs "few hundred"),
* dates (month, weekday and season names, today / tomorrow / yesterday),
* named entities (capitalised words, acronyms, camel case) missing from the other text,
* symbols (``%`` vs ``~``, ``C++`` vs ``C#``; ordinary punctuation is ignored),
* the word opening the question, when both open with where / when / why / who,
* negation (not, no, never, without, n't, non-, ...: how many times each text negates, so "did
  not have to worry, without a doubt" is not "had to worry, without a doubt"), or opposite
  words (for / against, encrypt / decrypt, buy / sell, he / she, ...),
* the order of two words around a word both texts share: "from Paris to London" vs "from London
  to Paris", "F to C" vs "C to F", "is Apple better than Samsung" vs the reverse,
* the one word that differs between otherwise identical texts, unless both are forms of one word:
  "the soil was already wet" vs "the soil was already dry".

Each check errs towards rejecting: a wrong rejection costs one upstream call, a wrong hit serves
a wrong answer. (Logistic and gradient-boosted models over these differences, token overlap,
the cosine and the two embeddings were tried on Quora pairs: none raised held-out recall at 95%
precision, so none is shipped. Fine-tuning the embedder itself on labelled pairs,
``minilm-questions``, raises recall at 85-93% precision, not at 95%.)
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["Evidence", "compare", "verify"]

# Words, numbers with what follows them ("10th", "0.6j"), and names like C++, C# or M604n.
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*[^\W_]*|[^\W\d_][^\W_]*(?:['’][^\W\d_]+)?(?:\+\+|#)?")
_NUMERIC = re.compile(r"(\d+(?:[.,]\d+)*)(st|nd|rd|th|s)?(.*)")
_SENTENCE_END = re.compile(r"[.?!:;\n]")
# Anything but letters, digits, spaces and ordinary punctuation: operators, currency, emoji.
_SYMBOL = re.compile(r"[^\w\s.,;:!?'\"()\[\]{}\-–—‘’“”…/]")


def _words(text: str) -> frozenset[str]:
    return frozenset(_list(text))


def _list(text: str) -> list[str]:
    return text.split()


STOPWORDS = _words(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself of off on once only or other our ours ourselves out
    over own same she should so some such than that the their theirs them themselves then there
    these they this those through to too under until up very was we were what when where which
    while who whom why will with would you your yours yourself yourselves i'm i've i'd i'll
    you're you've it's that's what's there's let's get got make want need best good way ways
    someone something anyone anything also really much many one ones please vs versus"""
)
_NEGATIONS = _words(
    """not no non never without none nobody nothing nowhere neither nor cannot dont cant wont
    isnt arent doesnt didnt wasnt werent shouldnt wouldnt couldnt hasnt havent hadnt aint
    mustnt neednt"""
)
_DATE_WORDS = _words(
    """january february march april june july august september october november december
    monday tuesday wednesday thursday friday saturday sunday weekend weekday today tomorrow
    yesterday tonight morning afternoon evening spring summer autumn winter"""
)
# "One" and "second" are left out: "how can one ..." and "a second" are not numbers.
_NUMBER_WORDS = dict(
    zip(
        _list(
            """zero two three four five six seven eight nine ten eleven twelve thirteen fourteen
        fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy
        eighty ninety hundred thousand million billion trillion hundreds thousands millions
        billions dozen half twice double triple first third fourth fifth tenth"""
        ),
        _list(
            """0 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 30 40 50 60 70 80 90 100 1000
            1e+06 1e+09 1e+12 100 1000 1e+06 1e+09 12 0.5 2 2 3 1 3 4 5 10"""
        ),
        strict=True,
    )
)
# Pairs of opposites (as stems): "arguments for X" and "arguments against X" are not the same
# question, nor "how to encrypt" and "how to decrypt".
_OPPOSITES = tuple(
    tuple(pair.split("/"))
    for pair in _list(
        """for/against before/after above/below over/under more/less most/least
    best/worst better/worse good/bad increase/decrease buy/sell pro/con advantage/disadvantage
    true/false positive/negative male/female man/woman men/women boy/girl guy/girl he/she
    him/her his/her husband/wife father/mother son/daughter maximum/minimum max/min high/low
    higher/lower highest/lowest up/down import/export win/lose cheap/expensive fast/slow
    faster/slower big/small bigger/smaller biggest/smallest large/small old/new oldest/newest
    start/end open/close on/off encrypt/decrypt encode/decode upload/download input/output
    add/remove enable/disable same/different similar/different like/dislike love/hate
    rich/poor north/south east/west left/right horizontal/vertical inside/outside
    internal/external hot/cold light/dark black/white push/pull send/receive client/server
    uppercase/lowercase ascending/descending row/column"""
    )
)
# Answers to "where", "when", "why" and "who" questions differ even when the rest is alike.
_QUESTION_WORDS = frozenset({"where", "when", "why", "who", "whom", "whose"})
# Words that may stand between two swapped words without changing the meaning.
_SYMMETRIC = frozenset({"and", "or", "vs", "versus", "&", "between", "with"})
# Words that point from one side to the other: "kilometers to miles" is not "miles to kilometers".
_DIRECTED = frozenset({"to", "into", "onto", "from", "than", "over", "under", "above", "below",
                       "before", "after", "per", "towards", "toward"})
_REACH = 3  # how far from the pointing word its two sides may be, stopwords skipped


@dataclass(frozen=True, slots=True)
class Evidence:
    """What differs between two texts; every field is empty or False for an accepted pair."""

    numbers: tuple[frozenset[str], frozenset[str]]
    dates: tuple[frozenset[str], frozenset[str]]
    entities: tuple[frozenset[str], frozenset[str]]
    symbols: tuple[frozenset[str], frozenset[str]]
    question: tuple[frozenset[str], frozenset[str]]
    negation: bool
    opposites: tuple[str, str] | None  # a word of one text and its opposite in the other
    order: tuple[str, str, str] | None  # (first word, pivot, second word) swapped around pivot
    replaced: tuple[str, str] | None = None  # the one word that differs between equal texts

    @property
    def reason(self) -> str:
        """The first difference found, as a short phrase; "" when there is none."""
        return self._first()[1]

    @property
    def kind(self) -> str:
        """What the first difference is (``numbers differ``, ``negation differs``,
        ``opposites``, ...): a fixed label for metrics; "" when there is none."""
        return self._first()[0]

    def _first(self) -> tuple[str, str]:
        for label, (left, right) in (
            ("numbers", self.numbers),
            ("dates", self.dates),
            ("entities", self.entities),
            ("symbols", self.symbols),
            ("question words", self.question),
        ):
            if left or right:
                return f"{label} differ", f"{label} differ: {_show(left)} vs {_show(right)}"
        if self.negation:
            return "negation differs", "negation differs"
        if self.opposites is not None:
            return "opposites", "opposites: {} vs {}".format(*self.opposites)
        if self.order is not None:
            first, pivot, second = self.order
            return "order differs", (
                f"order differs: {first!r} and {second!r} swapped around {pivot!r}")
        if self.replaced is not None:
            return "one word replaced", "one word replaced: {} vs {}".format(*self.replaced)
        return "", ""


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
    left, right = _parsed(a), _parsed(b)
    return Evidence(
        numbers=_differ(left.numbers, right.numbers),
        dates=_differ(left.dates, right.dates),
        entities=(left.entities - right.stems, right.entities - left.stems),
        symbols=_differ(left.symbols, right.symbols),
        question=_differ(left.question, right.question) if left.question and right.question
        else (frozenset(), frozenset()),
        negation=left.negations != right.negations,
        opposites=_opposites(left.stems, right.stems),
        order=_swap(left.words, right.words) or _flipped(left.words, right.words),
        replaced=_replaced(left.words, right.words),
    )


def _differ(left: frozenset[str], right: frozenset[str]) -> tuple[frozenset[str], frozenset[str]]:
    return left - right, right - left


def _opposites(left: frozenset[str], right: frozenset[str]) -> tuple[str, str] | None:
    """A word only ``left`` has whose opposite only ``right`` has."""
    only_left, only_right = left - right, right - left
    for x, y in _OPPOSITES:
        if (x in only_left and y in only_right) or (y in only_left and x in only_right):
            return (x, y) if x in only_left else (y, x)
    return None


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
    symbols: frozenset[str]
    question: frozenset[str]  # "where", "when", ... opening a sentence
    negations: int  # negation words, counted

    @classmethod
    def of(cls, text: str) -> _Parsed:
        tokens = _tokens(text)
        lower = [t.lower().replace("’", "'") for t, _ in tokens]
        words = [stem(t) for t, _ in tokens]
        return cls(
            words=words,
            stems=frozenset(words),
            numbers=frozenset(n for n in map(_number, lower) if n is not None),
            dates=frozenset(w for w in lower if w in _DATE_WORDS),
            entities=frozenset(
                stem(t) for t, first in tokens if _is_code(t) or _is_entity(t, first)
            ),
            symbols=frozenset(_SYMBOL.findall(text)),
            question=frozenset(
                w for w, (_, first) in zip(lower, tokens, strict=True)
                if first and w in _QUESTION_WORDS
            ),
            negations=sum(map(_negation, lower)),
        )


def _negation(word: str) -> bool:
    return word in _NEGATIONS or word.endswith("n't")


# Parsing costs far more than comparing, and a stored question is compared again and again (by
# the cache, by an audit of a log); a parse is immutable, so recent ones are kept.
_parsed = lru_cache(maxsize=4096)(_Parsed.of)


def _tokens(text: str) -> list[tuple[str, bool]]:
    """Tokens, each with whether it opens a sentence (only spaces and quotes between it and the
    previous sentence's end, or the start of the text)."""
    out: list[tuple[str, bool]] = []
    end = 0
    for match in _TOKEN.finditer(text):
        gap = text[end : match.start()].rstrip(" \t\"'(«“")
        first = _SENTENCE_END.fullmatch(gap[-1]) is not None if gap else not out
        out.append((match.group(), first))
        end = match.end()
    return out


def _number(word: str) -> str | None:
    match = _NUMERIC.fullmatch(word)
    if match is None:
        return _NUMBER_WORDS.get(word)
    digits = match.group(1).replace(",", "")
    try:
        value = float(digits)
    except ValueError:
        return digits
    return f"{value:g}" if value < 1e15 else digits


def _is_code(token: str) -> bool:
    """Letters and digits mixed, as in model names ("M604n", "X7", "0.6j"); "10th" and
    "1990s" are plain numbers."""
    if not any(c.isdigit() for c in token) or not any(c.isalpha() for c in token):
        return False
    match = _NUMERIC.fullmatch(token.lower())
    return match is None or bool(match.group(3))


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


def _replaced(left: list[str], right: list[str]) -> tuple[str, str] | None:
    """The two content words by which texts of the same words otherwise differ (one word
    replaced, the others in any order), unless they are forms of one word: the same start
    followed by endings such as -s, -ed, -ing, -y / -ies ("dance" / "dancing", "tried" /
    "tries"), not "restart" / "restore".

    Texts that differ in a single word are where opposites hide that no list names ("the soil
    was already wet" / "... dry", "partially" / "fully responsible"), also when other words
    moved ("_ likes dark liquors. A) Monica B) Felicia" / "_ likes clear liquors. A) Felicia
    B) Monica"); on Quora pairs this check also turns away some synonyms ("big" / "huge"),
    about 2% of hits at the shipped threshold.
    """
    if len(left) != len(right):
        return None
    only_left, only_right = Counter(left) - Counter(right), Counter(right) - Counter(left)
    if sum(only_left.values()) != 1 or sum(only_right.values()) != 1:
        return None
    (x,), (y,) = only_left, only_right
    if x in STOPWORDS or y in STOPWORDS or _number(x) or _number(y):
        return None
    if _negation(x) or _negation(y):
        return None  # compared by their count
    if _inflections(x, y):
        return None
    return x, y


_ENDINGS = _words("s es ses ed d ing e er ers est ly y ies ied") | {""}


def _inflections(x: str, y: str) -> bool:
    """Whether ``x`` and ``y`` share a start of three letters or more and end in inflections."""
    start = 0
    while start < min(len(x), len(y)) and x[start] == y[start]:
        start += 1
    return start >= 3 and x[start:] in _ENDINGS and y[start:] in _ENDINGS


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
        if (
            high is not None
            and after is not None
            and high[0] > pos > after[0]
            and word not in _SYMMETRIC
        ):
            return high[1], word, after[1]
        if content and (high is None or pos > high[0]):
            high = (pos, word)
    return None


def _flipped(left: list[str], right: list[str]) -> tuple[str, str, str] | None:
    """Content words ``u`` and ``v`` on either side of a pointing word ``p`` ("to", "from",
    "than", ...) as ``u p v`` in ``left`` and ``v p u`` in ``right``: "how to convert
    kilometers to miles" against "... miles to kilometers". Unlike :func:`_swap`, ``p`` may
    occur more than once, as "to" does in "how to go from paris to london". Linear."""
    flips = {(v, p, u) for u, p, v in _around_pointers(right)}
    for u, p, v in _around_pointers(left):
        if (u, p, v) in flips and u != v:
            return u, p, v
    return None


def _around_pointers(words: list[str]) -> list[tuple[str, str, str]]:
    """``(u, p, v)`` for each pointing word ``p`` with a content word ``u`` shortly before it
    and ``v`` shortly after it."""
    out = []
    for i, p in enumerate(words):
        if p not in _DIRECTED:
            continue
        before = next((w for w in reversed(words[max(0, i - _REACH):i]) if w not in STOPWORDS),
                      None)
        after = next((w for w in words[i + 1:i + 1 + _REACH] if w not in STOPWORDS), None)
        if before is not None and after is not None:
            out.append((before, p, after))
    return out
