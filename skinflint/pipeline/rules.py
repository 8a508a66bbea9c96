"""Stage 3, rules: deterministic answers that need no LLM.

The configured rules are tried in order on a chat request's last user message; the first that
matches answers it, and nothing is sent upstream. A ``match`` rule searches a regex, a
``keywords`` rule any of its words (case-insensitive, whole words); either answers with its
``answer`` filled from the match (see :mod:`skinflint.answers`). A ``table`` rule looks the
message up in a file of exact questions, loaded once at start:

- JSON: an object ``{"question": "answer", ...}``;
- CSV: a header row with ``question`` and ``answer`` columns (others are ignored).

Questions and messages are compared after normalisation (:func:`normalise`): surrounding
whitespace dropped, every run of whitespace made one space, case folded.

A rule with ``features`` or ``models`` applies only to requests of one of those features or
asking for one of those models (the name the client sent). The answer is a
``chat.completion`` (or its stream) naming the model asked for, with usage counted offline;
the account stage prices it at zero and ledgers it with strategy ``rule`` and, as saving, what
the baseline model would have cost for the same tokens.
"""

from __future__ import annotations

import asyncio
import csv
import re
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from skinflint.answers import AnswerRule, Template
from skinflint.errors import ConfigError
from skinflint.messages import last_user_text
from skinflint.metrics import Metrics
from skinflint.models import StreamChunk, Usage
from skinflint.pipeline.context import Next, Reply, RequestContext, RuleAnswer
from skinflint.streaming import chunks_from_completion
from skinflint.tokens import TokenCounter

__all__ = ["Rules", "load_table", "normalise"]


def normalise(text: str) -> str:
    """A question as tables compare it: whitespace runs made one space, ends trimmed, case
    folded."""
    return " ".join(text.split()).casefold()


def load_table(path: str) -> dict[str, str]:
    """The questions and answers of a ``.json`` or ``.csv`` file, keyed by the normalised
    question. Raises ValueError (or OSError) saying what is wrong."""
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        pairs = _json_pairs(Path(path).read_bytes())
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            pairs = _csv_pairs(csv.DictReader(f))
    else:
        raise ValueError("a table is a .json or .csv file")
    table: dict[str, str] = {}
    for question, answer in pairs:
        key = normalise(question)
        if not key:
            raise ValueError("a question is empty")
        if key in table:
            raise ValueError(f"the question {key!r} is given twice")
        table[key] = answer
    return table


def _json_pairs(data: bytes) -> list[tuple[str, str]]:
    try:
        found = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(found, dict) or not all(isinstance(v, str) for v in found.values()):
        raise ValueError('a JSON table is an object of texts: {"question": "answer", ...}')
    return list(found.items())


def _csv_pairs(reader: csv.DictReader[str]) -> list[tuple[str, str]]:
    if not {"question", "answer"} <= set(reader.fieldnames or ()):
        raise ValueError("a CSV table needs a header row with question and answer columns")
    pairs = []
    for row in reader:
        question, answer = row.get("question"), row.get("answer")
        if question is None or answer is None:
            raise ValueError(f"line {reader.line_num}: missing the question or the answer")
        pairs.append((question, answer))
    return pairs


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    pattern: re.Pattern[str] | None
    template: Template | None
    table: Mapping[str, str] | None
    features: frozenset[str]
    models: frozenset[str]

    def applies(self, feature: str, model: str) -> bool:
        return ((not self.features or feature in self.features)
                and (not self.models or model in self.models))

    def answer(self, text: str, key: str) -> str | None:
        """The answer to the message ``text`` (``key``: its normalised form), if it matches."""
        if self.table is not None:
            return self.table.get(key)
        assert self.pattern is not None and self.template is not None
        found = self.pattern.search(text)
        return None if found is None else self.template.fill(found)


def _compile(i: int, rule: AnswerRule) -> _Rule:
    table = None
    if rule.table is not None:
        try:
            table = load_table(rule.table)
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ConfigError(f"config: rules[{i}].table: {rule.table}: {why}") from None
    return _Rule(rule.name, rule.pattern(), rule.template(), table,
                 frozenset(rule.features), frozenset(rule.models))


