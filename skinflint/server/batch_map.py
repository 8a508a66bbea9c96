"""``POST /v1/skinflint/batch_map``: in-prompt batching, each packed call a real request through
the gateway's pipeline, so attribution, budgets, routing and the ledger apply to it. The
pipeline's account stage writes one ledger row per item (strategy ``batch_map``), each with
its share of its call's cost; items already answered are served from the response cache, each
one ledger row too (strategy ``exact_cache``, saving the item asked alone).

Request: ``{"model", "instruction", "items": [...], "max_items_per_call"?, "response_schema"?}``
with the pipeline's headers (key, ``x-skinflint-feature``, ...). Answer: ``{"results": [{"id",
"output", "status"}], "calls", "usage", "cost_usd"}``.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from skinflint.batchmap import CallAnswer, CallFailed, PackedCall, run_batch_map
from skinflint.errors import RequestError, SkinflintError, UpstreamError
from skinflint.gateway import Gateway
from skinflint.models import Usage
from skinflint.packing import Item, PackSpec, packed_body, parse_items, validator_for
from skinflint.pipeline.context import PackedItems

__all__ = ["FIELDS", "answer_batch_map"]

#: The fields a batch_map request may hold.
FIELDS = ("model", "instruction", "items", "max_items_per_call", "response_schema")
#: The most items one packed call may be asked to carry.
MAX_ITEMS_PER_CALL = 1000
#: Request headers not passed on to the packed calls: they describe the batch_map request's
#: own body, or would make a packed call anything but a real-time call.
_NOT_FORWARDED = frozenset({"content-length", "content-type", "x-skinflint-priority"})
#: Statuses of a packed call's failure that every call would meet (a refused key, a model
#: the gateway does not know): the batch_map request fails with it instead of each item.
_WHOLE_REQUEST = frozenset({401, 404})


def _field_error(message: str, code: str) -> RequestError:
    return RequestError(message, code=code)


def _request(raw: bytes) -> tuple[list[Item], PackSpec]:
    """The items and how to pack them; a 400 naming what is wrong."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"request body is not valid JSON: {exc.msg}",
                           code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object", code="invalid_json")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise _field_error(f"unknown field(s) {unknown}; a batch_map request holds "
                           f"{list(FIELDS)}", "unknown_field")
    model, instruction = body.get("model"), body.get("instruction")
    if not isinstance(model, str) or not model:
        raise _field_error("'model' is required and must be a string", "missing_model")
    if not isinstance(instruction, str) or not instruction.strip():
        raise _field_error("'instruction' is required and must be a non-empty string",
                           "invalid_instruction")
    cap = body.get("max_items_per_call")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool)
                            or not 1 <= cap <= MAX_ITEMS_PER_CALL):
        raise _field_error(f"'max_items_per_call' must be an integer from 1 to "
                           f"{MAX_ITEMS_PER_CALL}", "invalid_max_items_per_call")
    schema = body.get("response_schema")
    if schema is not None and not isinstance(schema, dict):
        raise _field_error("'response_schema' must be a JSON schema object",
                           "invalid_response_schema")
    validator_for(schema)  # raises on an invalid schema
    items = parse_items(body.get("items"))
    return items, PackSpec(model, instruction, schema, cap)


class _ThroughPipeline:
    """The runner's ``complete``: one packed call as one pipeline request."""

    def __init__(self, gateway: Gateway, headers: dict[str, str]) -> None:
        self._gateway = gateway
        self._headers = headers
        # a retry must ask anew, not be served the cached answer it is retrying
        refresh = headers.get("x-skinflint-cache", "").strip().lower() != "bypass"
        self._retry_headers = {**headers, "x-skinflint-cache": "refresh"} if refresh else headers

    async def __call__(self, call: PackedCall) -> CallAnswer:
        headers = self._retry_headers if call.attempt else self._headers
        ctx = self._gateway.context("chat", orjson.dumps(call.body), headers)
        ctx.packed = PackedItems(tuple(i.position for i in call.items), call.weights,
                                 call.solo_tokens, retry=call.attempt > 0)
        try:
            reply = await self._gateway.pipeline.handle(ctx)
        except UpstreamError as exc:  # another try may be answered
            raise CallFailed(exc.message) from None
        except SkinflintError as exc:
            if exc.status in _WHOLE_REQUEST:
                raise
            raise CallFailed(exc.message, retryable=False) from None
        body: dict[str, Any] = reply.body if reply.body is not None else {}
        return CallAnswer(body, ctx.costs.cost_usd, storable=not ctx.substituted)


async def answer_batch_map(gateway: Gateway, raw: bytes, headers: dict[str, str]) -> bytes:
    """The answer to a batch_map request (its body ``raw``), as JSON."""
    items, spec = _request(raw)
    sent = {k: v for k, v in headers.items() if k not in _NOT_FORWARDED}
    # the request as its first call would be: authenticated and attributed before any work
    probe = await gateway.attributed(orjson.dumps(packed_body(spec, items[:1])), sent)
    plan = gateway.cache.item_plan(probe) if gateway.cache.exact_enabled else None
    started = time.perf_counter()
    result = await run_batch_map(items, spec, _ThroughPipeline(gateway, sent),
                                 tokens=gateway.tokens, cache=plan)
    if result.cached and gateway.account is not None:
        gateway.account.record_cached_items(
            probe, [(c.position, Usage(input_tokens=c.prompt_tokens, output_tokens=c.output_tokens))
                    for c in result.cached], (time.perf_counter() - started) * 1000)
    return orjson.dumps(result.to_json())
