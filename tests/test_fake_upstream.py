"""The fake upstream speaks the wire formats the official SDKs expect, and breaks on request."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest
from anthropic.types import MessageParam, ToolParam
from openai.types.chat import ChatCompletionFunctionToolParam, ChatCompletionMessageParam

from tests.fake_upstream import FakeUpstream, Fault

WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function", "function": {"name": "get_weather", "parameters": {}}}
CLAUDE = "claude-haiku-4-5"  # a name the anthropic SDK does not warn about


@pytest.fixture(scope="module")
def server() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeUpstream) -> FakeUpstream:
    server.reset()
    return server


@pytest.fixture
def oai(fake: FakeUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0,
                       timeout=5) as client:
        yield client


@pytest.fixture
def claude(fake: FakeUpstream) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=fake.root_url, api_key="sk-ant-test", max_retries=0,
                             timeout=5) as client:
        yield client


def ask(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


def say(text: str) -> list[MessageParam]:
    return [{"role": "user", "content": text}]


def test_chat_echoes_counts_and_records(fake: FakeUpstream, oai: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello there [[cached=4]]"}]}]
    reply = oai.chat.completions.create(model="gpt-4o-mini", messages=messages, n=2)
    assert reply.id.startswith("chatcmpl-fake-") and reply.model == "gpt-4o-mini"
    assert [c.message.content for c in reply.choices] == [
        "echo: hello there [[cached=4]]", "echo: hello there [[cached=4]] #1"]
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (2 + 3 + 3 + 3, 4 + 5)
    assert reply.usage.prompt_tokens_details.cached_tokens == 4
    (recorded,) = fake.calls()
    assert recorded.headers["authorization"] == "Bearer sk-test"
    assert recorded.body is not None and recorded.body["n"] == 2


def test_stream_with_usage(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(model="m", messages=ask("one two three"), stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: one two three"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


def test_queued_fault_then_recovery(fake: FakeUpstream, oai: openai.OpenAI) -> None:
    fake.fail_next("status=500")
    with pytest.raises(openai.InternalServerError):
        oai.chat.completions.create(model="m", messages=ask("hi"))
    assert oai.chat.completions.create(model="m", messages=ask("hi")).choices[0].message.content


def test_answers_scripted_per_model_until_reset(fake: FakeUpstream, oai: openai.OpenAI,
                                                claude: anthropic.Anthropic) -> None:
    fake.answer_as("small", "B")
    fake.answer_as(CLAUDE, "C because")
    small = oai.chat.completions.create(model="small", messages=ask("pick one"), n=2)
    assert [c.message.content for c in small.choices] == ["B", "B #1"]
    assert small.usage is not None and small.usage.completion_tokens == 1 + 2
    other = oai.chat.completions.create(model="large", messages=ask("pick one"))
    assert other.choices[0].message.content == "echo: pick one"
    message = claude.messages.create(model=CLAUDE, max_tokens=50, messages=say("pick one"))
    assert message.content[0].type == "text" and message.content[0].text == "C because"
    fake.reset()
    again = oai.chat.completions.create(model="small", messages=ask("pick one"))
    assert again.choices[0].message.content == "echo: pick one"


def test_marker_rate_limit_carries_retry_after(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        oai.chat.completions.create(model="m",
                                    messages=ask("hi [[fault:status=429,retry_after=2]]"))
    assert caught.value.response.headers["retry-after"] == "2"
    assert caught.value.code == "rate_limit_exceeded"


def test_tool_call_and_truncation(oai: openai.OpenAI) -> None:
    called = oai.chat.completions.create(model="m", messages=ask("weather in Paris?"),
                                         tools=[WEATHER_TOOL])
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    function = call.function
    assert (function.name, json.loads(function.arguments)) == ("get_weather", {"city": "Paris"})
    short = oai.chat.completions.create(model="m", messages=ask("a b c d e"), max_tokens=2)
    answer = short.choices[0]
    assert (answer.message.content, answer.finish_reason) == ("echo: a", "length")


def test_stream_tool_call_deltas(oai: openai.OpenAI) -> None:
    chunks = list(oai.chat.completions.create(model="m", messages=ask("weather?"), stream=True,
                                              tools=[WEATHER_TOOL]))
    calls = [d.tool_calls[0] for c in chunks if (d := c.choices[0].delta).tool_calls]
    assert calls[0].id == "call_1" and calls[0].function is not None
    assert "".join(c.function.arguments or "" for c in calls if c.function) == '{"city": "Paris"}'


def test_cut_stream_drops_without_done(fake: FakeUpstream) -> None:
    body = {"model": "m", "stream": True, "messages": ask("a b c d e f [[fault:cut=3]]")}
    received: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream(
            "POST", f"{fake.base_url}/chat/completions", json=body, timeout=5) as response:
        received.extend(line for line in response.iter_lines() if line)
    assert len(received) == 3 and "data: [DONE]" not in received


def test_cut_and_malformed_plain_answers(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        oai.chat.completions.create(model="m", messages=ask("hi [[fault:cut=10]]"))
    with pytest.raises(json.JSONDecodeError):
        oai.chat.completions.create(model="m", messages=ask("hi [[fault:malformed]]"))


def test_no_usage_even_when_asked(fake: FakeUpstream, oai: openai.OpenAI) -> None:
    fake.fail_next(Fault(no_usage=True), times=2)
    assert oai.chat.completions.create(model="m", messages=ask("hi")).usage is None
    chunks = list(oai.chat.completions.create(model="m", messages=ask("hi"), stream=True,
                                              stream_options={"include_usage": True}))
    assert all(c.usage is None for c in chunks) and chunks[-1].choices


def test_client_timeout_counts_a_disconnect(fake: FakeUpstream) -> None:
    with openai.OpenAI(base_url=fake.base_url, api_key="k", max_retries=0,
                       timeout=0.2) as impatient:
        with pytest.raises(openai.APITimeoutError):
            impatient.chat.completions.create(model="m", messages=ask("hi [[fault:delay=3]]"))
    assert fake.wait_for_disconnects(1)


def test_client_leaving_a_slow_stream_counts_a_disconnect(fake: FakeUpstream) -> None:
    body = {"model": "m", "stream": True, "messages": ask("a b c d [[fault:chunk_delay=0.2]]")}
    with httpx.stream("POST", f"{fake.base_url}/chat/completions", json=body, timeout=5) as r:
        next(r.iter_lines())
    assert fake.wait_for_disconnects(1)


def test_embeddings_are_deterministic(oai: openai.OpenAI) -> None:
    first = oai.embeddings.create(model="text-embedding-3-small", input=["a cat", "a dog"])
    again = oai.embeddings.create(model="text-embedding-3-small", input="a cat")
    assert len(first.data[0].embedding) == 8
    assert first.data[0].embedding == again.data[0].embedding != first.data[1].embedding
    assert first.usage.prompt_tokens == 4
    packed = oai.embeddings.create(model="e", input="a cat", encoding_format="base64")
    raw = base64.b64decode(str(packed.data[0].embedding))
    assert struct.unpack("<8f", raw) == pytest.approx(first.data[0].embedding, rel=1e-6)
    assert "gpt-4o-mini" in [model.id for model in oai.models.list()]


def test_anthropic_message(fake: FakeUpstream, claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model=CLAUDE, max_tokens=50, system="be brief",
                                     messages=say("hello [[cached=3]]"))
    assert message.id.startswith("msg_fake_") and message.stop_reason == "end_turn"
    block = message.content[0]
    assert block.type == "text" and block.text == "echo: hello [[cached=3]]"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (7 - 3, 3)
    assert fake.calls("/v1/messages")[0].headers["anthropic-version"]


def test_usage_markers(oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    text = "hi there [[cached=2]] [[cache_write=3]] [[audio_in=1]] [[reasoning=5]] [[audio_out=4]]"
    done = oai.chat.completions.create(model="o3-mini", messages=[{"role": "user", "content": text}])
    usage = done.usage
    assert usage is not None and usage.prompt_tokens_details and usage.completion_tokens_details
    answer_words = len((done.choices[0].message.content or "").split())
    assert (usage.prompt_tokens, usage.completion_tokens) == (10, answer_words + 5 + 4)
    assert usage.prompt_tokens_details.model_dump(exclude_none=True) == {
        "cached_tokens": 2, "cache_write_tokens": 3, "audio_tokens": 1}
    assert (usage.completion_tokens_details.reasoning_tokens,
            usage.completion_tokens_details.audio_tokens) == (5, 4)
    message = claude.messages.create(model=CLAUDE, max_tokens=50, messages=say(text))
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens,
            message.usage.cache_creation_input_tokens) == (10 - 2 - 3, 2, 3)


def test_anthropic_stream_text_and_tool(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model=CLAUDE, max_tokens=50, messages=say("a b c")) as stream:
        assert "".join(stream.text_stream) == "echo: a b c"
        final = stream.get_final_message()
    assert final.usage.output_tokens == 4 and final.stop_reason == "end_turn"
    tools: list[ToolParam] = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    with claude.messages.stream(model=CLAUDE, max_tokens=50, messages=say("weather?"),
                                tools=tools) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[0].type == "tool_use"
    assert final.content[0].input == {"city": "Paris"}


def test_anthropic_raw_events_and_errors(fake: FakeUpstream, claude: anthropic.Anthropic) -> None:
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    body = {"model": CLAUDE, "max_tokens": 50, "stream": True, "messages": say("hi")}
    answer = httpx.post(f"{fake.root_url}/v1/messages", json=body, headers=headers, timeout=5)
    events = [line[7:] for line in answer.text.splitlines() if line.startswith("event: ")]
    assert events[:3] == ["message_start", "content_block_start", "ping"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    fake.fail_next("status", status=529)
    with pytest.raises(anthropic.APIStatusError) as caught:
        claude.messages.create(model=CLAUDE, max_tokens=5, messages=say("hi"))
    assert caught.value.status_code == 529
    assert caught.value.body == {
        "type": "error", "error": {"type": "overloaded_error", "message": "injected fault"}}


def test_fault_parsing() -> None:
    assert Fault.parse("status=429,retry_after=1.5") == Fault(status=429, retry_after=1.5)
    assert Fault.parse("cut", cut=4) == Fault(cut=4)
    assert Fault.parse("no_usage,length") == Fault(no_usage=True, length=True)
    with pytest.raises(ValueError, match="unknown fault"):
        Fault.parse("explode")


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"model": "m", "messages": ask("hi"), "response_format": 1.5}),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": 3}],
                              "stream": True, "stream_options": 2}),
])
def test_a_field_of_the_wrong_type_is_a_400_as_from_a_real_vendor(
        fake: FakeUpstream, path: str, body: dict[str, object]) -> None:
    resp = httpx.post(fake.root_url + path, json=body)
    assert resp.status_code == 400
    assert resp.json()["error"]["message"].startswith("invalid request: ")
