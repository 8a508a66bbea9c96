"""The request hash: what makes two requests the same request.

Every body field takes part except the few listed in :data:`NOT_OUTPUT_AFFECTING`, so a field
a provider adds tomorrow is part of the key by default instead of being forgotten silently.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson

__all__ = ["NOT_OUTPUT_AFFECTING", "normalize_text", "request_hash", "scoped_key"]

JSON = dict[str, Any]

#: Body fields that cannot change what the model answers. Pinned by a test.
NOT_OUTPUT_AFFECTING = frozenset(
    {
        "stream",
        "stream_options",
        "user",
        "metadata",
        "store",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
        "prompt_cache_retention",
    }
)

_TRAILING_PUNCT = re.compile(r"[\s.!?;:,]+$")


def normalize_text(text: str, *, loose: bool = False) -> str:
    """Conservative: collapse whitespace. Loose: also lower-case and drop trailing punctuation."""
    text = " ".join(text.split())
    if loose:
        text = _TRAILING_PUNCT.sub("", text.lower())
    return text


def _normalize_content(content: Any, loose: bool) -> Any:
    if isinstance(content, str):
        return normalize_text(content, loose=loose)
    if isinstance(content, list):
        return [
            {**part, "text": normalize_text(part["text"], loose=loose)}
            if isinstance(part, dict) and isinstance(part.get("text"), str)
            else part
            for part in content
        ]
    return content


def _normalize_message(message: Any, loose: bool) -> Any:
    if isinstance(message, dict) and "content" in message:
        return {**message, "content": _normalize_content(message["content"], loose)}
    return message


def request_hash(endpoint: str, body: JSON, *, loose: bool = False) -> str:
    """24 hex chars over the endpoint and every output-affecting field, normalised."""
    key: JSON = {k: v for k, v in body.items() if k not in NOT_OUTPUT_AFFECTING}
    messages = key.get("messages")
    if isinstance(messages, list):
        key["messages"] = [_normalize_message(m, loose) for m in messages]
    if isinstance(key.get("input"), str):
        key["input"] = normalize_text(key["input"], loose=loose)
    data = orjson.dumps(key, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return hashlib.blake2b(endpoint.encode() + b"\0" + data, digest_size=12).hexdigest()


def scoped_key(scope: str, request_hash: str) -> str:
    """The cache key: the request hash within one scope (tenant, user or shared)."""
    return hashlib.blake2b(f"{scope}\0{request_hash}".encode(), digest_size=12).hexdigest()
