"""Anthropic's Messages API behind the OpenAI chat-completions interface.

Requests are translated with :func:`to_anthropic`, complete responses with
:func:`from_anthropic` (both in :mod:`~skinflint.providers.anthropic_format`, which says what
cannot be translated) and streams with :func:`chunks_from_sse`; all three are pure (no I/O) so
they are tested without a network. :class:`AnthropicProvider` only adds the HTTP call, and
delegates the batch API to :class:`~skinflint.providers.anthropic_batches.AnthropicBatches`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from datetime import datetime
from typing import Any

import aiohttp
import orjson

from skinflint.errors import UpstreamProtocolError, UpstreamStatusError
from skinflint.models import (
    Completion,
    StreamChunk,
    UpstreamRequest,
)
from skinflint.providers.anthropic_batches import AnthropicBatches
from skinflint.providers.anthropic_format import (
    JSON,
    PREFIX,
    finish_reason,
    from_anthropic,
    status_error,
    to_anthropic,
    usage_from_anthropic,
    vendor_error,
)
from skinflint.providers.http import (
    BatchesVia,
    client_timeout,
    json_object,
    model_objects,
    translate_errors,
)

__all__ = [
    "AnthropicProvider",
    "chunks_from_sse",
    "finish_reason",
    "from_anthropic",
    "to_anthropic",
    "usage_from_anthropic",
]

# An ``error`` event carries no HTTP status; overloaded maps to 503 (not Anthropic's 529) so
# that clients and proxies that only know standard codes still treat it as retryable.
_EVENT_STATUS = {"invalid_request_error": 400, "authentication_error": 401,
                 "permission_error": 403, "not_found_error": 404, "request_too_large": 413,
                 "rate_limit_error": 429, "api_error": 500, "overloaded_error": 503,
                 "timeout_error": 504}


class _StreamTranslator:
    """Anthropic stream events -> ``chat.completion.chunk`` bodies; one instance per stream."""

    def __init__(self, model: str, provider: str) -> None:
        self.model, self.provider = model, provider
        self.id, self.created = "chatcmpl-", int(time.time())
        self.usage: JSON = {}
        self.tools: dict[int, int] = {}  # content block index -> OpenAI tool call index
        self.started = self.finished = False

    def feed(self, event: JSON) -> list[JSON]:
        """The chunks ``event`` produces; raises on an ``error`` event."""
        kind = event.get("type")
        if kind == "message_start":
            return self._message_start(event.get("message") or {})
        if kind == "content_block_start":
            return self._block_start(event.get("index", 0), event.get("content_block") or {})
        if kind == "content_block_delta":
            return self._block_delta(event.get("index", 0), event.get("delta") or {})
        if kind == "message_delta":
            return self._message_delta(event)
        if kind == "message_stop":
            self.finished = True
            return [self._usage_chunk()]
        if kind == "error":
            raise _stream_error(event.get("error") or {}, self.provider)
        return []  # ping, content_block_stop, and event types added to the API later

    def _message_start(self, message: JSON) -> list[JSON]:
        self.id = f"chatcmpl-{message.get('id', '')}"
        self._add_usage(message.get("usage"))
        return self._emit({})

    def _block_start(self, index: int, block: JSON) -> list[JSON]:
        if block.get("type") == "text" and block.get("text"):
            return self._emit({"content": block["text"]})
        if block.get("type") != "tool_use":
            return []  # thinking and server-tool blocks have no OpenAI counterpart
        self.tools[index] = len(self.tools)
        return self._emit({"tool_calls": [{
            "index": self.tools[index], "id": block.get("id", ""), "type": "function",
            "function": {"name": block.get("name", ""), "arguments": ""}}]})

    def _block_delta(self, index: int, delta: JSON) -> list[JSON]:
        if delta.get("type") == "text_delta" and delta.get("text"):
            return self._emit({"content": delta["text"]})
        if delta.get("type") == "input_json_delta" and delta.get("partial_json") \
                and index in self.tools:
            return self._emit({"tool_calls": [{
                "index": self.tools[index], "function": {"arguments": delta["partial_json"]}}]})
        return []

    def _message_delta(self, event: JSON) -> list[JSON]:
        self._add_usage(event.get("usage"))
        reason = (event.get("delta") or {}).get("stop_reason")
        return self._emit({}, finish_reason(reason)) if reason else []

    def _add_usage(self, usage: object) -> None:
        # Counts in message_delta are cumulative, so later values replace earlier ones.
        if isinstance(usage, dict):
            self.usage.update((k, v) for k, v in usage.items() if isinstance(v, int))

    def _emit(self, delta: JSON, finish: str | None = None) -> list[JSON]:
        """``delta`` as a chunk, preceded by the role chunk when it is the first."""
        chunks = [] if self.started else [self._chunk({"role": "assistant", "content": ""})]
        self.started = True
        if delta or finish:
            chunks.append(self._chunk(delta, finish))
        return chunks

    def _chunk(self, delta: JSON, finish: str | None = None) -> JSON:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish}]}

    def _usage_chunk(self) -> JSON:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [], "usage": usage_from_anthropic(self.usage)}


async def chunks_from_sse(lines: AsyncIterable[bytes], model: str, *,
                          provider: str = "anthropic") -> AsyncGenerator[StreamChunk, None]:
    """Translate Anthropic SSE ``lines`` into OpenAI chunks, ending with one usage chunk
    (``choices: []``). Stops reading at ``message_stop``; raises
    :class:`UpstreamProtocolError` if the lines end before it or carry unreadable JSON, and
    :class:`UpstreamStatusError` for an ``error`` event."""
    state = _StreamTranslator(model, provider)
    name = ""
    async for line in lines:
        if line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
        elif line.startswith(b"data:"):
            for data in state.feed(_event(line[5:], name, provider)):
                yield StreamChunk(data=data)
            if state.finished:
                return
    raise UpstreamProtocolError(PREFIX + "stream cut before message_stop", provider=provider,
                                code="upstream_cut")


def _event(payload: bytes, name: str, provider: str) -> JSON:
    event = json_object(payload, provider=provider, what="stream event")
    event.setdefault("type", name)  # the data line names its type; the event line is a backup
    return event


# --- errors ------------------------------------------------------------------------------


def _stream_error(error: JSON, provider: str) -> UpstreamStatusError:
    return vendor_error(_EVENT_STATUS.get(str(error.get("type")), 500), error, provider)


def _decode(raw: bytes, provider: str) -> JSON:
    return json_object(raw, provider=provider, what="response")


# --- provider ----------------------------------------------------------------------------


def _api_url(base_url: str, path: str) -> str:
    return base_url.rstrip("/").removesuffix("/v1") + "/v1/" + path


def _openai_model(model: JSON) -> JSON:
    """An Anthropic model object (``id``, ``created_at``, ``display_name``) in OpenAI's shape."""
    try:
        created = int(datetime.fromisoformat(str(model.get("created_at"))).timestamp())
    except ValueError:
        created = 0
    return {"id": model["id"], "object": "model", "created": created, "owned_by": "anthropic"}


