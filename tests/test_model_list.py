"""GET /v1/models: configured names plus the default upstream's list, cached, key-guarded."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest

from skinflint.config import Settings, settings_from_dict
from skinflint.errors import UpstreamError
from skinflint.providers.anthropic import AnthropicProvider
from skinflint.providers.http import new_session
from skinflint.providers.openai_compat import OpenAICompatProvider
from skinflint.server.model_list import RETRY_SECONDS, ModelList
from skinflint.server.run import BackgroundServer
from tests.conftest import GatewayFactory, PromptServer
from tests.fake_upstream import MODELS, FakeUpstream


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _zero_config(base_url: str, tmp_path: Path) -> Settings:
    """No configuration: one upstream from the environment, as `skinflint serve` starts."""
    env = {"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "sk-upstream-env"}
    return settings_from_dict({"storage": {"sqlite_path": str(tmp_path / "s.db")}}, env=env)


@pytest.fixture
def zero_config_gateway(fake: FakeUpstream, tmp_path: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer(_zero_config(fake.base_url, tmp_path), server_class=PromptServer) as gw:
        yield gw


def test_without_configuration_the_upstream_list_is_served_and_cached(
    zero_config_gateway: BackgroundServer, fake: FakeUpstream
) -> None:
    with openai.OpenAI(base_url=zero_config_gateway.base_url, api_key="client-key") as c:
        first = [m.id for m in c.models.list()]
        again = [m.id for m in c.models.list()]
    assert first == again == list(MODELS)
    calls = fake.calls("/v1/models")
    assert len(calls) == 1  # the second answer came from the gateway's copy
    assert calls[0].headers["authorization"] == "Bearer sk-upstream-env"  # not the client's


def test_configured_names_come_first_and_are_listed_once(
    client: openai.OpenAI, fake: FakeUpstream
) -> None:
    models = {m.id: m for m in client.models.list()}
    ids = [m.id for m in client.models.list()]
    assert len(ids) == len(set(ids))
    assert ids[:6] == ["gpt-4o-mini", "gpt-4o", "cheap", "claude-sonnet", "primary", "backup"]
    assert models["claude-sonnet"].owned_by == "claude"  # the configured entry, not upstream's
    assert {"text-embedding-3-small", "qwen3-8b"} <= set(ids)  # passed through to the default


def test_without_a_default_provider_only_configured_names(
    make_gateway: GatewayFactory, fake: FakeUpstream
) -> None:
    gw = make_gateway(default_provider=None, routes={
        "auto": {"tasks": {"default": {"model": "cheap"}}}})
    with openai.OpenAI(base_url=gw.base_url, api_key="k") as c:
        ids = [m.id for m in c.models.list()]
    assert ids == ["gpt-4o-mini", "gpt-4o", "cheap", "claude-sonnet", "primary", "backup", "auto"]
    assert fake.calls("/v1/models") == []


def test_gateway_keys_are_required(make_gateway: GatewayFactory, fake: FakeUpstream) -> None:
    gw = make_gateway(keys=[{"tenant": "acme", "key": "gw-key-acme"}])
    with openai.OpenAI(base_url=gw.base_url, api_key="gw-key-globex", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError) as caught:
            c.models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    missing = httpx.get(gw.base_url + "/models")
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    assert fake.calls("/v1/models") == []
    with openai.OpenAI(base_url=gw.base_url, api_key="gw-key-acme") as c:
        assert "text-embedding-3-small" in {m.id for m in c.models.list()}


def test_upstream_down_with_nothing_configured_is_a_502(tmp_path: Path) -> None:
    settings = _zero_config(f"http://127.0.0.1:{_closed_port()}/v1", tmp_path)
    with BackgroundServer(settings, server_class=PromptServer) as gw:
        resp = httpx.get(gw.base_url + "/models")
    assert resp.status_code == 502
    error = resp.json()["error"]
    assert error["code"] == "upstream_models_unavailable" and error["type"] == "upstream_error"
    assert "cannot list the upstream's models" in error["message"]


def test_upstream_failure_serves_the_configured_names(
    client: openai.OpenAI, fake: FakeUpstream
) -> None:
    fake.fail_next("status=500")
    ids = [m.id for m in client.models.list()]
    assert ids == ["gpt-4o-mini", "gpt-4o", "cheap", "claude-sonnet", "primary", "backup"]


# ---- the cache, on the real provider against the fake upstream


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    s = new_session()
    yield s
    await s.close()


def _model_list(fake: FakeUpstream, session: aiohttp.ClientSession, clock: Clock,
                **config: Any) -> ModelList:
    settings = settings_from_dict({"providers": {"up": {"base_url": fake.base_url}},
                                   "default_provider": "up", **config}, env={})
    provider = OpenAICompatProvider("up", base_url=fake.base_url, api_key="k", session=session)
    return ModelList(settings, {"up": provider}, clock=clock)


async def test_the_list_is_fetched_once_a_minute(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    clock = Clock()
    models = _model_list(fake, session, clock)
    answers = await asyncio.gather(*(models.data() for _ in range(5)))
    assert all([m["id"] for m in a] == list(MODELS) for a in answers)
    assert len(fake.calls("/v1/models")) == 1  # one request for five clients
    clock.now += 59
    await models.data()
    assert len(fake.calls("/v1/models")) == 1
    clock.now += 2
    await models.data()
    assert len(fake.calls("/v1/models")) == 2


async def test_a_failed_refresh_serves_the_last_list(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    clock = Clock()
    models = _model_list(fake, session, clock)
    before = await models.data()
    clock.now += 61
    fake.fail_next("status=503")
    assert await models.data() == before  # stale rather than nothing
    clock.now += RETRY_SECONDS / 2
    assert await models.data() == before
    assert len(fake.calls("/v1/models")) == 2  # not asked again straight away
    clock.now += RETRY_SECONDS
    assert await models.data() == before
    assert len(fake.calls("/v1/models")) == 3


async def test_nothing_known_raises_until_the_upstream_answers(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    clock = Clock()
    models = _model_list(fake, session, clock)
    fake.fail_next("status=401")
    with pytest.raises(UpstreamError) as caught:
        await models.data()
    assert caught.value.status == 502 and caught.value.code == "upstream_models_unavailable"
    clock.now += RETRY_SECONDS
    assert [m["id"] for m in await models.data()] == list(MODELS)


async def test_an_anthropic_list_is_translated(
    fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    provider = AnthropicProvider("claude", base_url=fake.root_url, api_key="k", session=session)
    found = await provider.list_models(5.0)
    assert found == [
        {"id": name, "object": "model", "created": 1729555200, "owned_by": "anthropic"}
        for name in MODELS if name.startswith("claude")
    ]
    assert fake.calls("/v1/models")[0].headers["x-api-key"] == "k"
