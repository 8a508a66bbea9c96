"""Ending a stream: what the client reads, and what the stream's producer is told."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from skinflint.models import CLIENT_LEFT, StreamChunk
from skinflint.server.responses import Responder


class Client:
    """An ASGI ``send`` whose client stops reading after the first event: the next send
    waits, as one to a full socket does."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.stalled = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            self.bodies.append(message["body"])
            if len(self.bodies) == 2:
                self.stalled.set()
                await asyncio.Event().wait()


async def chunks(ended: list[BaseException]) -> AsyncIterator[StreamChunk]:
    try:
        for i in range(10):
            yield StreamChunk({"choices": [{"index": 0, "delta": {"content": str(i)}}]})
    except BaseException as exc:
        ended.append(exc)
        raise


async def _cancel_while_sending(*, client_left: bool) -> tuple[Client, list[BaseException]]:
    client, ended = Client(), []
    out = Responder(client.send)
    task = asyncio.ensure_future(out.sse(chunks(ended), []))
    await client.stalled.wait()
    out.client_gone = client_left
    task.cancel(msg=CLIENT_LEFT if client_left else None)
    with pytest.raises(asyncio.CancelledError):
        await task
    return client, ended


async def test_a_stream_the_server_stops_while_sending_tells_client_and_producer() -> None:
    client, ended = await _cancel_while_sending(client_left=False)
    assert [(type(e), e.args) for e in ended] == [(asyncio.CancelledError, ())]
    last = orjson.loads(client.bodies[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "shutdown"


async def test_a_stream_whose_client_left_is_closed_and_sends_nothing_more() -> None:
    client, ended = await _cancel_while_sending(client_left=True)
    assert [type(e) for e in ended] == [GeneratorExit]
    assert len(client.bodies) == 2
