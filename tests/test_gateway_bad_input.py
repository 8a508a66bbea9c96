"""Bad input end to end: refused with a 400 that says what is wrong before anything reaches a
provider, and vendor errors relayed without what they must not carry."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import orjson
import pytest

from skinflint.server.run import BackgroundServer
from tests.conftest import GatewayFactory
from tests.fake_upstream import FakeUpstream

MSG = [{"role": "user", "content": "hello"}]


def _post(gw: BackgroundServer, body: Any, path: str = "/chat/completions") -> httpx.Response:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(gw.base_url + path, content=raw,
                      headers={"content-type": "application/json"}, timeout=30)


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err: dict[str, Any] = resp.json()["error"]
    assert set(err) >= {"message", "type", "code"}
    return err


@pytest.mark.parametrize("name", ["gpt-4o\n", "gpt-4o\r", "gpt\0-4o", "a\r\nx-evil: 1"])
def test_a_model_name_with_control_characters_is_refused_unbilled(
        gateway: BackgroundServer, fake: FakeUpstream, name: str) -> None:
    resp = _post(gateway, {"model": name, "messages": MSG})
    err = _error(resp, 400)
    assert err["code"] == "invalid_model" and "control characters" in err["message"]
    assert "x-evil" not in resp.headers
    assert fake.requests == []


def test_a_huge_model_name_is_refused_with_small_headers(gateway: BackgroundServer,
                                                         fake: FakeUpstream) -> None:
    resp = _post(gateway, {"model": "m" * (7 << 20), "messages": MSG})
    err = _error(resp, 400)
    assert err["code"] == "invalid_model" and "256" in err["message"]
    assert sum(len(k) + len(v) for k, v in resp.headers.items()) < 1024
    assert len(resp.content) < 1024
    assert fake.requests == []


@pytest.mark.parametrize("depth", [129, 300, 1000])
def test_deeply_nested_json_is_a_400_not_a_500(gateway: BackgroundServer, fake: FakeUpstream,
                                               depth: int) -> None:
    nested = b"[" * (depth - 1) + b"]" * (depth - 1)
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "metadata": ' + nested + b"}"
    err = _error(_post(gateway, body), 400)
    assert err["code"] == "too_deep" and "128 levels" in err["message"]
    assert fake.requests == []


@pytest.mark.parametrize(("fields", "code"), [
    ({"n": 0}, "invalid_n"), ({"n": 500}, "invalid_n"),
    ({"max_tokens": -5}, "invalid_max_tokens"),
    ({"max_completion_tokens": 0}, "invalid_max_completion_tokens"),
    ({"messages": [{"role": "narrator", "content": "x"}]}, "invalid_role"),
    ({"messages": MSG * 10_001}, "too_many_messages"),
])
def test_out_of_range_fields_are_refused_before_the_upstream(
        gateway: BackgroundServer, fake: FakeUpstream, fields: dict[str, Any], code: str) -> None:
    err = _error(_post(gateway, {"model": "gpt-4o-mini", "messages": MSG, **fields}), 400)
    assert err["code"] == code and err["type"] == "invalid_request_error"
    assert fake.requests == []


def test_the_sdk_sees_a_bad_request(client: openai.OpenAI, fake: FakeUpstream) -> None:
    with pytest.raises(openai.BadRequestError, match="'n' must be an integer from 1 to 128"):
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG, n=1000)  # type: ignore[arg-type]
    assert fake.requests == []


def test_a_429s_retry_after_reaches_the_client(client: openai.OpenAI,
                                               fake: FakeUpstream) -> None:
    fake.fail_next("status", times=1, status=429, retry_after=6.2)  # longer than backoff_max
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG, temperature=0)
    assert info.value.response.headers["retry-after"] == "7"
    assert len(fake.requests) == 1


def test_a_429s_retry_after_reaches_a_streaming_client(gateway: BackgroundServer,
                                                       fake: FakeUpstream) -> None:
    fake.fail_next("status", times=1, status=429, retry_after=9)
    resp = _post(gateway, {"model": "gpt-4o-mini", "messages": MSG, "stream": True})
    _error(resp, 429)
    assert resp.headers["retry-after"] == "9"


@pytest.mark.parametrize(("model", "status"), [
    ("gpt-4o-mini", 401), ("gpt-4o-mini", 403), ("claude-sonnet", 401),
])
def test_a_refused_gateway_credential_is_reported_without_vendor_text(
        gateway: BackgroundServer, fake: FakeUpstream, model: str, status: int) -> None:
    leak = "Incorrect API key provided: sk-upst****-123. Find your key at example.com."
    fake.fail_next("status", times=1, status=status, message=leak)
    err = _error(_post(gateway, {"model": model, "messages": MSG}), status)
    provider = "claude" if model.startswith("claude") else "fake"
    assert err["message"].endswith(
        f"the upstream rejected the gateway's credentials for provider {provider}")
    assert "sk-" not in err["message"] and "example.com" not in err["message"]


def test_key_like_text_in_other_vendor_errors_is_redacted(gateway: BackgroundServer,
                                                          fake: FakeUpstream) -> None:
    fake.fail_next("status", times=1, status=400,
                   message="bad request for key sk-proj-abcdef123456 (Authorization: Bearer tok.xyz)")
    err = _error(_post(gateway, {"model": "gpt-4o-mini", "messages": MSG}), 400)
    assert err["message"] == "fake: bad request for key [redacted] (Authorization: [redacted])"


def test_an_unknown_model_is_a_404_listing_the_valid_names(make_gateway: GatewayFactory,
                                                           fake: FakeUpstream) -> None:
    gw = make_gateway(default_provider=None)
    err = _error(_post(gw, {"model": "gpt-9", "messages": MSG}), 404)
    assert err["code"] == "model_not_found"
    assert "'gpt-9' is not configured" in err["message"] and "gpt-4o-mini" in err["message"]
    assert fake.requests == []
