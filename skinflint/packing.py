"""In-prompt batching, the pure part: many small items answered by one chat call.

The packed request carries the instruction once (the system message) and the items as a JSON
array of ``{"id", "input"}`` objects in the last user message, and asks for a JSON object
``{"results": [{"id", "output"}]}`` (with ``response_format`` ``json_schema``, which the
Anthropic provider turns into an instruction of its own). Batches are cut by a token budget:
the items' input tokens and the output they are expected to need. An answer is checked item
by item: an id missing, given twice with different outputs, or an output that does not match
the optional ``response_schema`` is a problem of that item alone, retried by the runner
(:mod:`skinflint.batchmap`) first in a smaller batch, then alone.

Nothing here does I/O; everything is a function of its arguments.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema
import orjson
from referencing.exceptions import Unresolvable

from skinflint.cachekey import request_hash
from skinflint.errors import RequestError

__all__ = [
    "MAX_ITEMS",
    "Item",
    "PackSpec",
    "Parsed",
    "item_digest",
    "item_json",
    "packed_body",
    "parse_answer",
    "parse_items",
    "plan_batches",
    "retry_caps",
    "solo_messages",
    "validator_for",
]

JSON = dict[str, Any]

#: The most items one batch_map request may carry.
MAX_ITEMS = 100_000
#: Tokens a packed call's answer needs besides its items' outputs (braces, the results key).
ANSWER_OVERHEAD_TOKENS = 16
#: Tokens each result needs besides its output: ``{"id": "17", "output": ...},``.
RESULT_OVERHEAD_TOKENS = 12

_FORMAT = (
    "You are given a JSON array of items, each {\"id\", \"input\"}. Apply the instruction to "
    "each item's input on its own. Answer with only a JSON object "
    "{\"results\": [{\"id\": <the item's id>, \"output\": <the output for that item>}]} "
    "holding exactly one result per item, in the order given."
)


@dataclass(frozen=True, slots=True)
class Item:
    """One item: the id its result comes back under, its input (any JSON value) and its
    position in the request (results come back in that order)."""

    id: str
    input: Any
    position: int


@dataclass(frozen=True, slots=True)
class PackSpec:
    """How items are packed: the model, the instruction, the optional JSON schema each output
    must match, and the budgets a packed call stays within."""

    model: str
    instruction: str
    response_schema: JSON | None = None
    max_items_per_call: int | None = None
    max_input_tokens: int = 4000  # the items' tokens in one call
    output_tokens_per_item: int = 48  # expected; budgets the call's output
    max_output_tokens: int = 4000  # the most output tokens one call is expected to need
    structured: bool = True  # ask with response_format json_schema
    temperature: float | None = 0.0


@dataclass(frozen=True, slots=True)
class Parsed:
    """One packed answer, read: the output of each item answered well, and what was wrong
    with each of the others (by id)."""

    outputs: dict[str, Any]
    problems: dict[str, str]
    unknown: tuple[str, ...] = ()  # ids in the answer that were not asked


def parse_items(raw: Any) -> list[Item]:
    """The request's items: strings (their id is their index) or ``{"id", "input"}`` objects.
    Raises :class:`RequestError` naming the first item that is neither, or a repeated id."""
    if not isinstance(raw, list) or not raw:
        raise RequestError("'items' must be a non-empty array", code="invalid_items")
    if len(raw) > MAX_ITEMS:
        raise RequestError(f"'items' holds more than {MAX_ITEMS} items", code="too_many_items")
    items: list[Item] = []
    seen: set[str] = set()
    for i, value in enumerate(raw):
        item = _item(i, value)
        if item.id in seen:
            raise RequestError(f"items[{i}].id {item.id!r} is repeated", code="duplicate_id")
        seen.add(item.id)
        items.append(item)
    return items


def _item(i: int, value: Any) -> Item:
    if isinstance(value, str):
        return Item(str(i), value, i)
    if isinstance(value, dict) and set(value) <= {"id", "input"} and "input" in value:
        ident = value.get("id", str(i))
        if isinstance(ident, int) and not isinstance(ident, bool):
            ident = str(ident)
        if not isinstance(ident, str) or not ident:
            raise RequestError(f"items[{i}].id must be a non-empty string", code="invalid_items")
        return Item(ident, value["input"], i)
    raise RequestError(
        f'items[{i}] must be a string or an object {{"id", "input"}}', code="invalid_items")


def item_json(item: Item) -> str:
    """The item as the packed prompt shows it (what its input tokens are counted on)."""
    return json.dumps({"id": item.id, "input": item.input}, ensure_ascii=False,
                      separators=(",", ":"))


def solo_messages(spec: PackSpec, item: Item) -> list[JSON]:
    """The prompt that asks about ``item`` alone: what batching is measured against."""
    text = item.input if isinstance(item.input, str) else json.dumps(item.input,
                                                                     ensure_ascii=False)
    return [{"role": "system", "content": spec.instruction}, {"role": "user", "content": text}]


def item_digest(spec: PackSpec, item: Item) -> str:
    """What makes two items the same question: model, instruction, input and output schema
    (not the id, nor the batch it travels in)."""
    return request_hash("batch_map", {"model": spec.model, "instruction": spec.instruction,
                                      "input": item.input, "schema": spec.response_schema})


def _output_budget(spec: PackSpec, n: int) -> int:
    per_item = spec.output_tokens_per_item + RESULT_OVERHEAD_TOKENS
    return ANSWER_OVERHEAD_TOKENS + per_item * n


def plan_batches(items: Sequence[Item], weights: Sequence[int], spec: PackSpec,
                 cap: int | None = None) -> list[list[Item]]:
    """Cut ``items`` (in order) into batches: each as large as the input budget, the output
    budget, ``spec.max_items_per_call`` and ``cap`` allow, and at least one item. ``weights``
    are the items' input tokens."""
    limit = min(c for c in (spec.max_items_per_call, cap, len(items) or 1) if c is not None)
    per_item_out = spec.output_tokens_per_item + RESULT_OVERHEAD_TOKENS
    by_output = max(1, (spec.max_output_tokens - ANSWER_OVERHEAD_TOKENS) // per_item_out)
    limit = max(1, min(limit, by_output))
    batches: list[list[Item]] = []
    batch: list[Item] = []
    used = 0
    for item, weight in zip(items, weights, strict=True):
        if batch and (len(batch) >= limit or used + weight > spec.max_input_tokens):
            batches.append(batch)
            batch, used = [], 0
        batch.append(item)
        used += weight
    if batch:
        batches.append(batch)
    return batches


def retry_caps(first: int) -> list[int]:
    """The batch sizes an item failed in a batch of ``first`` is retried at: a quarter of
    that (when that is still more than one), then alone."""
    smaller = first // 4
    return [smaller, 1] if smaller > 1 else [1]


def _results_schema(spec: PackSpec) -> JSON:
    output: JSON = spec.response_schema if spec.response_schema is not None else {}
    result = {"type": "object", "properties": {"id": {"type": "string"}, "output": output},
              "required": ["id", "output"]}
    return {"type": "object", "required": ["results"],
            "properties": {"results": {"type": "array", "items": result}}}


def packed_body(spec: PackSpec, items: Sequence[Item]) -> JSON:
    """The chat completion request that asks for ``items`` at once."""
    system = f"{spec.instruction}\n\n{_FORMAT}"
    if spec.response_schema is not None:
        schema = json.dumps(spec.response_schema, ensure_ascii=False, sort_keys=True)
        system += f" Each output must match this JSON schema: {schema}"
    listed = "[" + ",\n".join(item_json(item) for item in items) + "]"  # one item a line
    body: JSON = {
        "model": spec.model,
        "messages": [{"role": "system", "content": system},
                     {"role": "user", "content": listed}],
        # twice the expected output: a long output should not cut the JSON of the others
        "max_tokens": 2 * _output_budget(spec, len(items)),
    }
    if spec.temperature is not None:
        body["temperature"] = spec.temperature
    if spec.structured:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "batch_results", "strict": False, "schema": _results_schema(spec)}}
    return body


