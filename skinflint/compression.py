"""Prompt compression as pure functions over OpenAI chat messages, shared by the compress stage
and by offline analysis.

Every function returns new message lists and leaves its input alone; a message it does not
change is the same object in the result. What the client sent as code or data is never
altered: fenced code blocks and JSON-looking paragraphs are kept whole, messages with tool
calls, tool results and list (multi-part) content are never edited, and the last user
message's question (its final paragraph, or its final worked-example block) stays
byte-identical. Text is split at blank lines (paragraphs); a blank line inside a fence does
not split (:mod:`skinflint.paragraphs`).

The word bags and line sets of texts that come back (re-sent worked examples, documents) are
remembered, bounded, from their second sighting (:mod:`skinflint.remembered`), and so are the
paragraphs of a message's beginning that comes back before something new (the same examples
or documents before a new question): only what follows it is split. The results are the same
either way.
"""

from __future__ import annotations

import math
import string
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from itertools import chain
from typing import Any

from skinflint.paragraphs import Span, paragraphs, protected, sentences
from skinflint.remembered import Remembered, SeenOnce

__all__ = [
    "Examples",
    "Span",
    "clear_caches",
    "find_examples",
    "keep_examples",
    "lexical_similarities",
    "normalize_system",
    "paragraphs",
    "replace_system",
    "trim_context",
    "trim_history",
]

Message = dict[str, Any]
Count = Callable[[str], int]
# ``within(text, limit)``: the text's count when at most ``limit``, else any number above it
Within = Callable[[str, int], int]

_PUNCTUATION = bytes.maketrans(string.punctuation.encode(), b" " * len(string.punctuation))
_STOP = frozenset(w.encode() for w in (
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "has", "have", "how",
    "in", "is", "it", "its", "of", "on", "or", "that", "the", "this", "to", "was", "were",
    "what", "when", "which", "who", "why", "will", "with"))
_MAX_TOKEN_CHARS = 32  # no token of the tokenizers counted with is longer (in practice)
_CHARS_PER_TOKEN = 4  # English text, on average
_MISSES = 8  # units in a row that did not fit: the budget is as full as it gets
_MIN_BLOCKS = 3  # a template line repeated in fewer paragraphs is not a few-shot pattern
_MIN_TEMPLATE_CHARS = 5  # "A", "B", "Yes": answers, not instructions


def _words(text: str) -> frozenset[bytes]:
    # bytes.translate and split are several times faster than a regex over str
    return frozenset(text.lower().encode().translate(_PUNCTUATION).split()) - _STOP


def _bag(text: str) -> AbstractSet[bytes]:
    words = set(text.lower().encode().translate(_PUNCTUATION).split())
    words -= _STOP  # in place: cheaper than a second set
    return words


_REMEMBERED = 2048  # texts whose word bags (and line sets) are kept
_REMEMBER_CHARS = 2048  # longer texts are not remembered
_remembered_bag = Remembered(_bag, size=_REMEMBERED, max_chars=_REMEMBER_CHARS)


def lexical_similarities(question: str, texts: Sequence[str],
                         bags: Sequence[AbstractSet[bytes]] | None = None) -> list[float]:
    """Each text's word-bag cosine with ``question``: shared distinct words over the geometric
    mean of the two texts' distinct words (lower-cased, common English words left out).
    ``bags``: the texts' word bags, when known (:attr:`Examples.bags`)."""
    return _cosines(question, bags if bags is not None else _remembered_bag.many(texts))


def _cosines(question: str, bags: Sequence[AbstractSet[bytes]]) -> list[float]:
    asked = _words(question)
    if not asked:
        return [0.0] * len(bags)
    out: list[float] = []
    n = len(asked)
    for words in bags:
        shared = len(asked.intersection(words))
        out.append(shared / math.sqrt(n * len(words)) if shared else 0.0)
    return out


def clear_caches() -> None:
    """Forget the remembered word bags and line sets (for measuring texts never seen before)."""
    _remembered_bag.clear()
    _remembered_lines.clear()
    _remembered_heads.clear()


def _editable(message: Any) -> bool:
    return (isinstance(message, dict) and isinstance(message.get("content"), str)
            and not message.get("tool_calls") and message.get("role") != "tool")


