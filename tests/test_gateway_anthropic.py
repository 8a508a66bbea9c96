"""OpenAI clients talking to an Anthropic upstream through the gateway."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from tests.conftest import ledger_rows
from tests.fake_upstream import FakeUpstream

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def test_chat_via_anthropic(client: openai.OpenAI, fake: FakeUpstream, tmp_path: Path) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="claude-sonnet",
        temperature=0,
        max_tokens=100,
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello claude"},
        ],
    )
    done = raw.parse()
    assert done.choices[0].message.content == "echo: hello claude"
    assert done.choices[0].finish_reason == "stop"
    sent = fake.requests[-1]
    assert sent.path == "/v1/messages" and sent.body is not None
    assert sent.body["system"] == "be brief" and sent.body["model"] == "claude-3-5-sonnet-latest"
    assert sent.headers["x-api-key"] == "sk-ant-secret-456"
    assert raw.headers["x-skinflint-model"] == "claude-3-5-sonnet-latest"
    row = ledger_rows(tmp_path / "skinflint.db", expect=1)[-1]
    assert done.usage is not None and row["input_tokens"] == done.usage.prompt_tokens
    assert row["cost_usd"] > 0  # priced from the catalog


def test_stream_via_anthropic(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="claude-sonnet",
            messages=[{"role": "user", "content": "stream from claude"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream from claude"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_tools_via_anthropic(client: openai.OpenAI, fake: FakeUpstream) -> None:
    done = client.chat.completions.create(
        model="claude-sonnet",
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=TOOLS,
    )  # type: ignore[arg-type]
    call = done.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert done.choices[0].finish_reason == "tool_calls"
    assert fake.requests[-1].body["tools"][0]["input_schema"]["type"] == "object"  # type: ignore[index]


def test_anthropic_errors_are_openai_shaped(client: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.fail_next("status", times=1, status=400)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="claude-sonnet", messages=[{"role": "user", "content": "x"}]
        )
    assert "sk-ant-secret-456" not in str(info.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="claude-sonnet", n=2, messages=[{"role": "user", "content": "x"}]
        )
