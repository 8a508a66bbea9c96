"""How a failed connection is told apart: refused (the provider never saw the request, it cost
nothing) or closed after the request went out (the provider may have done the work)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from skinflint.errors import UpstreamConnectionError
from skinflint.pipeline.call import may_have_cost
from skinflint.providers.http import DISCONNECTED, translate_errors
from tests.pg import free_port


async def _post(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        with translate_errors("p"):
            async with session.post(url, json={"model": "m"}) as resp:
                await resp.read()


async def test_a_refused_connection_cost_nothing() -> None:
    with pytest.raises(UpstreamConnectionError) as caught:
        await _post(f"http://127.0.0.1:{free_port()}/v1/chat/completions")
    assert caught.value.code is None and not may_have_cost(caught.value)


async def test_a_connection_closed_after_the_request_may_have_cost() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the request arrived; the server goes away
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(UpstreamConnectionError) as caught:
            await _post(f"http://127.0.0.1:{port}/v1/chat/completions")
    finally:
        server.close()
        await server.wait_closed()
    assert caught.value.code == DISCONNECTED and may_have_cost(caught.value)