def _last_user(messages: Sequence[Any]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], dict) and messages[i].get("role") == "user":
            return i
    return -1


# ---- system prompt


def normalize_system(messages: list[Message]) -> list[Message]:
    """System (and developer) prompts with trailing spaces, runs of blank lines and repeated
    paragraphs removed, and any prompt that repeats an earlier one dropped."""
    out: list[Message] = []
    seen: set[str] = set()
    for message in messages:
        if not (_editable(message) and message.get("role") in ("system", "developer")):
            out.append(message)
            continue
        text = _normalize(message["content"])
        if text in seen:
            continue
        seen.add(text)
        out.append(message if text == message["content"] else {**message, "content": text})
    unchanged = len(out) == len(messages) and all(
        a is b for a, b in zip(out, messages, strict=True))
    return messages if unchanged else out


def replace_system(messages: list[Message],
                   replacement: Callable[[str], str | None]) -> list[Message]:
    """``messages`` with each system (and developer) prompt that ``replacement`` gives a new
    text for (None: kept) replaced by it."""
    out: list[Message] | None = None
    for i, message in enumerate(messages):
        if not (_editable(message) and message.get("role") in ("system", "developer")):
            continue
        new = replacement(message["content"])
        if new is not None and new != message["content"]:
            out = list(messages) if out is None else out
            out[i] = {**message, "content": new}
    return messages if out is None else out


def _normalize(text: str) -> str:
    spans = paragraphs(text)
    if not spans[1:] and protected(text):
        return text  # one code block or JSON document: as sent
    kept: list[str] = []
    seen: set[str] = set()
    for span in spans:
        piece = span.piece(text)
        if not span.protected:
            piece = "\n".join(map(str.rstrip, piece.strip().split("\n")))
            if piece in seen:
                continue
            seen.add(piece)
        kept.append(piece)
    return "\n\n".join(kept).rstrip()  # after a closing fence or a JSON document: not code


# ---- few-shot examples


@dataclass(frozen=True, slots=True)
class Examples:
    """The worked examples of a prompt and the question they precede. ``pairs``: example i is
    the user/assistant messages ``pairs[i]``; ``blocks``: example i is the text
    ``blocks[i]`` of message ``message`` (its template blocks, the question's excluded);
    ``bags``: their word bags, kept with a message beginning that came before."""

    question: str
    texts: tuple[str, ...]
    pinned: frozenset[int]  # examples holding code or JSON: always kept
    pairs: tuple[tuple[int, int], ...] = ()
    message: int = -1
    blocks: tuple[tuple[int, int], ...] = ()  # (start, next start) in the message's content
    bags: tuple[AbstractSet[bytes], ...] | None = None  # the texts' word bags, when known


def find_examples(messages: list[Message]) -> list[Examples]:
    """The example sets of ``messages``: user/assistant pairs before the last user message, and
    repeated template blocks inside the last user message."""
    last = _last_user(messages)
    if last < 0 or not isinstance(messages[last].get("content"), str):
        return []
    question = messages[last]["content"]
    found = [e for e in (_pair_examples(messages, last, question), _block_examples(messages, last))
             if e is not None]
    return found


def _pair_examples(messages: list[Message], last: int, question: str) -> Examples | None:
    pairs = tuple(
        (i, i + 1) for i in range(last - 1)
        if messages[i].get("role") == "user" and messages[i + 1].get("role") == "assistant"
        and _editable(messages[i]) and _editable(messages[i + 1])
    )
    if len(pairs) < 2:
        return None
    texts = tuple(f"{messages[u]['content']}\n{messages[a]['content']}" for u, a in pairs)
    pinned = frozenset(i for i, t in enumerate(texts) if _protected_any(t))
    return Examples(question, texts, pinned, pairs=pairs)


def _protected_any(text: str) -> bool:
    return any(s.protected for s in paragraphs(text))


def _lines(piece: str) -> frozenset[str]:
    return frozenset(map(str.strip, piece.split("\n")))


_remembered_lines = Remembered(_lines, size=_REMEMBERED, max_chars=_REMEMBER_CHARS)
_EMPTY: frozenset[str] = frozenset()


