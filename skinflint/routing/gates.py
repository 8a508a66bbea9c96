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

__all__ = [
    "REFUSAL",
    "Verdict",
    "answer_key",
    "choices_in_prompt",
    "content_of",
    "extract_choice",
    "extract_code",
    "mean_logprob",
    "structural_check",
]

JSON = dict[str, Any]

REFUSAL = re.compile(
    r"^\s*(i'?m sorry|i am sorry|i apologi[sz]e|i cannot|i can'?t|i am unable|i'?m unable|"
    r"as an ai\b|unfortunately,? i (cannot|can'?t|am unable))", re.IGNORECASE)
_ERROR = re.compile(r"^\s*(error:|an error occurred|internal server error)", re.IGNORECASE)


_LEAD = re.compile(r"^\s*([A-Za-z0-9])(?![A-Za-z0-9])")
_PRINTED = re.compile(r"single choice\s+from\s+((?:\"[^\"]+\"(?:\s+or\s+)?)+)", re.IGNORECASE)
_FENCED = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)
_TAGGED = re.compile(r"\[PYTHON\](.*?)(?:\[/PYTHON\]|$)", re.DOTALL)
_CODE_START = re.compile(r"^(?:def |import |from |class |@)", re.MULTILINE)


def extract_choice(text: str, choices: str) -> str | None:
    """The option an answer picks, read strictly: its first character, standing alone
    ("B", "B)", "B. because"), must be one of ``choices`` (e.g. "ABCD"). Anything else
    ("The answer is B", "Based on...") is no choice: a gate escalates it rather than guess."""
    lead = _LEAD.match(text)
    if lead is None:
        return None
    letter = lead.group(1).upper()
    return letter if letter in choices.upper() else None


def choices_in_prompt(prompt: str, default: str = "ABCD") -> str:
    """The options the prompt's last 'single choice from "A" or "B" ...' instruction allows."""
    found = _PRINTED.findall(prompt)
    if not found:
        return default
    return "".join(re.findall(r'"([^"]+)"', found[-1]))


def _parsable_prefix(code: str) -> str | None:
    """The longest prefix of whole lines that parses (answers often trail off into prose)."""
    lines = code.splitlines()
    for end in range(len(lines), 0, -1):
        candidate = "\n".join(lines[:end])
        try:
            ast.parse(candidate)
        except (SyntaxError, ValueError):
            continue
        return candidate if candidate.strip() else None
    return None


def extract_code(text: str) -> str | None:
    """The Python code in an answer: fenced blocks, else ``[PYTHON]`` blocks, else the text
    from the first line that starts like code; each cut to its longest parsable prefix."""
    blocks = _FENCED.findall(text) or _TAGGED.findall(text)
    if not blocks:
        start = _CODE_START.search(text)
        blocks = [text[start.start():]] if start else []
    parsed = [p for p in (_parsable_prefix(b) for b in blocks if b.strip()) if p]
    return "\n\n".join(p.strip("\n") for p in parsed) or None


def _defines_function(text: str) -> bool:
    code = extract_code(text)
    if not code:
        return False
    tree = ast.parse(code)
    return any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
               for n in tree.body)


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
    if fmt == "code" and not _defines_function(text):
        return Verdict(False, "format")
    if fmt in ("json", "json_schema") and not _json_ok(text, schema):
        return Verdict(False, "format")
    return Verdict(True)


def mean_logprob(body: JSON) -> float | None:
    """The mean token log-probability of the first choice, when the provider returned them."""
    choices = body.get("choices") or []
    logprobs = choices[0].get("logprobs") if choices else None
    tokens = logprobs.get("content") if isinstance(logprobs, dict) else None
    values = [t["logprob"] for t in tokens or () if isinstance(t, dict)
              and isinstance(t.get("logprob"), int | float)]
    return sum(values) / len(values) if values else None


def answer_key(text: str, *, fmt: str | None, choices: str = "ABCD") -> str:
    """What two answers must share to agree: the option picked, else the normalised text."""
    if fmt == "choice":
        return extract_choice(text, choices) or ""
    if fmt == "code":
        code = extract_code(text) or text
        return " ".join(code.split())
    return " ".join(text.lower().split())
