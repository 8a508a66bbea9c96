"""The anthropic provider: OpenAI <-> Messages API translation, the SSE stream, and the HTTP call
against a small Messages API on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from skinflint.errors import (
    UpstreamConnectionError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from skinflint.models import StreamChunk, UpstreamRequest
from skinflint.providers import anthropic
from skinflint.providers.anthropic import (
    AnthropicProvider,
    chunks_from_sse,
    from_anthropic,
    to_anthropic,
)

JSON = dict[str, Any]
MODEL = "claude-3-5-haiku-latest"


def test_public_surface() -> None:
    assert sorted(anthropic.__all__) == ["AnthropicProvider", "chunks_from_sse", "finish_reason",
                                         "from_anthropic", "to_anthropic", "usage_from_anthropic"]


# --- request -----------------------------------------------------------------------------


def translate(**body: Any) -> JSON:
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return to_anthropic(body, MODEL, 4096)


def test_minimal_request() -> None:
    assert translate() == {"model": MODEL, "max_tokens": 4096,
                           "messages": [{"role": "user",
                                         "content": [{"type": "text", "text": "hi"}]}]}


def test_system_and_developer_messages_join_into_system() -> None:
    out = translate(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
        {"role": "user", "content": "hi"},
    ])
    assert out["system"] == "Be brief.\n\nUse French."
    assert [m["role"] for m in out["messages"]] == ["user"]


def test_images_from_data_and_http_urls() -> None:
    out = translate(messages=[{"role": "user", "content": [
        {"type": "text", "text": "compare"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]}])
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "compare"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


def test_tool_calls_and_results_round_trip() -> None:
    out = translate(messages=[
        {"role": "user", "content": "weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Rome"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rain"}]},
    ])
    assert out["messages"][1] == {"role": "assistant", "content": [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "weather", "input": {"city": "Rome"}},
    ]}
    assert out["messages"][2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
        {"type": "tool_result", "tool_use_id": "call_2", "content": "rain"},
    ]}


def test_assistant_with_only_tool_calls_and_null_content() -> None:
    out = translate(messages=[
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}]},
    ])
    assert out["messages"][1]["content"] == [{"type": "tool_use", "id": "c", "name": "f",
                                              "input": {}}]


def test_consecutive_same_role_messages_merge_with_tool_results_first() -> None:
    out = translate(messages=[
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "done"},
        {"role": "user", "content": "thanks"},
    ])
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]
    assert out["messages"][0]["content"] == [{"type": "text", "text": "a"},
                                             {"type": "text", "text": "b"}]
    assert [b["type"] for b in out["messages"][2]["content"]] == ["tool_result", "text"]


def test_tools_translate_to_input_schema() -> None:
    params = {"type": "object", "properties": {"city": {"type": "string"}}}
    out = translate(tools=[
        {"type": "function", "function": {"name": "weather", "description": "Get weather",
                                          "parameters": params}},
        {"type": "function", "function": {"name": "now"}},
    ])
    assert out["tools"] == [
        {"name": "weather", "description": "Get weather", "input_schema": params},
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in out


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize(("choice", "expected"), [
    ("auto", {"type": "auto"}),
    ("none", {"type": "none"}),
    ("required", {"type": "any"}),
    ({"type": "function", "function": {"name": "f"}}, {"type": "tool", "name": "f"}),
])
def test_tool_choice(choice: Any, expected: JSON) -> None:
    assert translate(tools=TOOLS, tool_choice=choice)["tool_choice"] == expected


def test_parallel_tool_calls_false_disables_parallel_use() -> None:
    out = translate(tools=TOOLS, parallel_tool_calls=False)
    assert out["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    out = translate(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert out["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}


@pytest.mark.parametrize(("fields", "expected"), [
    ({}, 4096),
    ({"max_tokens": 100}, 100),
    ({"max_completion_tokens": 200}, 200),
    ({"max_tokens": 300, "max_completion_tokens": 50}, 50),
])
def test_max_tokens(fields: JSON, expected: int) -> None:
    assert translate(**fields)["max_tokens"] == expected


def test_sampling_stop_user_and_stream() -> None:
    out = translate(temperature=1.7, top_p=0.9, stop="END", user="u-42", stream=True,
                    seed=7, frequency_penalty=0.5)
    assert out["temperature"] == 1.0
    assert out["top_p"] == 0.9
    assert out["stop_sequences"] == ["END"]
    assert out["metadata"] == {"user_id": "u-42"}
    assert out["stream"] is True
    assert "seed" not in out and "frequency_penalty" not in out
    assert translate(stop=["a", "b"], temperature=0)["stop_sequences"] == ["a", "b"]
    assert translate(temperature=0)["temperature"] == 0.0


def test_response_format_asks_for_json_in_the_system_prompt() -> None:
    out = translate(messages=[{"role": "system", "content": "Be exact."},
                              {"role": "user", "content": "hi"}],
                    response_format={"type": "json_object"})
    assert out["system"].startswith("Be exact.\n\n")
    assert "JSON" in out["system"]
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}}
    out = translate(response_format={"type": "json_schema",
                                     "json_schema": {"name": "a", "schema": schema}})
    assert orjson.dumps(schema).decode() in out["system"]
    assert "system" not in translate(response_format={"type": "text"})


def test_input_body_is_not_modified() -> None:
    body: JSON = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                  "tools": TOOLS, "parallel_tool_calls": False}
    before = orjson.dumps(body)
    to_anthropic(body, MODEL, 10)
    assert orjson.dumps(body) == before


def test_n_above_one_is_refused() -> None:
    with pytest.raises(UpstreamStatusError) as info:
        translate(n=2)
    assert info.value.status == 400
    assert info.value.message == "anthropic: n > 1 is not supported"
    assert info.value.code == "unsupported_parameter"
    assert info.value.error_type == "invalid_request_error"
    assert translate(n=1)["max_tokens"] == 4096


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
    [{"role": "function", "name": "f", "content": "x"}],
    [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}],
    [{"role": "user", "content": [{"type": "image_url",
                                   "image_url": {"url": "data:image/png,rawbytes"}}]}],
])
def test_untranslatable_messages_are_refused(messages: list[JSON]) -> None:
    with pytest.raises(UpstreamStatusError) as info:
        translate(messages=messages)
    assert info.value.status == 400


# --- response ----------------------------------------------------------------------------


def message(content: list[JSON], stop_reason: str = "end_turn", **usage: int) -> JSON:
    return {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-x",
            "content": content, "stop_reason": stop_reason, "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5, **usage}}


def test_text_response() -> None:
    out = from_anthropic(message([{"type": "text", "text": "Hello "},
                                  {"type": "text", "text": "there"}]), MODEL)
    assert out["id"] == "chatcmpl-msg_01"
    assert out["object"] == "chat.completion"
    assert out["model"] == MODEL
    assert out["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": "Hello there"}}]
    assert out["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                            "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0}}


def test_tool_use_response() -> None:
    out = from_anthropic(message([
        {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
    ], "tool_use"), MODEL)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call == {"id": "toolu_1", "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}
    assert orjson.loads(call["function"]["arguments"]) == {"city": "Paris"}


@pytest.mark.parametrize(("stop_reason", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
    ("tool_use", "tool_calls"), ("refusal", "content_filter"), ("something_new", "stop"),
])
def test_stop_reasons(stop_reason: str, finish: str) -> None:
    out = from_anthropic(message([{"type": "text", "text": "x"}], stop_reason), MODEL)
    assert out["choices"][0]["finish_reason"] == finish


def test_usage_counts_cache_reads_and_writes_as_prompt_tokens() -> None:
    out = from_anthropic(message([], cache_read_input_tokens=100,
                                 cache_creation_input_tokens=20), MODEL)
    assert out["usage"] == {"prompt_tokens": 130, "completion_tokens": 5, "total_tokens": 135,
                            "prompt_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 20}}
    assert out["choices"][0]["message"]["content"] == ""


# --- stream ------------------------------------------------------------------------------


def sse(*events: JSON) -> list[bytes]:
    """Events framed as the Messages API sends them, one line per item."""
    lines: list[bytes] = []
    for event in events:
        lines += [f"event: {event['type']}\n".encode(), b"data: " + orjson.dumps(event) + b"\n",
                  b"\n"]
    return lines


async def aiter(lines: Iterable[bytes]) -> AsyncIterator[bytes]:
    for line in lines:
        yield line


async def collect(lines: Iterable[bytes]) -> list[JSON]:
    chunks: list[StreamChunk] = [c async for c in chunks_from_sse(aiter(lines), MODEL)]
    assert all(c.raw is None for c in chunks)
    return [c.data for c in chunks]


START = {"type": "message_start", "message": {
    "id": "msg_7", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
    "stop_reason": None, "stop_sequence": None,
    "usage": {"input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 5,
              "cache_creation_input_tokens": 0}}}
STOP = {"type": "message_stop"}


def text_block(index: int, *parts: str) -> list[JSON]:
    return [{"type": "content_block_start", "index": index,
             "content_block": {"type": "text", "text": ""}},
            *({"type": "content_block_delta", "index": index,
               "delta": {"type": "text_delta", "text": p}} for p in parts),
            {"type": "content_block_stop", "index": index}]


def tool_block(index: int, tool_id: str, name: str, *parts: str) -> list[JSON]:
    return [{"type": "content_block_start", "index": index,
             "content_block": {"type": "tool_use", "id": tool_id, "name": name, "input": {}}},
            *({"type": "content_block_delta", "index": index,
               "delta": {"type": "input_json_delta", "partial_json": p}} for p in parts),
            {"type": "content_block_stop", "index": index}]


def end(stop_reason: str, output_tokens: int) -> JSON:
    return {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens}}


def deltas(chunks: list[JSON]) -> list[JSON]:
    return [c["choices"][0]["delta"] for c in chunks if c["choices"]]


async def test_text_stream() -> None:
    chunks = await collect(sse(START, {"type": "ping"}, *text_block(0, "Hello", "!"),
                               end("end_turn", 15), STOP))
    assert {c["id"] for c in chunks} == {"chatcmpl-msg_7"}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {MODEL}
    assert deltas(chunks) == [{"role": "assistant", "content": ""}, {"content": "Hello"},
                              {"content": "!"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, None, "stop"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 30, "completion_tokens": 15, "total_tokens": 45,
                                   "prompt_tokens_details": {"cached_tokens": 5,
                                                             "cache_write_tokens": 0}}


async def test_tool_stream_counts_tool_blocks_only() -> None:
    chunks = await collect(sse(
        START, *text_block(0, "Let me check."),
        *tool_block(1, "toolu_a", "weather", '{"city":', ' "Paris"}'),
        *tool_block(2, "toolu_b", "time", ""),
        end("tool_use", 40), STOP))
    tool_deltas = [d["tool_calls"][0] for d in deltas(chunks) if "tool_calls" in d]
    assert tool_deltas == [
        {"index": 0, "id": "toolu_a", "type": "function",
         "function": {"name": "weather", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"city":'}},
        {"index": 0, "function": {"arguments": ' "Paris"}'}},
        {"index": 1, "id": "toolu_b", "type": "function",
         "function": {"name": "time", "arguments": ""}},
    ]
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] == 40


async def test_stream_ignores_thinking_blocks_and_unknown_events() -> None:
    thinking = [{"type": "content_block_start", "index": 0,
                 "content_block": {"type": "thinking", "thinking": ""}},
                {"type": "content_block_delta", "index": 0,
                 "delta": {"type": "thinking_delta", "thinking": "hmm"}},
                {"type": "content_block_stop", "index": 0}]
    chunks = await collect(sse(START, *thinking, {"type": "brand_new_event"},
                               *text_block(1, "ok"), end("max_tokens", 3), STOP))
    assert deltas(chunks) == [{"role": "assistant", "content": ""}, {"content": "ok"}, {}]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


async def test_stream_handles_crlf_and_missing_type_in_data() -> None:
    lines = [b"event: message_start\r\n", b"data: " + orjson.dumps(START) + b"\r\n", b"\r\n",
             b"event: message_stop\r\n", b"data: {}\r\n", b"\r\n"]
    chunks = await collect(lines)
    assert chunks[-1]["usage"]["prompt_tokens"] == 30


async def test_stream_stops_reading_at_message_stop() -> None:
    chunks = await collect([*sse(START, end("end_turn", 1), STOP), b"data: not json\n"])
    assert "usage" in chunks[-1]


@pytest.mark.parametrize("events", [
    [START, *text_block(0, "Hel")],
    [START, *text_block(0, "Hello"), end("end_turn", 2)],
    [],
])
async def test_cut_stream_is_a_protocol_error(events: list[JSON]) -> None:
    with pytest.raises(UpstreamProtocolError, match="stream cut"):
        await collect(sse(*events))


async def test_unreadable_event_is_a_protocol_error() -> None:
    with pytest.raises(UpstreamProtocolError):
        await collect([*sse(START), b"data: {broken\n"])


@pytest.mark.parametrize(("etype", "status"), [
    ("overloaded_error", 503), ("rate_limit_error", 429), ("api_error", 500),
    ("invalid_request_error", 400),
])
async def test_error_event_raises_status_error(etype: str, status: int) -> None:
    error = {"type": "error", "error": {"type": etype, "message": "Overloaded"}}
    with pytest.raises(UpstreamStatusError) as info:
        await collect(sse(START, *text_block(0, "x"), error))
    assert info.value.status == status
    assert info.value.message == "anthropic: Overloaded"
    assert info.value.code == etype


# --- the HTTP call, against a Messages API on loopback ------------------------------------


class FakeMessagesAPI:
    """Records each request and answers with the next queued (status, headers, body)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], JSON]] = []
        self.replies: list[tuple[int, dict[str, str], bytes]] = []
        self.delay = 0.0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        seen = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append((request.path, seen, orjson.loads(await request.read())))
        status, headers, body = self.replies.pop(0)
        await asyncio.sleep(self.delay)
        return web.Response(status=status, headers=headers, body=body)


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeMessagesAPI, str]]:
    fake = FakeMessagesAPI()
    app = web.Application()
    app.router.add_post("/v1/messages", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


KEY = "sk-ant-secret-456"


def request(**body: Any) -> UpstreamRequest:
    return UpstreamRequest(MODEL, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                   **body}, timeout=5)


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
async def test_complete_posts_to_messages_with_headers(
        api: tuple[FakeMessagesAPI, str], session: aiohttp.ClientSession, suffix: str) -> None:
    fake, url = api
    fake.replies.append((200, {}, orjson.dumps(message([{"type": "text", "text": "yo"}]))))
    provider = AnthropicProvider("claude", base_url=url + suffix, api_key=KEY, session=session,
                                 default_max_tokens=77)
    done = await provider.complete(request(stream_options={"include_usage": True}))
    path, headers, body = fake.requests[0]
    assert path == "/v1/messages"
    assert headers["x-api-key"] == KEY
    assert headers["anthropic-version"] == "2023-06-01"
    assert headers["content-type"] == "application/json"
    assert body == {"model": MODEL, "max_tokens": 77,
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert done.body["choices"][0]["message"]["content"] == "yo"
    assert KEY not in repr(provider)


async def test_stream_over_http(api: tuple[FakeMessagesAPI, str],
                                session: aiohttp.ClientSession) -> None:
    fake, url = api
    fake.replies.append((200, {"content-type": "text/event-stream"},
                         b"".join(sse(START, *text_block(0, "hi"), end("end_turn", 2), STOP))))
    provider = AnthropicProvider("claude", base_url=url, api_key=KEY, session=session)
    chunks = [c.data async for c in provider.stream(request(stream=True))]
    assert fake.requests[0][2]["stream"] is True
    assert deltas(chunks)[1] == {"content": "hi"}
    assert chunks[-1]["usage"]["total_tokens"] == 32


async def test_error_status_is_relayed_with_retry_after(
        api: tuple[FakeMessagesAPI, str], session: aiohttp.ClientSession) -> None:
    fake, url = api
    body = {"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down"}}
    fake.replies.append((429, {"retry-after": "7"}, orjson.dumps(body)))
    provider = AnthropicProvider("claude", base_url=url, api_key=KEY, session=session)
    with pytest.raises(UpstreamStatusError) as info:
        await provider.complete(request())
    err = info.value
    assert (err.status, err.message, err.error_type) == (429, "anthropic: Slow down",
                                                         "rate_limit_error")
    assert err.retry_after == 7.0 and err.retryable and err.provider == "claude"
    assert KEY not in str(err.to_body())


