"""Stage 1, attribute: parse the body, authenticate, and name who the call is for."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from skinflint.cachekey import request_hash
from skinflint.errors import AuthenticationError, RequestError
from skinflint.models import CacheBypass
from skinflint.pipeline.context import CacheDecision, Next, Reply, RequestContext

__all__ = ["Attribute"]

_CACHE_MODES = frozenset({"default", "bypass", "refresh"})


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(
            f"request body is not valid JSON: {exc.msg}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object", code="invalid_json")
    return body


def _validate(endpoint: str, body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required and must be a string", code="missing_model")
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty array", code="invalid_messages")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise RequestError(
                "each message must be an object with a 'role'", code="invalid_messages"
            )
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