def _answer_text(completion: JSON) -> str | None:
    choices = completion.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else None


def _strip_fence(text: str) -> str:
    text = text.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    return text.strip()


def _entries(completion: JSON) -> list[Any] | str:
    """The answer's result entries, or what is wrong with the whole answer."""
    text = _answer_text(completion)
    if text is None:
        return "the answer has no text"
    try:  # orjson: what it reads it can write back (no NaN, no integer past 64 bits)
        value = orjson.loads(_strip_fence(text))
    except orjson.JSONDecodeError:
        return "the answer is not valid JSON"
    if isinstance(value, dict):
        value = value.get("results")
    if not isinstance(value, list):
        return "the answer has no 'results' array"
    return value


def _checked(output: Any, validator: jsonschema.protocols.Validator | None) -> str | None:
    if validator is None:
        return None
    try:
        error = jsonschema.exceptions.best_match(validator.iter_errors(output))
    except Unresolvable as exc:  # a $ref only this output's branch of the schema reaches
        return f"response_schema cannot be checked: unresolvable $ref {exc.ref!r}"
    return None if error is None else f"output does not match response_schema: {error.message}"


def validator_for(schema: JSON | None) -> jsonschema.protocols.Validator | None:
    """A validator of outputs against ``schema``; raises RequestError when it is no schema."""
    if schema is None:
        return None
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise RequestError(f"'response_schema' is not a valid JSON schema: {exc.message}",
                           code="invalid_response_schema") from None
    validator = cls(schema)  # its references resolve within it: nothing is ever fetched
    try:
        validator.is_valid(None)
    except Unresolvable as exc:
        raise RequestError(f"'response_schema' has a $ref that does not resolve: {exc.ref!r}",
                           code="invalid_response_schema") from None
    return validator


def parse_answer(completion: JSON, items: Sequence[Item],
                 validator: jsonschema.protocols.Validator | None = None) -> Parsed:
    """Read a packed call's chat completion against the items it asked about."""
    asked = {item.id for item in items}
    entries = _entries(completion)
    if isinstance(entries, str):
        return Parsed({}, dict.fromkeys(sorted(asked), entries))
    outputs: dict[str, Any] = {}
    problems: dict[str, str] = {}
    unknown: list[str] = []
    for entry in entries:
        ident = entry.get("id") if isinstance(entry, dict) else None
        ident = str(ident) if isinstance(ident, int | str) and not isinstance(ident, bool) else None
        if ident is None or ident not in asked:
            unknown.append("" if ident is None else ident)
            continue
        assert isinstance(entry, dict)
        if "output" not in entry:
            problems[ident] = "the result has no 'output'"
            continue
        output = entry["output"]
        if ident in outputs and outputs[ident] != output:
            problems[ident] = "the answer gave this id twice, with different outputs"
            continue
        problem = _checked(output, validator)
        if problem is not None:
            problems[ident] = problem
            continue
        outputs[ident] = output
    for ident in asked:
        if ident not in outputs and ident not in problems:
            problems[ident] = "the answer has no result for this id"
    for ident in problems:
        outputs.pop(ident, None)
    return Parsed(outputs, problems, tuple(unknown))