async def test_overloaded_status_stays_retryable(
        api: tuple[FakeMessagesAPI, str], session: aiohttp.ClientSession) -> None:
    fake, url = api
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    fake.replies.append((529, {}, orjson.dumps(body)))
    provider = AnthropicProvider("claude", base_url=url, api_key=KEY, session=session)
    with pytest.raises(UpstreamStatusError) as info:
        [c async for c in provider.stream(request(stream=True))]
    assert (info.value.status, info.value.code, info.value.retryable) == (
        529, "overloaded_error", True)


async def test_untranslatable_request_is_refused_before_sending(
        api: tuple[FakeMessagesAPI, str], session: aiohttp.ClientSession) -> None:
    fake, url = api
    provider = AnthropicProvider("claude", base_url=url, api_key=KEY, session=session)
    with pytest.raises(UpstreamStatusError, match="n > 1"):
        await provider.complete(request(n=3))
    assert fake.requests == []


@pytest.mark.parametrize("stream", [False, True])
async def test_timeout_becomes_upstream_timeout(
        api: tuple[FakeMessagesAPI, str], session: aiohttp.ClientSession, stream: bool) -> None:
    fake, url = api
    fake.delay = 1.0
    fake.replies.append((200, {}, b"{}"))
    provider = AnthropicProvider("claude", base_url=url, api_key=KEY, session=session)
    slow = UpstreamRequest(MODEL, request().body, timeout=0.1)
    with pytest.raises(UpstreamTimeoutError):
        if stream:
            [c async for c in provider.stream(slow)]
        else:
            await provider.complete(slow)


