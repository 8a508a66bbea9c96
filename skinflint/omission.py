"""What prompt trimming left out, found by comparing a prompt before and after
(:func:`skinflint.compression.trim_context`, :func:`~skinflint.compression.trim_history`), and
a summary of it put in its place. Pure functions over OpenAI chat messages: a message they
do not change is the same object in the result."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from skinflint.compression import Span, paragraphs

__all__ = [
    "Omitted",
    "context_omitted",
    "history_omitted",
    "with_context_summary",
    "with_history_summary",
]

Message = dict[str, Any]

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=\S)")  # as context trimming cuts a long paragraph


@dataclass(frozen=True, slots=True)
class Omitted:
    """What trimming left out of a prompt: ``text``, and where a summary of it goes in the
    trimmed prompt: before message ``index``, or (``offset`` >= 0) at that character of that
    message's content."""

    text: str
    index: int
    offset: int = -1


def _units(text: str) -> list[Span]:
    """The paragraphs of ``text`` cut into sentences as context trimming cuts them (a
    protected paragraph stays whole)."""
    units: list[Span] = []
    for para in paragraphs(text):
        if para.protected:
            units.append(para)
            continue
        start = para.start
        for m in _SENTENCE.finditer(text, para.start, para.end):
            units.append(Span(start, m.start(), m.end(), False))
            start = m.end()
        units.append(Span(start, para.end, para.sep, False))
    return units


def _last_user(messages: list[Message]) -> int:
    users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else -1


def context_omitted(before: list[Message], after: list[Message]) -> Omitted | None:
    """The paragraphs and sentences :func:`trim_context` left out of the last user message
    (``before`` its input, ``after`` its result), placed where the first of them was."""
    last = _last_user(before)
    if last < 0 or len(before) != len(after) or before[last] is after[last]:
        return None
    old, new = before[last]["content"], after[last]["content"]
    a, b = _units(old), _units(new)
    matcher = difflib.SequenceMatcher(
        None, [u.piece(old).strip() for u in a], [u.piece(new).strip() for u in b],
        autojunk=False)
    runs = [(i1, i2, j1) for op, i1, i2, j1, _ in matcher.get_opcodes()
            if op in ("delete", "replace")]
    if not runs:
        return None
    gone = "\n\n".join(old[a[i1].start:a[i2 - 1].end] for i1, i2, _ in runs)
    j = runs[0][2]
    return Omitted(gone, last, b[j].start if j < len(b) else len(new))


def with_context_summary(messages: list[Message], omitted: Omitted,
                         summary: str) -> list[Message]:
    """``messages`` (trimmed) with ``[Summary of omitted text: ...]`` where ``omitted`` says."""
    text: str = messages[omitted.index]["content"]
    at = omitted.offset
    marked = f"[Summary of omitted text: {summary.strip()}]"
    text = f"{text[:at]}{marked}\n\n{text[at:]}" if at < len(text) else f"{text}\n\n{marked}"
    out = list(messages)
    out[omitted.index] = {**messages[omitted.index], "content": text}
    return out


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, list):
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    text = content if isinstance(content, str) else ""
    calls = [str((c.get("function") or {}).get("name", "")) for c in message.get("tool_calls") or []
             if isinstance(c, dict)]
    if calls:
        text = f"{text} (called {', '.join(calls)})".strip()
    return f"{message.get('role', 'user')}: {text}"


def history_omitted(before: list[Message], after: list[Message]) -> Omitted | None:
    """The turns :func:`trim_history` dropped (``before`` its input, ``after`` its result),
    as ``role: text`` lines, placed where the first of them was."""
    kept = {id(m) for m in after}
    gone = [i for i, m in enumerate(before) if id(m) not in kept]
    if not gone:
        return None
    return Omitted("\n".join(_message_text(before[i]) for i in gone), gone[0])


def with_history_summary(messages: list[Message], omitted: Omitted,
                         summary: str) -> list[Message]:
    """``messages`` (trimmed) with one system message summarising the dropped turns where
    the first of them was."""
    note = {"role": "system",
            "content": f"[Summary of earlier conversation: {summary.strip()}]"}
    return [*messages[:omitted.index], note, *messages[omitted.index:]]