def _candidates(counts: Iterable[tuple[str, int]]) -> Iterator[tuple[int, int, str]]:
    """``(paragraphs, length, line)`` of each line that could be the template line, from
    ``(line, paragraphs holding it)``: held by enough paragraphs, and long enough to be an
    instruction rather than an answer. The template line is the greatest."""
    return ((n, len(line), line) for line, n in counts
            if n >= _MIN_BLOCKS and len(line) >= _MIN_TEMPLATE_CHARS)


def _template_line(lines: list[frozenset[str]]) -> str | None:
    best = max(_candidates(Counter(chain.from_iterable(lines)).items()), default=None)
    return best[2] if best is not None else None


def _line_sets(text: str, spans: Sequence[Span]) -> list[frozenset[str]]:
    """Each paragraph's lines (none for code and JSON, which hold no template line)."""
    lines = _remembered_lines.many([text[s.start:s.end] for s in spans if not s.protected])
    if len(lines) < len(spans):
        found = iter(lines)
        lines = [_EMPTY if s.protected else next(found) for s in spans]
    return lines


@dataclass(frozen=True, slots=True)
class _HeadBlocks:
    """The example blocks of a remembered beginning for one template line: its template
    paragraphs, where the first block starts, and each block's bounds, text, word bag and
    whether it holds code (the block of its last template paragraph included: the question's
    when nothing after the beginning holds the line)."""

    marked: tuple[int, ...]
    first: int
    bounds: tuple[tuple[int, int], ...]
    texts: tuple[str, ...]
    bags: tuple[AbstractSet[bytes], ...]
    pinned: frozenset[int]


@dataclass(frozen=True, slots=True)
class _Head:
    """The paragraphs of a prompt's beginning up to a blank line (its worked examples, sent
    again before each new question), their line sets, how many paragraphs hold each line, the
    lines that could be the template, best first, its example blocks by template line and
    the word bags of the units of context it holds."""

    text: str
    spans: tuple[Span, ...]
    lines: tuple[frozenset[str], ...]
    counts: dict[str, int]
    ranked: tuple[tuple[int, int, str], ...]  # (paragraphs, length, line)
    examples: dict[str, _HeadBlocks | None]
    bags: dict[tuple[int, int], AbstractSet[bytes]]  # of the paragraphs or sentences it holds

    def bag(self, start: int, end: int) -> AbstractSet[bytes]:
        """The word bag of ``text[start:end]``, a unit of context trimming."""
        found = self.bags.get((start, end))
        if found is None:
            found = _bag(self.text[start:end])
            if len(self.bags) < 4 * len(self.spans):  # its paragraphs, or their sentences
                self.bags[start, end] = found
        return found

    def blocks(self, line: str) -> _HeadBlocks | None:
        """The example blocks for template ``line`` (None: no paragraph here holds it)."""
        if line in self.examples:
            return self.examples[line]
        marked = [i for i, found in enumerate(self.lines) if line in found]
        found = None
        if marked:
            first = _first(self.text, self.spans, marked[0])
            bounds = _bounds(self.spans, marked, first, 0, len(marked), len(self.text))
            texts = tuple(self.text[a:b] for a, b in bounds)
            found = _HeadBlocks(tuple(marked), first, tuple(bounds), texts,
                                tuple(map(_bag, texts)),
                                frozenset(_pinned(self.spans, bounds, 0)))
        if len(self.examples) < 2:  # a template line, or its runner-up, per beginning
            self.examples[line] = found
        return found


def _head(text: str) -> _Head:
    spans = paragraphs(text)
    lines = _line_sets(text, spans)
    counts = Counter(chain.from_iterable(lines))
    ranked = sorted(_candidates(counts.items()), reverse=True)
    return _Head(text, tuple(spans), tuple(lines), dict(counts), tuple(ranked), {}, {})