async def test_refused_connection_becomes_connection_error(
        session: aiohttp.ClientSession) -> None:
    provider = AnthropicProvider("claude", base_url="http://127.0.0.1:1", api_key=KEY,
                                 session=session)
    with pytest.raises(UpstreamConnectionError) as info:
        await provider.complete(request())
    assert KEY not in info.value.message


async def test_stream_closed_early_releases_the_connection(
        api: tuple[FakeMessagesAPI, str], session: aiohttp.ClientSession) -> None:
    fake, url = api
    fake.replies.append((200, {"content-type": "text/event-stream"},
                         b"".join(sse(START, *text_block(0, "a", "b"), end("end_turn", 2), STOP))))
    provider = AnthropicProvider("claude", base_url=url, api_key=KEY, session=session)
    chunks = provider.stream(request(stream=True))
    first = await anext(chunks)
    await chunks.aclose()  # type: ignore[attr-defined]
    assert first.data["choices"][0]["delta"] == {"role": "assistant", "content": ""}


async def test_embeddings_are_not_supported(session: aiohttp.ClientSession) -> None:
    provider = AnthropicProvider("claude", base_url="http://127.0.0.1:9", api_key=KEY,
                                 session=session)
    with pytest.raises(UpstreamStatusError) as info:
        await provider.embed(request())
    assert (info.value.status, info.value.code) == (400, "unsupported_endpoint")
    await provider.close()


@pytest.mark.parametrize("fields", [
    {"temperature": []}, {"temperature": {"t": 1}}, {"tools": ["search"]}, {"stop": 5},
    {"messages": [{"role": "user", "content": [7]}]},
])
def test_a_field_of_the_wrong_shape_is_a_400_not_a_crash(fields: dict[str, object]) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    with pytest.raises(UpstreamStatusError) as caught:
        to_anthropic(body, "claude", 1024)
    assert caught.value.status == 400 and caught.value.error_type == "invalid_request_error"
