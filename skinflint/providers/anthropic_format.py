"""Requests and complete responses translated between OpenAI's chat completions and
Anthropic's Messages API: pure functions, no I/O (the provider is
:mod:`skinflint.providers.anthropic`).

Not translatable, and therefore refused with a 400 before any call: ``n`` > 1, content parts
other than text and images, non-function tools, and tool-call arguments that are not a JSON
object. OpenAI sampling knobs Anthropic lacks (``seed``, penalties, ``logit_bias``,
``logprobs``) are dropped, as they change no contract the client can check.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from skinflint.errors import UpstreamStatusError
from skinflint.providers.http import retry_after_seconds, vendor_message

__all__ = ["JSON", "PREFIX", "finish_reason", "from_anthropic", "status_error", "to_anthropic",
           "usage_from_anthropic", "vendor_error"]

JSON = dict[str, Any]

PREFIX = "anthropic: "  # starts every error message about an Anthropic call
_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
           "max_tokens": "length", "model_context_window_exceeded": "length",
           "tool_use": "tool_calls", "refusal": "content_filter"}
_TOOL_CHOICE = {"auto": {"type": "auto"}, "none": {"type": "none"}, "required": {"type": "any"}}
_OPENAI_TYPES = frozenset({"invalid_request_error", "authentication_error", "rate_limit_error",
                           "api_error"})
_JSON_ONLY = ("Respond with a single valid JSON object and nothing else: no prose and no "
              "code fences.")


def _invalid(message: str, code: str | None = None) -> UpstreamStatusError:
    return UpstreamStatusError(400, PREFIX + message, error_type="invalid_request_error",
                               code=code)


# --- request -----------------------------------------------------------------------------


def to_anthropic(body: JSON, model: str, default_max_tokens: int) -> JSON:
    """The Messages API body for the OpenAI chat-completions ``body``; ``body`` is not modified.

    Raises :class:`UpstreamStatusError` (400) for anything Anthropic cannot express, and for
    fields of the wrong type (OpenAI would refuse them; here they would break the translation)."""
    try:
        return _translate(body, model, default_max_tokens)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise _invalid(f"a request field has the wrong type or shape ({type(exc).__name__})",
                       code="invalid_request") from None


def _translate(body: JSON, model: str, default_max_tokens: int) -> JSON:
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        raise _invalid("n > 1 is not supported", code="unsupported_parameter")
    system, messages = _messages(body.get("messages") or [])
    system = "\n\n".join(s for s in (system, _format_instruction(body.get("response_format"))) if s)
    out: JSON = {"model": model, "max_tokens": _max_tokens(body, default_max_tokens),
                 "messages": messages}
    if system:
        out["system"] = system
    out.update(_sampling(body))
    out.update(_tooling(body))
    if body.get("user"):
        out["metadata"] = {"user_id": str(body["user"])}
    if body.get("stream"):
        out["stream"] = True
    return out


def _max_tokens(body: JSON, default: int) -> int:
    # The smaller wins: a budget stage may cap one field while the client set the other.
    given = [body[k] for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None]
    return int(min(given)) if given else default


def _sampling(body: JSON) -> JSON:
    out: JSON = {}
    if body.get("temperature") is not None:  # OpenAI allows 0..2, Anthropic 0..1
        out["temperature"] = max(0.0, min(float(body["temperature"]), 1.0))
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    return out


def _format_instruction(fmt: object) -> str:
    """Anthropic has no JSON mode, so the system prompt asks for it instead."""
    if not isinstance(fmt, dict) or fmt.get("type") not in ("json_object", "json_schema"):
        return ""
    schema = (fmt.get("json_schema") or {}).get("schema")
    if schema is None:
        return _JSON_ONLY
    return f"{_JSON_ONLY} It must conform to this JSON Schema: {orjson.dumps(schema).decode()}"


def _tooling(body: JSON) -> JSON:
    tools = body.get("tools")
    if not tools:
        return {}
    out: JSON = {"tools": [_tool(t) for t in tools]}
    choice = _tool_choice(body.get("tool_choice"))
    if body.get("parallel_tool_calls") is False and choice.get("type") != "none":
        choice = {"type": "auto", **choice, "disable_parallel_tool_use": True}
    if choice:
        out["tool_choice"] = choice
    return out


def _tool(tool: JSON) -> JSON:
    if tool.get("type") != "function":
        raise _invalid(f"tool type {tool.get('type')!r} is not supported",
                       code="unsupported_parameter")
    fn = tool.get("function") or {}
    out: JSON = {"name": fn.get("name", ""),
                 "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
    if fn.get("description"):
        out["description"] = fn["description"]
    return out


def _tool_choice(choice: object) -> JSON:
    """The Anthropic ``tool_choice`` (a fresh dict), or ``{}`` for Anthropic's default."""
    if choice is None:
        return {}
    if isinstance(choice, str) and choice in _TOOL_CHOICE:
        return dict(_TOOL_CHOICE[choice])
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "tool", "name": (choice.get("function") or {}).get("name", "")}
    raise _invalid(f"tool_choice {choice!r} is not supported", code="unsupported_parameter")


