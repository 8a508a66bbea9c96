"""The per-provider circuit breaker end to end: the real gateway, the fake upstream failing on
demand, the official SDK, and the breaker's state in ``/metrics``."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from skinflint.config import settings_from_dict
from skinflint.errors import ConfigError
from skinflint.server.run import BackgroundServer
from tests.conftest import PromptServer, base_config, ledger_rows
from tests.fake_upstream import FakeUpstream

CHAT, MESSAGES = "/v1/chat/completions", "/v1/messages"
MSG = [{"role": "user", "content": "hello"}]
COOLDOWN = 0.5


@pytest.fixture
def server(fake: FakeUpstream, tmp_path: Path) -> Iterator[BackgroundServer]:
    config = base_config(fake, tmp_path / "skinflint.db",
                         fake_opts={"max_retries": 0,
                                    "breaker": {"failures": 2, "cooldown": COOLDOWN}})
    with BackgroundServer(settings_from_dict(config, env={}), server_class=PromptServer) as gw:
        yield gw


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0, timeout=10) as c:
        yield c


def _metric(server: BackgroundServer, name: str) -> float | None:
    text = httpx.get(server.root_url + "/metrics").text
    found = re.search(rf'^{name}{{provider="fake"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else None


def _state(server: BackgroundServer) -> float | None:
    return _metric(server, "skinflint_provider_circuit_state")


def _ask(client: openai.OpenAI, model: str = "gpt-4o-mini") -> Any:
    return client.chat.completions.with_raw_response.create(model=model, messages=MSG)


def _open(client: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.fail_next("status", times=2, status=500)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            _ask(client)
    assert len(fake.calls(CHAT)) == 2


def test_it_opens_after_n_failures_and_fails_fast_without_calling(
    server: BackgroundServer, client: openai.OpenAI, fake: FakeUpstream, tmp_path: Path
) -> None:
    assert _state(server) == 0
    _open(client, fake)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        _ask(client)
    assert time.monotonic() - started < COOLDOWN
    response = caught.value.response
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "upstream_unavailable" and set(error) >= {"message", "type"}
    assert response.headers["retry-after"] == "1"  # the cool-down left, rounded up
    assert len(fake.calls(CHAT)) == 2  # the upstream heard nothing more
    assert _state(server) == 1
    assert _metric(server, "skinflint_provider_circuit_opened_total") == 1
    row = ledger_rows(tmp_path / "skinflint.db", expect=3)[-1]
    assert (row["status"], row["error_type"]) == (503, "upstream_unavailable")


def test_an_open_provider_falls_back_to_the_next_target(
    client: openai.OpenAI, fake: FakeUpstream
) -> None:
    _open(client, fake)
    raw = _ask(client, "primary")
    assert raw.headers["x-skinflint-model"] == "claude-3-5-haiku-latest"
    assert len(fake.calls(CHAT)) == 2 and len(fake.calls(MESSAGES)) == 1


def test_after_the_cooldown_one_probe_closes_it_on_success(
    server: BackgroundServer, client: openai.OpenAI, fake: FakeUpstream
) -> None:
    _open(client, fake)
    time.sleep(COOLDOWN + 0.1)
    assert _ask(client).parse().choices[0].message.content == "echo: hello"
    assert len(fake.calls(CHAT)) == 3 and _state(server) == 0
    fake.fail_next("status", times=1, status=500)  # closed: one failure does not open it
    with pytest.raises(openai.InternalServerError):
        _ask(client)
    _ask(client)
    assert len(fake.calls(CHAT)) == 5


def test_a_failed_probe_opens_it_for_another_cooldown(
    server: BackgroundServer, client: openai.OpenAI, fake: FakeUpstream
) -> None:
    _open(client, fake)
    time.sleep(COOLDOWN + 0.1)
    fake.fail_next("status", times=1, status=502)
    with pytest.raises(openai.APIStatusError) as caught:
        _ask(client)
    assert caught.value.status_code == 502 and len(fake.calls(CHAT)) == 3
    with pytest.raises(openai.APIStatusError) as caught:
        _ask(client)
    assert caught.value.status_code == 503 and len(fake.calls(CHAT)) == 3
    assert _metric(server, "skinflint_provider_circuit_opened_total") == 2


def test_client_errors_and_rate_limits_do_not_open_it(
    client: openai.OpenAI, fake: FakeUpstream
) -> None:
    fake.fail_next("status", times=2, status=400)
    fake.fail_next("status", times=2, status=429)
    for _ in range(4):
        with pytest.raises(openai.APIStatusError):
            _ask(client)
    _ask(client)
    assert len(fake.calls(CHAT)) == 5


@pytest.mark.parametrize(("breaker", "key"), [
    ({"failures": -1}, "providers.fake.breaker.failures"),
    ({"cooldown": 0}, "providers.fake.breaker.cooldown"),
    ({"cooldwn": 3}, "providers.fake.breaker.cooldwn"),
])
def test_a_bad_setting_names_its_key(
    fake: FakeUpstream, tmp_path: Path, breaker: dict[str, Any], key: str
) -> None:
    config = base_config(fake, tmp_path / "x.db", fake_opts={"breaker": breaker})
    with pytest.raises(ConfigError, match=re.escape(key)):
        settings_from_dict(config, env={})


def test_failures_zero_turns_it_off(fake: FakeUpstream, tmp_path: Path) -> None:
    config = base_config(fake, tmp_path / "skinflint.db",
                         fake_opts={"max_retries": 0, "breaker": {"failures": 0}})
    with BackgroundServer(settings_from_dict(config, env={})) as gw, \
            openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as c:
        fake.fail_next("status", times=8, status=503)
        for _ in range(8):
            with pytest.raises(openai.APIStatusError):
                _ask(c)
        _ask(c)
        assert len(fake.calls(CHAT)) == 9
        assert _state(gw) is None