class _Heads:
    """Prompt beginnings, analysed from their second sighting (:mod:`skinflint.remembered`'s
    rule) and at most ``size`` kept, least recently used dropped first. A beginning is found
    by its length and its first and last characters, then compared whole: no copy or hash of
    a long prompt per request."""

    def __init__(self, size: int, max_chars: int, seen: int = 8192) -> None:
        self._size = size
        self._max_chars = max_chars
        self._seen = SeenOnce(seen)
        self._kept: dict[tuple[int, str, str], _Head] = {}
        self._lock = threading.Lock()
        self.hits = 0

    def known(self, text: str, at: int) -> _Head | None:
        """The analysis of ``text[:at]`` when it came before (made now the second time); None
        the first time, when it is only noted."""
        if at > self._max_chars:
            return None
        key = (at, text[:_FINGER], text[max(0, at - _FINGER):at])
        with self._lock:
            head = self._kept.pop(key, None)
            if head is not None:
                self._kept[key] = head  # the newest now
        if head is not None:
            if not text.startswith(head.text):
                return None  # another beginning with the same ends
            self.hits += 1
            return head
        if not self._seen.again(hash(key)) or _fenced(text, 0, at):
            return None
        head = _head(text[:at])
        with self._lock:
            self._kept[key] = head
            while len(self._kept) > self._size:
                del self._kept[next(iter(self._kept))]
        return head

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()
            self._kept.clear()
            self.hits = 0


_HEADS = 16  # prompt beginnings remembered (with their examples: a few MB at most)
_HEAD_CHARS = 100_000  # longer ones are not
_FINGER = 64  # characters at each end of a beginning that find it
_remembered_heads = _Heads(_HEADS, _HEAD_CHARS)
_SPLITS = 2  # the last blank lines of a prompt where a remembered beginning is looked for


def _structure(text: str) -> tuple[list[Span], list[frozenset[str]], str | None,
                                    _Head | None]:
    """The paragraphs of ``text``, their line sets, its template line and the remembered
    beginning they were taken from, if any (see :func:`_known_head`)."""
    spans, head = _paragraphs(text)
    if head is None:
        lines = _line_sets(text, spans)
        return spans, lines, _template_line(lines), None
    fresh = _line_sets(text, spans[len(head.spans):])
    return spans, [*head.lines, *fresh], _template_after(head, fresh), head


def _paragraphs(text: str) -> tuple[list[Span], _Head | None]:
    """:func:`paragraphs` of ``text``, and the remembered beginning they were taken from, if
    any (see :func:`_known_head`)."""
    known = _known_head(text)
    if known is None:
        return paragraphs(text), None
    head, at = known
    return [*head.spans, *_shifted(paragraphs(text[at:]), at)], head


def _known_head(text: str) -> tuple[_Head, int] | None:
    """A beginning of ``text`` that came before (the same worked examples or documents, a new
    question after them), and where it ends: only what follows it need be split. The result
    is the same as splitting the whole, as paragraphs are cut at blank lines and the text after
    a blank line does not change how the text before it is cut."""
    for at in _splits(text):
        head = _remembered_heads.known(text, at)
        if (head is not None and head.spans and head.spans[-1].end < at == head.spans[-1].sep
                and not _fenced(text, at)):
            return head, at
    return None


def _fenced(text: str, start: int = 0, end: int | None = None) -> bool:
    """Whether ``text[start:end]`` holds a code fence, which may span a blank line (a
    remembered beginning holds none)."""
    return text.find("```", start, end) >= 0 or text.find("~~~", start, end) >= 0


def _shifted(spans: list[Span], at: int) -> list[Span]:
    return [Span(s.start + at, s.end + at, s.sep + at, s.protected) for s in spans]


def _splits(text: str) -> list[int]:
    """Where the last :data:`_SPLITS` paragraphs of ``text`` may start: after a blank line and
    the blank space that follows it (a paragraph starts with a character that is not)."""
    found: list[int] = []
    end = len(text)
    while len(found) < _SPLITS:
        at = text.rfind("\n\n", 0, end)
        if at < 0:
            break
        start = at + 2
        while start < len(text) and text[start].isspace():
            start += 1
        if start < len(text) and start not in found:
            found.append(start)
        end = at
        while end > 0 and text[end - 1].isspace():
            end -= 1
    return found


def _template_after(head: _Head, fresh: list[frozenset[str]]) -> str | None:
    """The template line of a text that is ``head`` followed by paragraphs of line sets
    ``fresh``: the lines of those only gain, so the best of the beginning's, or one of
    theirs."""
    gained = ((line, n + head.counts.get(line, 0))
              for line, n in Counter(chain.from_iterable(fresh)).items())
    best = max(chain(head.ranked[:1], _candidates(gained)), default=None)
    return None if best is None else best[2]


