"""Prompt bloat: system prompts sent again and again, example turns repeated across calls, and
prompts far larger than their feature's usual one."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from skinflint.analytics.audit_figures import system_prompt
from skinflint.analytics.audit_input import Call
from skinflint.analytics.report import percentile
from skinflint.messages import content_text
from skinflint.tokens import TokenCounter

__all__ = ["OVERSIZED_FACTOR", "OVERSIZED_MIN_TOKENS", "Bloat", "compact", "find_bloat"]

#: A prompt is oversized above this many times its feature's median prompt...
OVERSIZED_FACTOR = 4
#: ...and above this many tokens.
OVERSIZED_MIN_TOKENS = 4000
_TOP = 10
_PREVIEW = 80


def compact(prompt: str) -> str:
    """What deduplication leaves of a system prompt without changing what it says: each line's
    runs of whitespace collapsed, blank lines and lines already said dropped."""
    kept: list[str] = []
    seen: set[str] = set()
    for line in prompt.splitlines():
        line = " ".join(line.split())
        if line and line not in seen:
            seen.add(line)
            kept.append(line)
    return "\n".join(kept)


@dataclass
class Bloat:
    figures: dict[str, Any]
    #: per call index: system prompt tokens that compaction removes
    trimmable: dict[int, int] = field(default_factory=dict)
    #: per call index: system prompt tokens
    system_tokens: dict[int, int] = field(default_factory=dict)


class _Tokens:
    def __init__(self, counter: TokenCounter) -> None:
        self._counter = counter
        self._memo: dict[tuple[str, str], int] = {}

    def __call__(self, model: str, text: str) -> int:
        key = (self._counter.encoding_for(model), text)
        found = self._memo.get(key)
        if found is None:
            found = self._memo[key] = self._counter.count_text(model, text)
        return found


def find_bloat(calls: Sequence[Call], counter: TokenCounter) -> Bloat:
    tokens = _Tokens(counter)
    input_total = sum(c.usage.input_tokens for c in calls if c.usage is not None) or 1
    bloat = Bloat({})
    prompts = _system_prompts(calls, tokens, bloat)
    bloat.figures = {
        "system_prompts": _summarise_prompts(prompts, input_total),
        "few_shot": _few_shot(calls, tokens, input_total),
        "oversized": _oversized(calls),
    }
    return bloat


@dataclass
class _Prompt:
    text: str
    calls: int = 0
    tokens: int = 0
    features: Counter[str] = field(default_factory=Counter)


def _system_prompts(calls: Sequence[Call], tokens: _Tokens, bloat: Bloat) -> dict[str, _Prompt]:
    prompts: dict[str, _Prompt] = {}
    compacted: dict[str, str] = {}
    for i, call in enumerate(calls):
        text = system_prompt(call)
        if not text:
            continue
        found = prompts.get(text)
        if found is None:
            found = prompts[text] = _Prompt(text)
            compacted[text] = compact(text)
        count = tokens(call.model, text)
        found.calls += 1
        found.tokens += count
        found.features[call.feature] += 1
        bloat.system_tokens[i] = count
        trimmed = count - tokens(call.model, compacted[text])
        if trimmed > 0:
            bloat.trimmable[i] = trimmed
    return prompts


def _summarise_prompts(prompts: dict[str, _Prompt], input_total: int) -> dict[str, Any]:
    repeated = sorted((p for p in prompts.values() if p.calls > 1),
                      key=lambda p: (-p.tokens, p.text))
    total = sum(p.tokens for p in repeated)
    return {
        "distinct": len(prompts),
        "repeated": len(repeated),
        "calls": sum(p.calls for p in repeated),
        "tokens": total,
        "share_of_input_tokens": total / input_total,
        "top": [
            {"preview": " ".join(p.text.split())[:_PREVIEW], "calls": p.calls,
             "tokens": p.tokens, "tokens_each": p.tokens // p.calls,
             "features": sorted(p.features)}
            for p in repeated[:_TOP]
        ],
    }


def _example_turns(call: Call) -> list[tuple[str, str]]:
    """The (user, assistant) pairs before the last user message."""
    assert call.body is not None
    turns = [m for m in call.body["messages"] if isinstance(m, dict)
             and m.get("role") in ("user", "assistant")]
    while turns and turns[-1].get("role") != "user":
        turns.pop()
    turns = turns[:-1]
    return [(content_text(a.get("content")), content_text(b.get("content")))
            for a, b in pairwise(turns)
            if a.get("role") == "user" and b.get("role") == "assistant"]


def _few_shot(calls: Sequence[Call], tokens: _Tokens, input_total: int) -> dict[str, Any]:
    """Example turns (a user message and its answer, before the question) sent in more than one
    call: few-shot examples, or a conversation's history sent again with each new turn."""
    seen: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, call in enumerate(calls):
        if call.body is not None:
            for pair in _example_turns(call):
                seen[pair].append(i)
    repeated = {pair: where for pair, where in seen.items() if len(where) > 1}
    total = sum(tokens(calls[where[0]].model, a + "\n" + b) * len(where)
                for (a, b), where in repeated.items())
    return {
        "examples": len(repeated),
        "calls": len({i for where in repeated.values() for i in where}),
        "tokens": total,
        "share_of_input_tokens": total / input_total,
    }


def _oversized(calls: Sequence[Call]) -> dict[str, Any]:
    sizes: dict[str, list[float]] = defaultdict(list)
    for call in calls:
        if call.usage is not None:
            sizes[call.feature].append(call.usage.input_tokens)
    medians = {f: percentile(v, 0.5) for f, v in sizes.items()}
    big = [c for c in calls if c.usage is not None and c.usage.input_tokens > max(
        OVERSIZED_FACTOR * medians[c.feature], OVERSIZED_MIN_TOKENS)]
    return {
        "rule": f"prompt above {OVERSIZED_FACTOR}x its feature's median and above"
                f" {OVERSIZED_MIN_TOKENS} tokens",
        "requests": len(big),
        "share": len(big) / len(calls) if calls else 0.0,
        "input_tokens": sum(c.usage.input_tokens for c in big if c.usage is not None),
        "cost_usd": round(sum(c.cost or 0.0 for c in big), 9),
    }
