"""A fast, fixed-answer OpenAI-compatible upstream for gateway benchmarks.

A raw ASGI app (no framework) served by uvicorn with uvloop and httptools, so that the
upstream costs as little CPU as possible and the gateway under test dominates the figures.

Routes:
  POST /v1/chat/completions  a fixed ~600-byte ``chat.completion`` with ``usage``
                             (or a short SSE stream when the body asks for ``"stream": true``)
  GET  /v1/models            one model list
  GET  /health               ``ok``
  GET  /_mock/stats          ``{"chat_requests": N, "delay_ms": D}``
  POST /_mock/delay?ms=D     change the fixed per-request delay at run time

Usage: ``python bench/mock_upstream.py --port 9000 [--delay-ms 100]``
(``MOCK_DELAY_MS`` in the environment sets the default delay).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_CONTENT = (
    "Paris is the capital of France. It is known for the Eiffel Tower, the Louvre museum, "
    "its cafes and its long history as a centre of art, fashion and science."
)


def _completion_body() -> bytes:
    body = {
        "id": "chatcmpl-mock0000000000000000000000000",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_mock0000",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": _CONTENT, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 42,
            "completion_tokens": 33,
            "total_tokens": 75,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        },
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _stream_body() -> bytes:
    base = {
        "id": "chatcmpl-mock0000000000000000000000000",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "gpt-4o-mini-2024-07-18",
    }
    chunks: list[dict[str, Any]] = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {**base, "choices": [{"index": 0, "delta": {"content": _CONTENT}}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {
            **base,
            "choices": [],
            "usage": {"prompt_tokens": 42, "completion_tokens": 33, "total_tokens": 75},
        },
    ]
    parts = [b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n" for c in chunks]
    return b"".join(parts) + b"data: [DONE]\n\n"


COMPLETION = _completion_body()
STREAM = _stream_body()
MODELS = json.dumps(
    {
        "object": "list",
        "data": [
            {"id": "gpt-4o-mini", "object": "model", "created": 1721172741, "owned_by": "system"}
        ],
    }
).encode()

_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class MockUpstream:
    """The ASGI application; state is per process (the mock runs one process)."""

    def __init__(self, delay_ms: float = 0.0) -> None:
        self.delay_s = max(0.0, delay_ms) / 1000.0
        self.chat_requests = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        body = await _read_body(receive)
        if method == "POST" and path.endswith("/chat/completions"):
            self.chat_requests += 1
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if b'"stream":true' in body.replace(b" ", b""):
                await _respond(send, 200, STREAM, _SSE_HEADERS)
            else:
                await _respond(send, 200, COMPLETION, _JSON_HEADERS)
        elif method == "GET" and path.endswith("/models"):
            await _respond(send, 200, MODELS, _JSON_HEADERS)
        elif path == "/health":
            await _respond(send, 200, b"ok", [(b"content-type", b"text/plain")])
        elif path == "/_mock/stats":
            stats = {"chat_requests": self.chat_requests, "delay_ms": self.delay_s * 1000.0}
            await _respond(send, 200, json.dumps(stats).encode(), _JSON_HEADERS)
        elif method == "POST" and path == "/_mock/delay":
            query = scope.get("query_string", b"").decode()
            params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
            try:
                self.delay_s = max(0.0, float(params.get("ms", "0"))) / 1000.0
            except ValueError:
                await _respond(send, 400, b'{"error":"bad ms"}', _JSON_HEADERS)
                return
            await _respond(send, 200, b'{"ok":true}', _JSON_HEADERS)
        else:
            error = b'{"error":{"message":"not found","type":"invalid_request_error","code":null}}'
            await _respond(send, 404, error, _JSON_HEADERS)

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description="Fast mock OpenAI-compatible upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=float(os.environ.get("MOCK_DELAY_MS", "0") or 0),
        help="fixed delay before each chat completion answer (default: $MOCK_DELAY_MS or 0)",
    )
    args = parser.parse_args()

    import uvicorn

    uvicorn.run(
        MockUpstream(args.delay_ms),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        server_header=False,
        date_header=False,
        backlog=4096,
        timeout_keep_alive=60,
    )


if __name__ == "__main__":
    main()