class Rules:
    name = "rules"

    def __init__(self, rules: Sequence[AnswerRule], tokens: TokenCounter,
                 metrics: Metrics) -> None:
        """Compile ``rules`` and load their tables (raises ConfigError naming the rule's key).
        With no rules the stage is skipped."""
        self._rules = tuple(_compile(i, r) for i, r in enumerate(rules))
        self._tokens = tokens
        self._metrics = metrics
        self._features = frozenset(f for r in self._rules for f in r.features)
        self._models = frozenset(m for r in self._rules for m in r.models)
        self._applying: dict[tuple[str, str], tuple[_Rule, ...]] = {}
        self.enabled = bool(self._rules)

    def applying(self, feature: str, model: str) -> tuple[_Rule, ...]:
        """The rules, in order, that apply to ``feature`` and ``model``."""
        # Memoised by configured names only: feature and model come from the client.
        feature = feature if feature in self._features else ""
        model = model if model in self._models else ""
        found = self._applying.get((feature, model))
        if found is None:
            found = tuple(r for r in self._rules if r.applies(feature, model))
            self._applying[feature, model] = found
        return found

    def find(self, ctx: RequestContext) -> tuple[str, str] | None:
        """The first rule that answers ``ctx``, and its answer. A request that must be answered
        by a tool call is never answered by a rule, and one that asks for JSON
        (``response_format``) only by an answer that is JSON."""
        if ctx.endpoint != "chat":
            return None
        rules = self.applying(ctx.feature, ctx.requested_model)
        if not rules:
            return None
        body = ctx.body
        text = last_user_text(body.get("messages"))
        if not text or _needs_tool_call(body):
            return None
        wants_json = _wants_json(body)
        key = normalise(text) if any(r.table is not None for r in rules) else ""
        for rule in rules:
            answer = rule.answer(text, key)
            if answer is not None and (not wants_json or _is_json(answer)):
                return rule.name, answer
        return None

    async def __call__(self, ctx: RequestContext, next: Next) -> Reply:
        found = self.find(ctx)
        if found is None:
            return await next(ctx)
        name, text = found
        ctx.rule = RuleAnswer(name)
        self._metrics.child(self._metrics.rule_answers, name).inc()
        return await self._reply(ctx, text)

    async def _reply(self, ctx: RequestContext, text: str) -> Reply:
        model = ctx.model = ctx.requested_model
        body = _completion(ctx, text)
        if not self._tokens.ready(model):  # the tokenizer loads once, off the event loop
            await asyncio.to_thread(self._tokens.prepare, model)
        messages = ctx.body.get("messages") or []
        ctx.usage = usage = Usage(input_tokens=self._tokens.count_messages(model, messages),
                                  output_tokens=self._tokens.count_completion(model, body),
                                  counted=True)
        body["usage"] = {"prompt_tokens": usage.input_tokens,
                         "completion_tokens": usage.output_tokens,
                         "total_tokens": usage.input_tokens + usage.output_tokens}
        if ctx.stream:
            chunks = chunks_from_completion(body, include_usage=ctx.client_wants_usage)
            return Reply(chunks=_replay(chunks))
        return Reply(body=body)


def _needs_tool_call(body: Mapping[str, Any]) -> bool:
    choice = body.get("tool_choice")
    return bool(body.get("tools")) and (choice == "required" or isinstance(choice, dict))


def _wants_json(body: Mapping[str, Any]) -> bool:
    wanted = body.get("response_format")
    return isinstance(wanted, dict) and wanted.get("type") in ("json_object", "json_schema")


def _is_json(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


def _completion(ctx: RequestContext, text: str) -> dict[str, Any]:
    """The answer, as many times as the request asked for choices (``n``)."""
    n = ctx.body.get("n")
    count = n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 128 else 1
    return {
        "id": f"chatcmpl-{ctx.request_id}",
        "object": "chat.completion",
        "created": int(ctx.ts),
        "model": ctx.requested_model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": "stop"} for i in range(count)],
    }


async def _replay(chunks: Iterable[dict[str, Any]]) -> AsyncIterator[StreamChunk]:
    for chunk in chunks:
        yield StreamChunk(chunk)
