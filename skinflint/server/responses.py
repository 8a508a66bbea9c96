"""Writing responses: JSON, server-sent events, OpenAI-shaped errors, skinflint headers."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

import orjson

from skinflint.errors import ShuttingDownError, SkinflintError
from skinflint.models import StreamChunk
from skinflint.pipeline import RequestContext

__all__ = ["Responder", "error_body", "skinflint_headers"]

Headers = list[tuple[bytes, bytes]]
_JSON = (b"content-type", b"application/json")
_SSE = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def _usd(value: float | None) -> bytes:
    return b"unknown" if value is None else f"{value:.8f}".encode()


def _header_value(text: str) -> bytes:
    """``text`` as a header value; a name the client chose is percent-encoded unless it is
    printable ASCII, so it can never end the header or smuggle another one in."""
    if text.isascii() and text.isprintable():
        return text.encode()
    return quote(text, safe="".join(map(chr, range(0x20, 0x7F)))).encode()


def skinflint_headers(ctx: RequestContext, *, streaming: bool = False) -> Headers:
    """The response headers of DESIGN section 3. A stream's cost is not known when its headers
    go out, so streams carry cost headers only when the gateway answered by itself (a cache
    hit, a rule)."""
    headers = [
        (b"x-skinflint-request-id", ctx.request_id.encode()),
        (b"x-skinflint-cache", ctx.cache.status.encode()),
        (b"x-skinflint-model", _header_value(ctx.answered_model)),
        (b"x-skinflint-route", _header_value(ctx.route_header)),
    ]
    if ctx.cache.reason is not None:  # one of our fixed values, never the client's text
        headers.append((b"x-skinflint-cache-reason", ctx.cache.reason.encode()))
    if not streaming or ctx.served_locally:
        headers.append((b"x-skinflint-cost-usd", _usd(ctx.costs.cost_usd)))
        headers.append((b"x-skinflint-saved-usd", _usd(ctx.costs.saved_usd)))
    return headers


async def _throw(chunks: AsyncIterator[StreamChunk], exc: BaseException) -> None:
    """Raise ``exc`` in a stream suspended at a chunk, so that whoever accounts for it sees why
    it ended (closing it would look like the client leaving); nothing when it has ended."""
    athrow = getattr(chunks, "athrow", None)
    if athrow is not None:
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await athrow(exc)


def error_body(exc: SkinflintError) -> bytes:
    return orjson.dumps(exc.to_body())


class Responder:
    """Wraps ASGI ``send`` with the few response shapes the gateway writes."""

    def __init__(self, send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self._send = send
        self.started = False
        self.finished = False
        self.client_gone = False
        self.request_id = ""

    async def send_bytes(
        self, body: bytes, status: int = 200, headers: Headers | None = None
    ) -> None:
        self.started = True
        await self._send(
            {"type": "http.response.start", "status": status, "headers": headers or [_JSON]}
        )
        self.finished = True
        await self._send({"type": "http.response.body", "body": body})

    async def json(self, body: bytes, status: int = 200, headers: Headers | None = None) -> None:
        await self.send_bytes(
            body, status, [_JSON, (b"content-length", str(len(body)).encode()), *(headers or ())]
        )

    async def error(
        self, exc: SkinflintError, *, status: int | None = None, headers: Headers | None = None
    ) -> None:
        if self.started:
            return  # the stream's error event has been written already
        extra = list(headers or ())
        if self.request_id and not extra:
            extra.append((b"x-skinflint-request-id", self.request_id.encode()))
        retry_after = exc.retry_after
        if retry_after is not None:
            # HTTP wants whole seconds; rounding up never invites a retry too early.
            extra.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
        await self.json(error_body(exc), status or exc.status, extra)

    async def sse(self, chunks: AsyncIterator[StreamChunk], headers: Headers) -> None:
        """Relay chunks as server-sent events; an upstream failure mid-stream becomes an error
        event (no ``[DONE]``), because the status line has already gone out."""
        self.started = True
        await self._send({"type": "http.response.start", "status": 200, "headers": _SSE + headers})
        send = self._send
        try:
            async for chunk in chunks:
                payload = chunk.raw if chunk.raw is not None else orjson.dumps(chunk.data)
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"data: " + payload + b"\n\n",
                        "more_body": True,
                    }
                )
            tail = b"data: [DONE]\n\n"
        except SkinflintError as exc:
            tail = b"data: " + error_body(exc) + b"\n\n"
        except asyncio.CancelledError as exc:
            if not self.client_gone:  # the server is stopping: say so, and end the body
                self.finished = True
                shutdown = ShuttingDownError("the gateway is shutting down; retry")
                await send({"type": "http.response.body",
                            "body": b"data: " + error_body(shutdown) + b"\n\n"})
                await _throw(chunks, exc)
            raise
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        self.finished = True
        await send({"type": "http.response.body", "body": tail})