def _messages(messages: list[JSON]) -> tuple[str, list[JSON]]:
    """The joined system prompt and the alternating user/assistant turns."""
    system: list[str] = []
    turns: list[JSON] = []
    for message in messages:
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_text_of(message.get("content")))
        elif role == "user":
            _append(turns, "user", _blocks(message.get("content")))
        elif role == "assistant":
            _append(turns, "assistant", _assistant_blocks(message))
        elif role == "tool":
            _append(turns, "user", [_tool_result(message)])
        else:
            raise _invalid(f"message role {role!r} is not supported", code="unsupported_parameter")
    for turn in turns:  # Anthropic wants tool results before any text in a user turn
        turn["content"].sort(key=lambda block: block["type"] != "tool_result")
    return "\n\n".join(s for s in system if s), turns


def _append(turns: list[JSON], role: str, blocks: list[JSON]) -> None:
    """Add ``blocks`` as a turn, merged into the previous one when the role repeats, since
    Anthropic requires roles to alternate."""
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _blocks(content: object) -> list[JSON]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        return []
    blocks = (_part(p) for p in content)
    return [b for b in blocks if b is not None]


def _part(part: JSON) -> JSON | None:
    kind = part.get("type")
    if kind in ("text", "refusal"):
        text = part.get(kind) or ""
        return {"type": "text", "text": text} if text else None  # empty text is rejected
    if kind == "image_url":
        return {"type": "image", "source": _image_source((part.get("image_url") or {}).get("url"))}
    raise _invalid(f"content part type {kind!r} is not supported", code="unsupported_parameter")


def _image_source(url: object) -> JSON:
    if not isinstance(url, str):
        raise _invalid("image_url.url must be a string")
    if not url.startswith("data:"):
        return {"type": "url", "url": url}
    header, _, data = url[5:].partition(",")
    media_type, _, encoding = header.partition(";")
    if encoding != "base64" or not data:
        raise _invalid("image data URLs must be base64-encoded")
    return {"type": "base64", "media_type": media_type, "data": data}


def _assistant_blocks(message: JSON) -> list[JSON]:
    blocks = _blocks(message.get("content"))
    for call in message.get("tool_calls") or ():
        fn = call.get("function") or {}
        blocks.append({"type": "tool_use", "id": call.get("id", ""), "name": fn.get("name", ""),
                       "input": _arguments(fn.get("arguments"))})
    return blocks


def _arguments(arguments: object) -> JSON:
    if not arguments:
        return {}
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str | bytes) else arguments
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise _invalid("tool call arguments must be a JSON object")
    return parsed


def _tool_result(message: JSON) -> JSON:
    return {"type": "tool_result", "tool_use_id": message.get("tool_call_id", ""),
            "content": _text_of(message.get("content"))}


# --- response ----------------------------------------------------------------------------


def finish_reason(stop_reason: object) -> str:
    """The OpenAI ``finish_reason`` for an Anthropic ``stop_reason``; unknown ones -> "stop"."""
    return _FINISH.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def usage_from_anthropic(usage: JSON | None) -> JSON:
    """OpenAI usage: Anthropic counts cache reads and writes apart from ``input_tokens``, and
    OpenAI's ``prompt_tokens`` includes both (as the price catalog's ``input_tokens`` does).
    Cache writes are told in ``prompt_tokens_details.cache_write_tokens``, where the catalog
    reads them in OpenAI-shaped usage."""
    u = usage or {}
    cached = int(u.get("cache_read_input_tokens") or 0)
    written = int(u.get("cache_creation_input_tokens") or 0)
    prompt = int(u.get("input_tokens") or 0) + cached + written
    completion = int(u.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written}}


def from_anthropic(msg: JSON, model: str) -> JSON:
    """The ``chat.completion`` for an Anthropic message; ``model`` is the name requested."""
    blocks = [b for b in msg.get("content") or () if isinstance(b, dict)]
    text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
    calls = [_tool_call(b) for b in blocks if b.get("type") == "tool_use"]
    message: JSON = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return {"id": f"chatcmpl-{msg.get('id', '')}", "object": "chat.completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish_reason(msg.get("stop_reason"))}],
            "usage": usage_from_anthropic(msg.get("usage"))}


def _tool_call(block: JSON) -> JSON:
    return {"id": block.get("id", ""), "type": "function",
            "function": {"name": block.get("name", ""),
                         "arguments": orjson.dumps(block.get("input") or {}).decode()}}


# --- errors ------------------------------------------------------------------------------


def vendor_error(status: int, error: JSON, provider: str,
                 retry_after: float | None = None) -> UpstreamStatusError:
    etype = error.get("type") if isinstance(error.get("type"), str) else None
    message = str(error.get("message") or f"upstream returned HTTP {status}")
    message = vendor_message(provider, status, message)
    return UpstreamStatusError(status, PREFIX + message, provider=provider,
                               error_type=etype if etype in _OPENAI_TYPES else None,
                               code=etype, retry_after=retry_after)


def status_error(status: int, raw: bytes, retry_after: str | None,
                 provider: str) -> UpstreamStatusError:
    """A non-2xx response; its body is ``{"type": "error", "error": {"type", "message"}}``."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    return vendor_error(status, error if isinstance(error, dict) else {}, provider,
                        retry_after_seconds(retry_after))


# --- stream ------------------------------------------------------------------------------
