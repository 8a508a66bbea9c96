"""The OpenAPI document of the gateway's routes, served at ``GET /openapi.json``.

Written out here rather than derived from the code because the server routes by a dict, not a
framework that could describe itself; a test checks that every route is in it. The request
limits are the attribute stage's, so the document says what the gateway really refuses.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson

from skinflint import __version__
from skinflint.packing import MAX_ITEMS
from skinflint.pipeline.attribute import (
    MAX_MESSAGES,
    MAX_MODEL_NAME,
    MAX_N,
    MAX_OUTPUT_TOKENS,
    ROLES,
)
from skinflint.server.batch_map import MAX_ITEMS_PER_CALL
from skinflint.server.dashboard import STATIC
from skinflint.server.openapi_batches import PRIORITY_PARAMETER, batch_paths, batch_schemas
from skinflint.server.spend_api import MAX_LIMIT
from skinflint.storage.rollup import BUCKETS, DIMENSIONS, FIGURES, RECENT_COLUMNS
from skinflint.storage.spend import OTHER, SERIES_TOP

__all__ = ["openapi_document", "openapi_json"]

JSON = dict[str, Any]


def _ref(name: str) -> JSON:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: JSON) -> JSON:
    return {"application/json": {"schema": schema}}


_ERRORS: JSON = {
    status: {"description": text, "content": _json(_ref("Error"))}
    for status, text in [
        ("400", "the request is malformed or outside a limit; the message says which"),
        ("401", "the gateway or admin key is missing or wrong"),
        ("404", "unknown model or route; the message lists the valid names"),
        ("413", "the request body is too large"),
        ("429", "rate limited (by the upstream); Retry-After says when to try again"),
        ("502", "the upstream failed or sent something unreadable"),
        ("503", "the provider keeps failing and is skipped for a while (its circuit is open);"
                " Retry-After says when it is tried again"),
        ("504", "the upstream timed out"),
    ]
}

_TOKENS: JSON = {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_OUTPUT_TOKENS}
_TIME: JSON = {"type": "string", "format": "date-time", "description": "UTC, ending in Z"}
_TEXT = {"name", "request_id", "tenant", "feature", "user", "model", "route", "cache_status",
         "strategy"}


def _figures(*names: str) -> JSON:
    """An object of these required fields: times, names, or numbers (a cost may be null)."""
    types = {n: _TIME if n in ("start", "ts") else {"type": "string"} if n in _TEXT
             else {"type": ["number", "null"]} for n in names}
    return {"type": "object", "required": list(names), "properties": types}


def _query(name: str, schema: JSON, description: str) -> JSON:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


_SPEND_QUERY = [
    _query("by", {"enum": list(DIMENSIONS), "default": "feature"}, "what to group by"),
    _query("since", {"type": "string", "pattern": "^[1-9][0-9]{0,5}[mhd]$", "default": "7d"},
           "how far back, e.g. 30m, 12h, 7d"),
    _query("bucket", {"enum": list(BUCKETS)}, "series bucket (UTC); default hour up to 2d, "
           "else day. since is taken back to the start of its bucket"),
]

_SCHEMAS: JSON = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "code": {"type": ["string", "null"]},
                    "param": {"type": ["string", "null"]},
                },
            }
        },
    },
    "Model": {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_MODEL_NAME,
        "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]+$",
        "description": "a model, an alias or a route (printable characters only)",
    },
    "Message": {
        "type": "object",
        "required": ["role"],
        "properties": {"role": {"enum": sorted(ROLES)}},
    },
    "ChatCompletionRequest": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": _ref("Model"),
            "messages": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_MESSAGES,
                "items": _ref("Message"),
            },
            "n": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_N},
            "max_tokens": _TOKENS,
            "max_completion_tokens": _TOKENS,
            "stream": {"description": "only JSON true streams"},
            "stream_options": {"description": "include_usage: true adds a usage chunk"},
            "user": {"description": "end user, when a string (x-skinflint-user wins)"},
            "metadata": {"description": "metadata.feature names the feature, when an object"},
        },
        "description": "OpenAI's chat completion request; other fields are passed through. "
        "JSON nesting is limited to 128 levels.",
    },
    "EmbeddingRequest": {
        "type": "object",
        "required": ["model", "input"],
        "properties": {"model": _ref("Model"), "input": {}},
    },
    "BatchMapRequest": {
        "type": "object",
        "required": ["model", "instruction", "items"],
        "additionalProperties": False,
        "properties": {
            "model": _ref("Model"),
            "instruction": {"type": "string", "minLength": 1,
                            "description": "applied to each item; sent once per call"},
            "items": {"type": "array", "minItems": 1, "maxItems": MAX_ITEMS, "items": {
                "oneOf": [{"type": "string", "description": "its id is its index"},
                          {"type": "object", "required": ["input"],
                           "additionalProperties": False,
                           "properties": {"id": {"type": ["string", "integer"]},
                                          "input": {}}}]},
                      "description": "ids must be unique"},
            "max_items_per_call": {"type": ["integer", "null"], "minimum": 1,
                                   "maximum": MAX_ITEMS_PER_CALL,
                                   "description": "default: as many as the token budget"},
            "response_schema": {"type": ["object", "null"],
                                "description": "a JSON schema each output must match"},
        },
    },
    "BatchMapResponse": {
        "type": "object",
        "required": ["results", "calls", "usage", "cost_usd"],
        "properties": {
            "results": {"type": "array", "description": "one per item, in input order",
                        "items": {"type": "object", "required": ["id", "output", "status"],
                                  "properties": {
                                      "id": {"type": "string"}, "output": {},
                                      "status": {"enum": ["ok", "retried", "error"]},
                                      "error": {"type": "string",
                                                "description": "with status error"}}}},
            "calls": {"type": "integer", "minimum": 0, "description": "packed calls made"},
            "usage": {"type": "object", "properties": {
                k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens",
                                                 "total_tokens")}},
            "cost_usd": {"type": ["number", "null"], "description": "null: a price is unknown"},
        },
    },
    "Object": {"type": "object", "description": "OpenAI's response, relayed"},
    "Health": {
        "type": "object",
        "properties": {"status": {"const": "ok"}, "ready": {"type": "boolean"}},
    },
    "Budget": {
        "type": "object",
        "properties": {
            **{k: {"type": "string"} for k in ("name", "per", "subject", "window", "action")},
            **{k: {"type": "string", "format": "date-time"} for k in ("window_start",
                                                                       "window_end")},
            "used": {"type": "number", "description": "(spent + reserved) / limit, the most"},
            **{k: {"type": "object"} for k in ("limit", "spent", "reserved", "remaining")},
        },
    },
    "Alert": {
        "type": "object",
        "required": ["rule", "per", "name", "state", "start", "end", "spend_usd",
                     "baseline_usd"],
        "properties": {
            "rule": {"type": "string"},
            "per": {"enum": ["global", "tenant", "feature", "model", "user"]},
            "name": {"type": "string", "description": "the scope's value; empty for global"},
            "state": {"enum": ["firing", "resolved"]},
            "start": {"type": "string", "format": "date-time", "description": "when it fired"},
            "end": {"type": ["string", "null"], "format": "date-time",
                    "description": "when it resolved; null while it fires"},
            "spend_usd": {"type": "number", "description": "spend of the window it fired on"},
            "baseline_usd": {"type": "number", "description": "that window's baseline"},
        },
    },
    "Alerts": {
        "type": "object",
        "required": ["data", "active"],
        "properties": {
            "data": {"type": "array", "items": _ref("Alert"), "description": "newest first"},
            "active": {"type": "integer", "minimum": 0, "description": "alerts firing"},
        },
    },
    "Spend": {
        "type": "object",
        "required": ["by", "bucket", "since", "until", "totals", "groups", "series"],
        "properties": {
            "by": {"enum": list(DIMENSIONS)},
            "bucket": {"enum": list(BUCKETS)},
            "since": _TIME,
            "until": _TIME,
            "totals": {"type": "object", "required": list(FIGURES),
                       "properties": {f: {"type": "number"} for f in FIGURES}},
            "groups": {"type": "array", "description": "by cost, highest first",
                       "items": _figures("name", "requests", "cost_usd", "saved_usd",
                                         "cache_hits")},
            "series": {"type": "array", "description": f"by start, then name; the "
                       f"{SERIES_TOP} costliest groups by name, the others summed as {OTHER}",
                       "items": _figures("start", "name", "requests", "cost_usd",
                                         "saved_usd")},
        },
        "description": "requests counts client requests: cascade and retried attempts are "
        "not requests, their cost counts. The strategy of a plain call is named none.",
    },
    "RecentRequests": {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "array", "description": "newest first",
                                "items": _figures(*RECENT_COLUMNS)}},
    },
    "InvalidateRequest": {
        "type": "object",
        "required": ["tags"],
        "properties": {"tags": {"type": "array", "items": {"type": "string"}}},
    },
    "ShadowScores": {
        "type": "object",
        "required": ["data", "dropped"],
        "properties": {
            "data": {"type": "array", "items": {
                "type": "object",
                "required": ["feature", "strategy", "samples", "mean", "bound", "floor",
                             "state"],
                "properties": {
                    "feature": {"type": "string"}, "strategy": {"type": "string"},
                    "samples": {"type": "integer"}, "mean": {"type": "number"},
                    "bound": {"type": "number", "description": (
                        "the sequential test's evidence that the mean score is below the "
                        "floor: its betting wealth, 1 at the start; off at 100")},
                    "floor": {"type": ["number", "null"]},
                    "state": {"enum": ["on", "off"]},
                }}},
            "dropped": {"type": "integer"},
        },
    },
    "ShadowSwitch": {
        "type": "object",
        "required": ["feature", "strategy"],
        "properties": {"feature": {"type": "string"}, "strategy": {"type": "string"}},
    },
}

_GATEWAY_KEY: list[JSON] = [{"gatewayKey": []}]
_ADMIN_KEY: list[JSON] = [{"adminKey": []}]


def _pipeline_op(summary: str, request: str, *, deferrable: bool = False) -> JSON:
    return {
        "summary": summary,
        "security": _GATEWAY_KEY,
        "parameters": [
            {"name": h, "in": "header", "required": False, "schema": {"type": "string"}}
            for h in (
                "x-skinflint-feature",
                "x-skinflint-user",
                "x-skinflint-tags",
                "x-skinflint-cache",
                "x-skinflint-task",
            )
        ] + ([PRIORITY_PARAMETER] if deferrable else []),
        "requestBody": {"required": True, "content": _json(_ref(request))},
        "responses": {
            "200": {
                "description": "the answer (server-sent events when streaming)",
                "content": {**_json(_ref("Object")), "text/event-stream": {}},
            },
            **({"202": {"description": "deferred: the job to poll",
                        "content": _json(_ref("Job"))}} if deferrable else {}),
            **_ERRORS,
        },
    }


def _get_op(summary: str, content: JSON, security: list[JSON] | None) -> JSON:
    op: JSON = {"summary": summary, "responses": {"200": {"description": summary,
                                                         "content": content}, **_ERRORS}}
    if security is not None:
        op["security"] = security
    return op


def _paths() -> JSON:
    chat = {"post": _pipeline_op("Create a chat completion", "ChatCompletionRequest",
                                 deferrable=True)}
    embed = {"post": _pipeline_op("Create embeddings", "EmbeddingRequest")}
    models = {"get": _get_op("List models, aliases and routes", _json(_ref("Object")),
                             _GATEWAY_KEY)}
    invalidate = _get_op("Drop cache entries by tag", _json(_ref("Object")), _ADMIN_KEY)
    invalidate["requestBody"] = {"required": True, "content": _json(_ref("InvalidateRequest"))}
    enable = _get_op("Switch a strategy the shadow guard switched off back on for a feature",
                     _json(_ref("Object")), _ADMIN_KEY)
    enable["requestBody"] = {"required": True, "content": _json(_ref("ShadowSwitch"))}
    batch = _pipeline_op("Apply one instruction to many items, packed into few calls",
                         "BatchMapRequest")
    batch["responses"] = {"200": {"description": "one result per item, in input order",
                                  "content": _json(_ref("BatchMapResponse"))}, **_ERRORS}
    return {
        "/v1/chat/completions": chat,
        "/v1/skinflint/batch_map": {"post": batch},
        "/chat/completions": chat,
        "/v1/embeddings": embed,
        "/embeddings": embed,
        "/v1/models": models,
        "/models": models,
        "/dashboard": {"get": _get_op("The dashboard page (its data needs the admin key)",
                                      {"text/html": {}}, [])},
        **{f"/dashboard/static/{name}": {"get": _get_op(
            "A file of the dashboard page", {kind.decode().partition(";")[0]: {}}, [])}
           for name, kind in STATIC.items()},
        "/health": {"get": _get_op("Liveness and readiness", _json(_ref("Health")), [])},
        "/metrics": {"get": _get_op("Prometheus metrics", {"text/plain": {}}, _ADMIN_KEY)},
        "/openapi.json": {"get": _get_op("This document", _json({"type": "object"}), [])},
        "/api/cache/invalidate": {"post": invalidate},
        "/api/spend": {"get": {**_get_op(
            "Spend, requests, savings and cache hits by group and over time",
            _json(_ref("Spend")), _ADMIN_KEY), "parameters": _SPEND_QUERY}},
        "/api/requests": {"get": {**_get_op(
            "The newest ledger rows", _json(_ref("RecentRequests")), _ADMIN_KEY),
            "parameters": [_query("limit", {"type": "integer", "minimum": 1,
                                            "maximum": MAX_LIMIT, "default": 50},
                                  "how many rows")]}},
        "/api/budgets": {"get": _get_op(
            "Each budget's window, limit, spent, reserved and remaining",
            _json({"type": "array", "items": _ref("Budget")}), _ADMIN_KEY)},
        "/api/alerts": {"get": _get_op(
            "The newest cost alerts, firing or resolved", _json(_ref("Alerts")), _ADMIN_KEY)},
        "/api/shadow": {"get": _get_op(
            "The shadow guard's score per feature and strategy, and whether it is on",
            _json(_ref("ShadowScores")), _ADMIN_KEY)},
        "/api/shadow/enable": {"post": enable},
        **batch_paths(_ERRORS),
    }


def openapi_document() -> JSON:
    """The document as a dict (a fresh copy each call)."""
    return orjson.loads(openapi_json())  # type: ignore[no-any-return]


@functools.cache
def openapi_json() -> bytes:
    """The document, serialised once."""
    return orjson.dumps(
        {
            "openapi": "3.1.0",
            "info": {
                "title": "skinflint",
                "version": __version__,
                "description": "An OpenAI-compatible gateway that cuts the bill.",
            },
            "paths": _paths(),
            "components": {
                "schemas": {**_SCHEMAS, **batch_schemas()},
                "securitySchemes": {
                    "gatewayKey": {"type": "http", "scheme": "bearer"},
                    "adminKey": {"type": "http", "scheme": "bearer"},
                },
            },
        }
    )
