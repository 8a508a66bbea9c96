"""End to end through the official openai SDK: the gateway in front of a real fake upstream."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from skinflint.pricing import PriceCatalog
from skinflint.server.run import BackgroundServer
from tests.conftest import GatewayFactory, ledger_rows
from tests.fake_upstream import FakeUpstream

HEADERS = (
    "x-skinflint-request-id",
    "x-skinflint-cache",
    "x-skinflint-model",
    "x-skinflint-cost-usd",
    "x-skinflint-saved-usd",
    "x-skinflint-route",
)


def test_chat_completion_passes_through(client: openai.OpenAI, fake: FakeUpstream) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}], temperature=0
    )
    done = raw.parse()
    assert done.choices[0].message.content == "echo: hello there"
    assert done.usage is not None and done.usage.prompt_tokens > 0
    for name in HEADERS:
        assert raw.headers.get(name), name
    assert raw.headers["x-skinflint-cache"] == "miss"
    assert raw.headers["x-skinflint-model"] == "gpt-4o-mini"
    sent = fake.requests[-1]
    assert sent.body is not None and sent.body["model"] == "gpt-4o-mini"
    assert sent.headers["authorization"] == "Bearer sk-upstream-secret-123"  # not the client's key


def test_alias_maps_to_provider_model(client: openai.OpenAI, fake: FakeUpstream) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="cheap", messages=[{"role": "user", "content": "hi"}], temperature=0
    )
    assert fake.requests[-1].body["model"] == "qwen3-8b"  # type: ignore[index]
    assert raw.headers["x-skinflint-model"] == "qwen3-8b"
    assert raw.headers["x-skinflint-route"] == "cheap"


def test_stream_with_usage(client: openai.OpenAI, fake: FakeUpstream) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "stream me please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream me please"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_stream_without_usage_asks_upstream_but_hides_it(
    client: openai.OpenAI, fake: FakeUpstream, tmp_path: Path
) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "count my tokens"}],
            stream=True,
        )
    )
    assert all(c.usage is None for c in chunks)
    assert fake.requests[-1].body["stream_options"] == {"include_usage": True}  # type: ignore[index]
    row = ledger_rows(tmp_path / "skinflint.db", expect=1)[-1]
    assert row["output_tokens"] > 0 and row["cost_usd"] > 0


def test_tools_round_trip(client: openai.OpenAI) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    done = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=tools,
        tool_choice="auto",
    )  # type: ignore[arg-type]
    call = done.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert done.choices[0].finish_reason == "tool_calls"


def test_streamed_tool_calls_are_reassembled(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    args = ""
    for c in client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "weather?"}],
        tools=tools,
        stream=True,
    ):  # type: ignore[arg-type]
        for choice in c.choices:
            for tc in choice.delta.tool_calls or ():
                args += tc.function.arguments or ""  # type: ignore[union-attr]
    assert json.loads(args) == {"city": "Paris"}


def test_n_and_response_format(client: openai.OpenAI, fake: FakeUpstream) -> None:
    done = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "json please"}],
        n=2,
        response_format={"type": "json_object"},
        max_tokens=50,
    )
    assert len(done.choices) == 2
    assert json.loads(done.choices[0].message.content or "")["echo"]
    sent = fake.requests[-1].body
    assert sent is not None and sent["n"] == 2 and sent["max_tokens"] == 50


def test_embeddings_and_cache(client: openai.OpenAI, fake: FakeUpstream) -> None:
    first = client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["a", "b"]
    )
    again = client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["a", "b"]
    )
    assert len(first.parse().data) == 2
    assert first.headers["x-skinflint-cache"] == "miss"
    assert again.headers["x-skinflint-cache"] == "hit-exact"
    assert again.parse().data[0].embedding == first.parse().data[0].embedding
    assert sum(1 for r in fake.requests if r.path.endswith("/embeddings")) == 1


def test_embeddings_are_priced_and_their_hits_save(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """An embedding model has an input price only; a call costs its input, measured against
    the model asked for (a chat baseline would invent a saving), and a hit saves that cost."""
    price = PriceCatalog().price("text-embedding-3-small")
    assert price is not None and price.input > 0 and price.source.startswith("genai-prices")
    gw = make_gateway(baseline_model="gpt-4o")
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as c:
        first, again = (
            c.embeddings.with_raw_response.create(
                model="text-embedding-3-small", input=["a cat sat", "on the mat"]
            )
            for _ in range(2)
        )
    usage = first.parse().usage
    cost = usage.prompt_tokens * price.input / 1e6
    assert cost > 0 and again.headers["x-skinflint-cache"] == "hit-exact"
    assert float(first.headers["x-skinflint-cost-usd"]) == pytest.approx(cost, abs=1e-12)
    assert float(first.headers["x-skinflint-saved-usd"]) == 0
    assert float(again.headers["x-skinflint-cost-usd"]) == 0
    assert float(again.headers["x-skinflint-saved-usd"]) == pytest.approx(cost, abs=1e-12)
    miss, hit = ledger_rows(tmp_path / "skinflint.db", expect=2)
    assert miss["cost_usd"] == pytest.approx(cost) and miss["saved_usd"] == 0
    assert miss["baseline_cost_usd"] == pytest.approx(cost)
    assert hit["cost_usd"] == 0 and hit["saved_usd"] == pytest.approx(cost)


def test_models_and_health(gateway: BackgroundServer, client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"gpt-4o-mini", "cheap", "claude-sonnet"} <= ids
    assert httpx.get(gateway.root_url + "/health").json() == {"status": "ok", "ready": True}


def test_ledger_cost_is_catalog_price_times_tokens(client: openai.OpenAI, tmp_path: Path) -> None:
    done = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "price this answer"}], temperature=0
    )
    row = ledger_rows(tmp_path / "skinflint.db", expect=1)[-1]
    assert done.usage is not None
    assert row["input_tokens"] == done.usage.prompt_tokens
    assert row["output_tokens"] == done.usage.completion_tokens
    price = PriceCatalog().price("gpt-4o")
    assert price is not None and price.source.startswith("genai-prices")
    expected = (
        done.usage.prompt_tokens * price.input + done.usage.completion_tokens * price.output
    ) / 1e6
    assert row["cost_usd"] == pytest.approx(expected, rel=1e-9)
    assert len(row["request_hash"]) == 24
    assert row["model"] == "gpt-4o" and row["provider"] == "fake" and row["status"] == 200


def test_price_override_and_saving_against_baseline(make_gateway: object, tmp_path: Path) -> None:
    gw = make_gateway(baseline_model="gpt-4o")  # type: ignore[operator]
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as c:
        raw = c.chat.completions.with_raw_response.create(
            model="cheap", messages=[{"role": "user", "content": "a cheap question"}], temperature=0
        )
    usage = raw.parse().usage
    assert usage is not None
    cost = (usage.prompt_tokens * 0.01 + usage.completion_tokens * 0.02) / 1e6
    gpt4o = PriceCatalog().price("gpt-4o")
    assert gpt4o is not None
    baseline = (usage.prompt_tokens * gpt4o.input + usage.completion_tokens * gpt4o.output) / 1e6
    assert float(raw.headers["x-skinflint-cost-usd"]) == pytest.approx(cost, abs=1e-8)
    assert float(raw.headers["x-skinflint-saved-usd"]) == pytest.approx(baseline - cost, abs=1e-8)
    row = ledger_rows(tmp_path / "skinflint.db", expect=1)[-1]
    assert row["baseline_cost_usd"] == pytest.approx(baseline)


def test_unknown_price_is_recorded_not_fatal(
    client: openai.OpenAI, tmp_path: Path, gateway: BackgroundServer
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="house-model-7b", messages=[{"role": "user", "content": "hi"}], temperature=0
    )
    assert raw.headers["x-skinflint-cost-usd"] == "unknown"
    row = ledger_rows(tmp_path / "skinflint.db", expect=1)[-1]
    assert row["cost_usd"] is None and row["status"] == 200
    metrics = httpx.get(gateway.root_url + "/metrics").text
    # a name only the client chose is counted, under one label for all such names
    assert 'skinflint_unknown_price_total{model="other"} 1.0' in metrics
