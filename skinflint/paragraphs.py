"""Prompt text cut into paragraphs (at blank lines; a fenced code block, or a paragraph that is a
JSON document, is one protected paragraph) and sentences, as positions in the text."""

from __future__ import annotations

import re
from itertools import accumulate, repeat
from typing import NamedTuple

import orjson

__all__ = ["Span", "paragraphs", "protected", "sentences"]

_FENCE = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n.*?^[ \t]*\1[ \t]*$", re.M | re.S)
_BLANK = re.compile(r"\n[ \t]*\n\s*")
_BLANK_SPLIT = re.compile(r"(\n[ \t]*\n\s*)")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=\S)")


class Span(NamedTuple):
    """``text[start:end]`` is a paragraph (or sentence); ``sep`` ends where the next begins.
    (A named tuple: a long prompt has hundreds, and a tuple is several times faster to make
    than a frozen dataclass.)"""

    start: int
    end: int
    sep: int
    protected: bool  # code or JSON: kept whole, never dropped

    def piece(self, text: str) -> str:
        return text[self.start:self.end]


_SPAN = tuple.__new__  # Span from a 4-tuple, without the Python-level __new__


def protected(piece: str) -> bool:
    """Whether ``piece`` holds fenced code or is a JSON document (kept whole, never cut)."""
    if "```" in piece or "~~~" in piece:
        return True
    first = piece[:1]
    if first not in ("{", "[") and not first.isspace():
        return False  # what the check below finds without copying the piece
    stripped = piece.strip()
    if stripped[:1] in ("{", "[") and stripped[-1:] in ("}", "]"):
        try:
            orjson.loads(stripped)
        except orjson.JSONDecodeError:
            return False
        return True
    return False


def paragraphs(text: str) -> list[Span]:
    """The paragraphs of ``text``; a fenced code block is one protected paragraph."""
    if "```" in text or "~~~" in text:
        return _fenced_paragraphs(text)
    # one split, the bounds summed in C: piece i is parts[2i], separator i parts[2i + 1]
    parts = _BLANK_SPLIT.split(text)
    bounds = [0, *accumulate(map(len, parts))]
    starts, ends, nexts = bounds[0::2], bounds[1::2], bounds[2::2]
    nexts.append(len(text))
    # without a fence only JSON is protected, and only a paragraph that starts with a bracket
    # (or, the first, with a space) can be JSON
    heads = [piece[:1] for piece in parts[0::2]]
    marks = [False] * len(starts)
    if "{" in heads or "[" in heads or text[:1].isspace():
        marks = [(h in ("{", "[") or h.isspace()) and protected(text[a:b])
                 for h, a, b in zip(heads, starts, ends, strict=True)]
    spans = list(map(_SPAN, repeat(Span), zip(starts, ends, nexts, marks, strict=True)))
    if spans and spans[-1].start >= len(text):
        del spans[-1]  # a separator at the end
    if spans and spans[0].end <= spans[0].start:
        del spans[0]  # a separator at the start
    return spans


def _fenced_paragraphs(text: str) -> list[Span]:
    fences = [m.span() for m in _FENCE.finditer(text)]
    spans: list[Span] = []
    start = 0
    for m in _BLANK.finditer(text):
        if fences and any(a < m.start() < b for a, b in fences):
            continue
        end = m.start()
        if end > start:
            spans.append(Span(start, end, m.end(), protected(text[start:end])))
        start = m.end()
    if start < len(text):
        spans.append(Span(start, len(text), len(text), protected(text[start:])))
    return spans


def sentences(text: str, para: Span) -> list[Span]:
    """``para`` cut into sentences (a protected paragraph stays whole)."""
    if para.protected:
        return [para]
    out: list[Span] = []
    start = para.start
    for m in _SENTENCE.finditer(text, para.start, para.end):
        out.append(Span(start, m.start(), m.end(), False))
        start = m.end()
    out.append(Span(start, para.end, para.sep, False))
    return out
