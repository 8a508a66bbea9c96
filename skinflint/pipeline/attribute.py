"""Stage 1, attribute: parse the body, authenticate, and name who the call is for."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from skinflint.cachekey import request_hash
from skinflint.errors import AuthenticationError, RequestError
from skinflint.models import CacheBypass
from skinflint.pipeline.context import CacheDecision, Next, Reply, RequestContext

#: The ledger's tenant for a request refused for want of a valid gateway key.
UNAUTHENTICATED = ""

__all__ = ["UNAUTHENTICATED", "Attribute"]

_CACHE_MODES = frozenset({"default", "bypass", "refresh"})


#: Limits on what a request may ask; each breach is a 400 that names the limit.
MAX_MODEL_NAME = 256
MAX_MESSAGES = 10_000
MAX_N = 128
MAX_OUTPUT_TOKENS = 1_000_000
#: Below the 254 levels the request hash can serialise, and far above any real request.
MAX_DEPTH = 128
_SERIALISER_DEPTH = 254  # the deepest nesting orjson.dumps writes (pinned by a test)
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(
            f"request body is not valid JSON: {exc.msg}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object", code="invalid_json")
    _check_depth(raw, body)
    return body


def _check_depth(raw: bytes, body: dict[str, Any]) -> None:
    """Nesting is at most the number of brackets, which two scans in C count. Past the limit,
    the body is serialised inside enough extra levels that the serialiser's own recursion
    limit falls exactly at ``MAX_DEPTH``: a few microseconds, where a walk in Python costs
    tens."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return
    probe: Any = body
    for _ in range(_SERIALISER_DEPTH - MAX_DEPTH):
        probe = [probe]
    try:
        orjson.dumps(probe)
    except orjson.JSONEncodeError:
        raise RequestError(
            f"request body is nested more than {MAX_DEPTH} levels deep", code="too_deep"
        ) from None


def _check_model(model: Any) -> str:
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required and must be a string", code="missing_model")
    if len(model) > MAX_MODEL_NAME:
        raise RequestError(
            f"'model' is longer than {MAX_MODEL_NAME} characters", code="invalid_model"
        )
    if not model.isprintable():
        raise RequestError(
            "'model' must not contain control characters", code="invalid_model"
        )
    return model


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty array", code="invalid_messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(
            f"'messages' holds more than {MAX_MESSAGES} messages", code="too_many_messages"
        )
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(role, str):
            raise RequestError(
                f"messages[{i}] must be an object with a 'role'", code="invalid_messages"
            )
        if role not in ROLES:
            raise RequestError(
                f"messages[{i}].role must be one of {sorted(ROLES)}", code="invalid_role"
            )


def _int_field(body: dict[str, Any], name: str, low: int, high: int) -> None:
    """``body[name]``, when given and not null, must be an integer in ``low..high``."""
    value = body.get(name)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(
            f"'{name}' must be an integer from {low} to {high}", code=f"invalid_{name}"
        )


def _validate(endpoint: str, body: dict[str, Any]) -> str:
    """Every check of the request's shape, made before anything is sent upstream."""
    model = _check_model(body.get("model"))
    if endpoint == "chat":
        _check_messages(body.get("messages"))
        _int_field(body, "n", 1, MAX_N)
        for name in _TOKEN_FIELDS:
            _int_field(body, name, 1, MAX_OUTPUT_TOKENS)
    elif "input" not in body:
        raise RequestError("'input' is required", code="missing_input")
    return model


class Attribute:
    name = "attribute"
    enabled = True

    def __init__(self, key_hashes: dict[str, str]) -> None:
        """``key_hashes`` maps sha256(gateway key) to tenant; empty means one open tenant."""
        self._tenants = key_hashes

    def _tenant(self, ctx: RequestContext) -> str:
        if not self._tenants:
            return "default"
        auth = ctx.headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        tenant = self._tenants.get(hashlib.sha256(token.encode()).hexdigest()) if token else None
        if tenant is None:
            # its ledger row must not count under a real tenant, "default" included
            ctx.tenant = UNAUTHENTICATED
            raise AuthenticationError("invalid or missing gateway key")
        return tenant

    async def __call__(self, ctx: RequestContext, next: Next) -> Reply:
        ctx.tenant = self._tenant(ctx)
        ctx.body = body = _parse(ctx.raw_body)
        ctx.requested_model = _validate(ctx.endpoint, body)
        h = ctx.headers
        meta = body.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        ctx.feature = h.get("x-skinflint-feature") or str(meta.get("feature", ""))
        user = body.get("user")
        ctx.user = h.get("x-skinflint-user") or (user if isinstance(user, str) else "")
        tags = h.get("x-skinflint-tags")
        ctx.tags = tuple(t.strip() for t in tags.split(",") if t.strip()) if tags else ()
        mode = h.get("x-skinflint-cache", "default").strip().lower()
        if mode not in _CACHE_MODES:
            raise RequestError(
                f"x-skinflint-cache must be one of {sorted(_CACHE_MODES)}", code="invalid_header"
            )
        ctx.cache_mode = mode
        if mode == "bypass":  # said even when no cache stage runs to say it
            ctx.cache = CacheDecision("bypass", CacheBypass.CLIENT)
        ctx.task = h.get("x-skinflint-task", "")
        ctx.stream = ctx.endpoint == "chat" and body.get("stream") is True  # embeddings never
        opts = body.get("stream_options")
        ctx.client_wants_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        ctx.request_hash = request_hash(ctx.endpoint, body)
        return await next(ctx)