def _block_examples(messages: list[Message], last: int) -> Examples | None:
    text: str = messages[last]["content"]
    spans, lines, line, head = _structure(text)
    if line is None:
        return None
    known = head.blocks(line) if head is not None else None
    if known is None:
        marked = [i for i, found in enumerate(lines) if line in found]
    else:  # the beginning's template paragraphs, then those of the rest
        assert head is not None
        marked = [*known.marked, *(i for i in range(len(head.spans), len(spans))
                                   if line in lines[i])]
    first = _first(text, spans, marked[0])
    last_example = len(marked) - 1  # the last template block is the question
    done = 0
    bounds: list[tuple[int, int]] = []
    texts: list[str] = []
    bags: list[AbstractSet[bytes]] | None = None
    pinned: set[int] = set()
    if known is not None and known.first == first:  # the beginning's examples, as before
        done = min(len(known.bounds), last_example)
        bounds += known.bounds[:done]
        texts += known.texts[:done]
        bags = list(known.bags[:done])
        pinned |= {i for i in known.pinned if i < done}
    more = _bounds(spans, marked, first, done, last_example, len(text))
    bounds += more
    texts += (text[a:b] for a, b in more)
    if bags is not None:
        bags += (_remembered_bag(text[a:b]) for a, b in more)
    pinned |= _pinned(spans, more, done)
    start = first if last_example == 0 else marked[-2] + 1
    question = text[spans[start].start:spans[marked[-1]].end]
    return Examples(question, tuple(texts), frozenset(pinned), message=last,
                    blocks=tuple(bounds), bags=None if bags is None else tuple(bags))


def _first(text: str, spans: Sequence[Span], first: int) -> int:
    """Where the first example starts: at its template paragraph's block, with the header
    paragraphs before it that the text repeats."""
    if first == 0:
        return 0
    repeated = Counter(s.piece(text) for s in spans)
    while first > 0 and repeated[spans[first - 1].piece(text)] > 1:
        first -= 1  # a repeated header paragraph belongs to the first example
    return first


def _bounds(spans: Sequence[Span], marked: Sequence[int], first: int, start: int, stop: int,
            end: int) -> list[tuple[int, int]]:
    """(start, next start) of examples ``start`` to ``stop - 1``: each from the paragraph
    after the previous template paragraph (the first, from ``first``) to the start of the one
    after its own (``end`` past the last paragraph)."""
    out = []
    for j in range(start, stop):
        a, b = (first if j == 0 else marked[j - 1] + 1), marked[j] + 1
        out.append((spans[a].start, spans[b].start if b < len(spans) else end))
    return out


def _pinned(spans: Sequence[Span], bounds: Sequence[tuple[int, int]], index: int) -> set[int]:
    """The examples among ``bounds`` (numbered from ``index``) that hold code or JSON."""
    code = [s.start for s in spans if s.protected]
    if not code:
        return set()
    return {index + i for i, (a, b) in enumerate(bounds) if any(a <= c < b for c in code)}


