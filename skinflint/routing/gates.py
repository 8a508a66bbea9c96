"""Quality gates: cheap checks that decide whether a cascade tier's answer is good enough.

A gate never calls a model itself, except the optional judge, which the cascade stage runs.
Structural checks catch answers that are certainly bad (empty, refused, cut off, wrong format);
agreement and the learned scorer estimate whether a well-formed answer is right.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["REFUSAL", "answer_key", "extract_choice", "extract_code", "structural_check"]

JSON = dict[str, Any]

REFUSAL = re.compile(
    r"^\s*(i'?m sorry|i am sorry|i apologi[sz]e|i cannot|i can'?t|i am unable|i'?m unable|"
    r"as an ai\b|unfortunately,? i (cannot|can'?t|am unable))", re.IGNORECASE)
_ERROR = re.compile(r"^\s*(error:|an error occurred|internal server error)", re.IGNORECASE)
_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)


def extract_choice(text: str, choices: str) -> str | None:
    """The option an answer picks (``choices`` like ``"ABCD"`` or ``"12"``), or None.

    Reads, in order: a leading option ("B", "(B)", "B)", "B.", "Answer: B"), then an explicit
    "answer is B" anywhere; an answer naming no single option is None."""
    opts = re.escape(choices)
    text = text.strip()
    lead = re.match(rf"^(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)?\s*(?:is)?\s*[:\-]?\s*"
                    rf"[\(\[]?([{opts}])(?:[\)\]\.:,]|\s|$)", text, re.IGNORECASE)
    if lead and lead.group(1).upper() in choices.upper():
        return lead.group(1).upper()
    said = re.search(rf"answer\s+(?:is|would be|:)\s*[:\-]?\s*[\(\[]?([{opts}])\b", text,
                     re.IGNORECASE)
    return said.group(1).upper() if said else None


def extract_code(text: str) -> str | None:
    """The Python code in an answer: fenced blocks, else the text from the first ``def``."""
    blocks = _FENCE.findall(text)
    if blocks:
        return "\n".join(b for b in blocks if b.strip()) or None
    start = re.search(r"^(?:def |import |from |class )", text, re.MULTILINE)
    return text[start.start():] if start else None


def _code_parses(text: str) -> bool:
    code = extract_code(text)
    if not code:
        return False
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def _json_ok(text: str, schema: JSON | None) -> bool:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    if schema is None:
        return True
    import jsonschema

    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Verdict:
    passed: bool
    reason: str = ""


def content_of(body: JSON) -> str:
    choices = body.get("choices") or []
    if not choices:
        return ""
    message = choices[0].get("message") or {}
    content = message.get("content")
    return content if isinstance(content, str) else ""


def structural_check(body: JSON, *, fmt: str | None = None, choices: str = "ABCD",
                     schema: JSON | None = None) -> Verdict:
    """Certain failures: no answer, a refusal or error text, a cut-off answer, wrong format."""
    all_choices = body.get("choices") or []
    if not all_choices:
        return Verdict(False, "empty")
    first = all_choices[0]
    if first.get("finish_reason") == "length":
        return Verdict(False, "truncated")
    if first.get("finish_reason") == "content_filter":
        return Verdict(False, "filtered")
    text = content_of(body)
    if not text.strip():
        has_tools = bool((first.get("message") or {}).get("tool_calls"))
        return Verdict(True) if has_tools else Verdict(False, "empty")
    if REFUSAL.search(text) or _ERROR.search(text):
        return Verdict(False, "refusal")
    if fmt == "choice" and extract_choice(text, choices) is None:
        return Verdict(False, "format")
    if fmt == "code" and not _code_parses(text):
        return Verdict(False, "format")
    if fmt in ("json", "json_schema") and not _json_ok(text, schema):
        return Verdict(False, "format")
    return Verdict(True)


def answer_key(text: str, *, fmt: str | None, choices: str = "ABCD") -> str:
    """What two answers must share to agree: the option picked, else the normalised text."""
    if fmt == "choice":
        return extract_choice(text, choices) or ""
    if fmt == "code":
        code = extract_code(text) or text
        return " ".join(code.split())
    return " ".join(text.lower().split())
