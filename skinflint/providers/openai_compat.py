"""Any OpenAI-compatible API: OpenAI, DeepSeek, DashScope, Groq, OpenRouter, Together, vLLM,
Ollama, llama.cpp. Bodies pass through untouched and responses are relayed byte for byte.
The batch API (files and batches) is :class:`~skinflint.providers.openai_batches.OpenAIBatches`,
which the provider delegates to."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from skinflint.errors import UpstreamProtocolError
from skinflint.models import (
    Completion,
    StreamChunk,
    UpstreamRequest,
)
from skinflint.providers.http import (
    BatchesVia,
    client_timeout,
    json_object,
    model_objects,
    status_error,
    translate_errors,
    vendor_message,
)
from skinflint.providers.openai_batches import OpenAIBatches

__all__ = ["OpenAICompatProvider"]


class OpenAICompatProvider(BatchesVia):
    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        api_key: str,
        session: aiohttp.ClientSession,
        headers: dict[str, str] | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self.name = name
        self._base = base_url.rstrip("/")
        self._session = session
        self._headers = {"content-type": "application/json", **(headers or {})}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._connect_timeout = connect_timeout
        self._batches = OpenAIBatches(name, base=self._base, session=session,
                                      headers=self._headers, connect_timeout=connect_timeout)

    def __repr__(self) -> str:
        return f"OpenAICompatProvider({self.name!r}, url={self._base!r})"  # never the key

    def _headers_for(self, request: UpstreamRequest) -> dict[str, str]:
        return {**self._headers, **request.headers} if request.headers else self._headers

    async def _post(self, path: str, request: UpstreamRequest) -> Completion:
        with translate_errors(self.name):
            async with self._session.post(
                self._base + path,
                data=orjson.dumps(request.body),
                headers=self._headers_for(request),
                timeout=client_timeout(
                    request.timeout, streaming=False, connect=self._connect_timeout
                ),
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise status_error(self.name, resp.status, raw, resp.headers.get("retry-after"))
        body = json_object(raw, provider=self.name, what="response")
        return Completion(body=body, raw=raw)

    async def complete(self, request: UpstreamRequest) -> Completion:
        return await self._post("/chat/completions", request)

    async def embed(self, request: UpstreamRequest) -> Completion:
        return await self._post("/embeddings", request)

    async def list_models(self, timeout: float) -> list[dict[str, Any]]:
        """``GET /models``, relayed as the upstream sent it."""
        with translate_errors(self.name):
            async with self._session.get(
                self._base + "/models",
                headers=self._headers,
                timeout=client_timeout(timeout, streaming=False, connect=self._connect_timeout),
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise status_error(self.name, resp.status, raw, resp.headers.get("retry-after"))
        return model_objects(raw, provider=self.name)

    async def stream(self, request: UpstreamRequest) -> AsyncIterator[StreamChunk]:
        with translate_errors(self.name):
            async with self._session.post(
                self._base + "/chat/completions",
                data=orjson.dumps(request.body),
                headers=self._headers_for(request),
                timeout=client_timeout(
                    request.timeout, streaming=True, connect=self._connect_timeout
                ),
            ) as resp:
                if resp.status >= 400:
                    raw = await resp.read()
                    raise status_error(self.name, resp.status, raw, resp.headers.get("retry-after"))
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue  # blank separators, comments, "event:" lines
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        return
                    yield self._chunk(payload)
        raise UpstreamProtocolError(
            f"{self.name}: stream ended before [DONE]", provider=self.name, code="upstream_cut"
        )

    def _chunk(self, payload: bytes) -> StreamChunk:
        data = json_object(payload, provider=self.name, what="stream chunk")
        if "error" in data and "choices" not in data:
            err = data["error"]
            text = str(err.get("message", "stream error") if isinstance(err, dict) else err)
            raise UpstreamProtocolError(
                f"{self.name}: {vendor_message(self.name, 0, text)}",
                provider=self.name,
                code="upstream_stream_error",
            )
        return StreamChunk(data=data, raw=payload)

    async def close(self) -> None:
        return None  # the session is shared and closed by its owner