def keep_examples(messages: list[Message], examples: Examples,
                  scores: Sequence[float], keep: int) -> list[Message]:
    """``messages`` with only the ``keep`` best-scoring examples (and pinned ones) left, in
    their original order."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept = set(order[:keep]) | examples.pinned
    if len(kept) >= len(scores):
        return messages
    if examples.pairs:
        gone = {m for i, pair in enumerate(examples.pairs) if i not in kept for m in pair}
        return [m for i, m in enumerate(messages) if i not in gone]
    text: str = messages[examples.message]["content"]
    pieces, at = [], 0
    for i, (a, b) in enumerate(examples.blocks):
        pieces.append(text[at:a])
        if i in kept:
            pieces.append(text[a:b])
        at = b
    pieces.append(text[at:])
    out = list(messages)
    out[examples.message] = {**messages[examples.message], "content": "".join(pieces)}
    return out


# ---- context


def trim_context(messages: list[Message], max_tokens: int, count: Count,
                 within: Within | None = None) -> list[Message]:
    """The last user message cut to at most ``max_tokens`` tokens: its final paragraph (the
    question) and its code and JSON stay; of the rest, the paragraphs (sentences, for a
    paragraph longer than the budget) that share most words with the question, in their
    original order. ``within`` (else ``count``) decides whether the message fits: given one
    that stops counting past the limit, a long message costs a count of about the budget."""
    last = _last_user(messages)
    if last < 0 or not _editable(messages[last]):
        return messages
    text: str = messages[last]["content"]
    # a token holds at least one character: a short text needs no count
    within = within or _within(count)
    if len(text) <= max_tokens or within(text, max_tokens) <= max_tokens:
        return messages
    spans, head = _paragraphs(text)
    if len(spans) < 2:
        return messages
    *context, question = spans
    parts = [(u, p) for p in context for u in
             ([p] if p.protected or p.end - p.start <= max_tokens * _CHARS_PER_TOKEN
              else sentences(text, p))]
    units = [u for u, _ in parts]
    if head is None:
        bags = _remembered_bag.many([u.piece(text) for u in units])
    else:  # the word bags of the units a remembered beginning holds are kept with it
        bags = [head.bag(u.start, u.end) if u.end <= len(head.text)
                else _remembered_bag(u.piece(text)) for u in units]
    kept = set(_select(text, units, bags, question,
                       max_tokens - count(question.piece(text)), count, within))
    if len(kept) == len(units):
        return messages
    trimmed = _join(text, [(u, p) for u, p in parts if u in kept]) + text[question.start:]
    out = list(messages)
    out[last] = {**messages[last], "content": trimmed}
    return out


def _within(count: Count) -> Within:
    return lambda text, limit: count(text)


def _join(text: str, parts: list[tuple[Span, Span]]) -> str:
    """The kept units (each with its paragraph) with their separators: a paragraph's last
    kept unit is followed by the paragraph's own separator."""
    pieces: list[str] = []
    for i, (unit, para) in enumerate(parts):
        last = i + 1 == len(parts) or parts[i + 1][1] is not para
        pieces.append(text[unit.start:unit.end] + text[para.end:para.sep] if last
                      else text[unit.start:unit.sep])
    return "".join(pieces)


def _select(text: str, units: list[Span], bags: Sequence[AbstractSet[bytes]], question: Span,
            budget: int, count: Count, within: Within) -> list[Span]:
    """The protected units and, best first, the others that fit, until the budget is spent
    or several in a row did not fit (counting every unit of a long text costs more than the
    last few tokens of budget are worth). Whether a unit fits is all that is asked: one that
    certainly does not is not counted."""
    chosen = {i for i, u in enumerate(units) if u.protected}
    left = budget - sum(count(units[i].piece(text)) for i in chosen)
    scores = _cosines(question.piece(text), bags)
    misses = 0
    for i in sorted((i for i in range(len(units)) if i not in chosen),
                    key=lambda i: (-scores[i], i)):
        if left <= 0 or misses >= _MISSES:
            break
        piece = units[i].piece(text)
        size = left + 1 if len(piece) > left * _MAX_TOKEN_CHARS else within(piece, left)
        if size <= left:
            chosen.add(i)
            left, misses = left - size, 0
        else:
            misses += 1
    return [units[i] for i in sorted(chosen)]


# ---- history


def trim_history(messages: list[Message], max_tokens: int,
                 count: Callable[[list[Message]], int]) -> list[Message]:
    """``messages`` without their oldest turns (a user message and what followed it, tool
    calls and results together) until they fit ``max_tokens``; system prompts, and the last
    user message and what follows it, always stay."""
    last = _last_user(messages)
    turns: list[list[int]] = []
    for i in range(last if last >= 0 else 0):
        role = messages[i].get("role") if isinstance(messages[i], dict) else None
        if role in ("system", "developer"):
            continue
        if role == "user" or not turns:
            turns.append([])
        turns[-1].append(i)
    # A prompt's count is its priming plus each message's: the oldest turns go until the rest
    # fits, so the turns kept are the newest that fit beside what always stays. Counted from
    # the newest back, only they (and the first one that does not fit) are counted.
    empty = count([])
    in_turns = {i for turn in turns for i in turn}
    total = count([m for i, m in enumerate(messages) if i not in in_turns])
    keep = len(turns)
    while keep > 0:
        size = count([messages[i] for i in turns[keep - 1]]) - empty
        if total + size > max_tokens:
            break
        total += size
        keep -= 1
    if keep == 0 and total <= max_tokens:
        return messages
    gone = {i for turn in turns[:keep] for i in turn}
    return [m for i, m in enumerate(messages) if i not in gone]