class AnthropicProvider(BatchesVia):
    """A :class:`skinflint.interfaces.Provider` for ``POST {base_url}/v1/messages``.

    ``base_url`` may end in ``/v1`` or not. ``session`` is shared and owned by the caller."""

    def __init__(self, name: str, *, base_url: str, api_key: str,
                 session: aiohttp.ClientSession, default_max_tokens: int = 4096,
                 version: str = "2023-06-01") -> None:
        self.name = name
        self._url = _api_url(base_url, "messages")
        self._models_url = _api_url(base_url, "models?limit=1000")  # the API's largest page
        self._session = session
        self._headers = {"x-api-key": api_key, "anthropic-version": version,
                         "content-type": "application/json"}
        self._default_max_tokens = default_max_tokens
        self._batches = AnthropicBatches(name, root=_api_url(base_url, "").removesuffix("/v1/"),
                                         session=session, headers=self._headers,
                                         default_max_tokens=default_max_tokens)

    def __repr__(self) -> str:
        return f"AnthropicProvider({self.name!r}, url={self._url!r})"  # never the key

    @asynccontextmanager
    async def _post(self, request: UpstreamRequest, *,
                    stream: bool) -> AsyncIterator[aiohttp.ClientResponse]:
        """The 2xx response; translation errors are raised before anything is sent."""
        body = to_anthropic(request.body, request.provider_model, self._default_max_tokens)
        body.pop("stream", None)
        if stream:
            body["stream"] = True
        async with self._session.post(self._url, data=orjson.dumps(body),
                                      headers={**self._headers, **request.headers},
                                      timeout=client_timeout(request.timeout, streaming=stream,
                                                             connect=request.timeout)) as resp:
            if not 200 <= resp.status < 300:
                raise status_error(resp.status, await resp.read(),
                                   resp.headers.get("retry-after"), self.name)
            yield resp

    async def complete(self, request: UpstreamRequest) -> Completion:
        with translate_errors(self.name):
            async with self._post(request, stream=False) as resp:
                raw = await resp.read()
        return Completion(body=from_anthropic(_decode(raw, self.name), request.provider_model))

    async def stream(self, request: UpstreamRequest) -> AsyncIterator[StreamChunk]:
        with translate_errors(self.name):
            async with self._post(request, stream=True) as resp, aclosing(
                    chunks_from_sse(resp.content, request.provider_model,
                                    provider=self.name)) as chunks:
                async for chunk in chunks:
                    yield chunk

    async def list_models(self, timeout: float) -> list[dict[str, Any]]:
        """``GET /v1/models``, translated to OpenAI model objects."""
        with translate_errors(self.name):
            async with self._session.get(
                    self._models_url, headers=self._headers,
                    timeout=client_timeout(timeout, streaming=False, connect=timeout)) as resp:
                raw = await resp.read()
                if not 200 <= resp.status < 300:
                    raise status_error(resp.status, raw, resp.headers.get("retry-after"),
                                       self.name)
        return [_openai_model(m) for m in model_objects(raw, provider=self.name)]

    async def embed(self, request: UpstreamRequest) -> Completion:
        raise UpstreamStatusError(400, PREFIX + "embeddings are not supported",
                                  provider=self.name, code="unsupported_endpoint")

    async def close(self) -> None:
        return None  # the session is shared and closed by its owner
