"""Bad input, upstream faults and disconnects: clear OpenAI-shaped errors, nothing cached that
should not be, and a ledger row for every request that reached a provider."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import openai
import pytest

from skinflint.server.run import BackgroundServer
from tests.conftest import GatewayFactory, ledger_rows
from tests.fake_upstream import FakeUpstream

MSG = [{"role": "user", "content": "hello"}]


def _post(gw: BackgroundServer, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        gw.base_url + "/chat/completions",
        content=body,
        headers={"content-type": "application/json", **headers},
    )


def _assert_openai_error(resp: httpx.Response, status: int) -> dict[str, str]:
    assert resp.status_code == status
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "code"}
    return err  # type: ignore[no-any-return]


def test_malformed_json(gateway: BackgroundServer, fake: FakeUpstream) -> None:
    err = _assert_openai_error(_post(gateway, b"{not json"), 400)
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_json"
    assert fake.requests == []


def test_missing_fields(gateway: BackgroundServer) -> None:
    _assert_openai_error(_post(gateway, b'{"messages": []}'), 400)
    _assert_openai_error(_post(gateway, b'{"model": "gpt-4o", "messages": []}'), 400)
    _assert_openai_error(_post(gateway, b"[1, 2]"), 400)


def test_unknown_route(gateway: BackgroundServer) -> None:
    _assert_openai_error(httpx.get(gateway.base_url + "/nothing"), 404)


def test_oversized_body(gateway: BackgroundServer, fake: FakeUpstream) -> None:
    body = (
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "'
        + b"x" * (9 << 20)
        + b'"}]}'
    )
    err = _assert_openai_error(_post(gateway, body), 413)
    assert err["code"] == "request_too_large"
    assert fake.requests == []


def test_unknown_model_without_default_provider(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(default_provider=None)
    err = _assert_openai_error(
        _post(gw, b'{"model": "mystery", "messages": [{"role": "user", "content": "x"}]}'), 404
    )
    assert err["code"] == "model_not_found" and "mystery" in err["message"]


def test_a_model_name_cannot_inject_headers(make_gateway: GatewayFactory) -> None:
    """A name with control characters is refused; a printable one is echoed in
    x-skinflint-model, percent-encoded past ASCII."""
    gw = make_gateway(default_provider=None)
    resp = _post(gw, b'{"model": "x\\r\\nset-cookie: a=b \\u00e9", "messages": [{"role": "user", "content": "x"}]}')
    assert _assert_openai_error(resp, 400)["code"] == "invalid_model"
    assert "set-cookie" not in resp.headers
    resp = _post(gw, b'{"model": "x set-cookie: a=b \\u00e9", "messages": [{"role": "user", "content": "x"}]}')
    _assert_openai_error(resp, 404)
    assert resp.headers["x-skinflint-model"] == "x set-cookie: a=b %C3%A9"


def test_retries_5xx_then_succeeds(
    client: openai.OpenAI, fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.fail_next("status", times=2, status=503)
    done = client.chat.completions.create(model="gpt-4o-mini", messages=MSG, temperature=0)
    assert done.choices[0].message.content == "echo: hello"
    assert len(fake.requests) == 3
    assert ledger_rows(tmp_path / "skinflint.db", expect=1)[-1]["status"] == 200


def test_429_retry_after_is_honoured(client: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.fail_next("status", times=1, status=429, retry_after=0.3)
    started = time.monotonic()
    client.chat.completions.create(model="gpt-4o-mini", messages=MSG, temperature=0)
    assert time.monotonic() - started >= 0.3
    assert len(fake.requests) == 2


def test_retries_exhausted_relays_status(
    client: openai.OpenAI, fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.fail_next("status", times=3, status=429)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG, temperature=0)
    assert "sk-upstream-secret-123" not in str(info.value)
    assert len(fake.requests) == 3  # one try + two retries
    row = ledger_rows(tmp_path / "skinflint.db", expect=1)[-1]
    assert row["status"] == 429 and row["error_type"]


def test_client_error_is_not_retried(client: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.fail_next("status", times=1, status=400)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG, temperature=0)
    assert len(fake.requests) == 1


def test_errors_are_not_cached(client: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.fail_next("status", times=3, status=500)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG, temperature=0)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MSG, temperature=0
    )
    assert raw.headers["x-skinflint-cache"] == "miss"
    assert raw.parse().choices[0].message.content == "echo: hello"


def test_upstream_timeout(make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path) -> None:
    gw = make_gateway(fake_opts={"timeout": 0.3, "max_retries": 0})
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as c:
        with pytest.raises(openai.APIStatusError) as info:
            c.chat.completions.create(
                model="gpt-4o-mini",
                temperature=0,
                messages=[{"role": "user", "content": "[[fault:delay=2]]"}],
            )
    assert info.value.status_code == 504
    assert ledger_rows(tmp_path / "skinflint.db", expect=1)[-1]["status"] == 504


def test_fallback_to_next_model(client: openai.OpenAI, fake: FakeUpstream, tmp_path: Path) -> None:
    fake.fail_next("status", times=3, status=503)
    raw = client.chat.completions.with_raw_response.create(
        model="primary", messages=MSG, temperature=0
    )
    assert raw.headers["x-skinflint-model"] == "claude-3-5-haiku-latest"
    assert raw.parse().choices[0].message.content == "echo: hello"
    assert fake.requests[-1].path == "/v1/messages"
    row = ledger_rows(tmp_path / "skinflint.db", expect=1)[-1]
    assert row["provider"] == "claude" and row["status"] == 200


def test_malformed_upstream_body(client: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.fail_next("malformed", times=3)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG, temperature=0)
    assert info.value.status_code == 502


def test_cut_stream_is_an_error_and_not_cached(
    client: openai.OpenAI, fake: FakeUpstream, tmp_path: Path
) -> None:
    msg = [{"role": "user", "content": "a long answer [[fault:cut=2]]"}]
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(
            model="gpt-4o-mini", messages=msg, temperature=0, stream=True
        ):
            pass
    rows = ledger_rows(tmp_path / "skinflint.db", expect=1)
    assert rows[-1]["status"] >= 500
    fake.reset()
    # the same request again must reach the upstream: nothing was cached
    with pytest.raises(openai.APIError):
        list(
            client.chat.completions.create(
                model="gpt-4o-mini", messages=msg, temperature=0, stream=True
            )
        )
    assert len(fake.requests) == 1


def test_client_disconnect_cancels_upstream(
    gateway: BackgroundServer, fake: FakeUpstream, tmp_path: Path
) -> None:
    body = (
        b'{"model": "gpt-4o-mini", "temperature": 0, "messages": '
        b'[{"role": "user", "content": "slow [[fault:delay=3]]"}]}'
    )
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
            b"content-type: application/json\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        deadline = time.monotonic() + 3
        while not fake.requests and time.monotonic() < deadline:
            time.sleep(0.01)
    deadline = time.monotonic() + 3
    while fake.disconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.disconnects >= 1
    row = ledger_rows(tmp_path / "skinflint.db", expect=1)[-1]
    assert row["status"] == 499 and row["error_type"] == "client_disconnected"
