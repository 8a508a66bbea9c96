"""Property-based: whatever a client sends, the running gateway answers in bounded time, never
with a 5xx, and every error is OpenAI-shaped (the document's ``Error`` schema); a body outside
the document's request schema is refused without reaching the upstream."""

from __future__ import annotations

import time
from typing import Any

import httpx
import jsonschema
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skinflint.pipeline.attribute import ROLES
from skinflint.server.openapi import openapi_document
from tests.conftest import GatewayFactory
from tests.fake_upstream import FakeUpstream


def _validator(name: str) -> jsonschema.Draft202012Validator:
    """A validator for one of the document's schemas, its references resolved in place."""
    document = openapi_document()
    return jsonschema.Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": document["components"]})


ERROR = _validator("Error")
REQUESTS = {"/chat/completions": _validator("ChatCompletionRequest"),
            "/embeddings": _validator("EmbeddingRequest")}
SECONDS = 5.0  # per request; the fake upstream answers in milliseconds

scalars = (st.none() | st.booleans() | st.integers(-(2**40), 2**40)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
models = (st.sampled_from(["gpt-4o-mini", "cheap", "claude-sonnet", "primary", "unknown-x"])
          | st.text(max_size=40) | values)
roles = st.sampled_from(sorted(ROLES)) | st.text(max_size=8)
contents = st.text(max_size=60) | values
messages = st.lists(st.fixed_dictionaries(
    {"role": roles}, optional={"content": contents, "name": st.text(max_size=8)}), max_size=4)
counts = st.integers(-3, 200) | values
chat_bodies = st.fixed_dictionaries(
    {"model": models, "messages": messages | values},
    optional={"n": counts, "max_tokens": counts, "max_completion_tokens": counts,
              "stream": st.booleans() | values, "stream_options": values,
              "temperature": st.floats(0, 2) | values, "metadata": values, "user": values,
              "tools": values, "response_format": values})
embed_bodies = st.fixed_dictionaries(
    {"model": models}, optional={"input": st.text(max_size=30) | values})
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12).map(str.strip)
headers = st.fixed_dictionaries({}, optional={
    "x-skinflint-cache": st.sampled_from(["default", "bypass", "refresh"]) | header_text,
    "x-skinflint-task": header_text, "x-skinflint-tags": header_text,
    "x-skinflint-feature": header_text})
requests = st.one_of(
    st.tuples(st.just("/chat/completions"), chat_bodies.map(orjson.dumps), headers),
    st.tuples(st.just("/embeddings"), embed_bodies.map(orjson.dumps), headers),
    st.tuples(st.sampled_from(["/chat/completions", "/embeddings"]),
              st.binary(max_size=64), headers),
)


def _check_stream(text: str) -> None:
    """A 200 stream ends in ``[DONE]`` or in one OpenAI-shaped error event."""
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events, text
    if events[-1] != "[DONE]":
        assert ERROR.is_valid(orjson.loads(events[-1])), events[-1]
    for event in events[:-1]:
        assert isinstance(orjson.loads(event), dict)


def _check(resp: httpx.Response, elapsed: float) -> None:
    assert elapsed < SECONDS
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        assert resp.headers["content-type"] == "application/json"
        assert ERROR.is_valid(resp.json()), resp.text
    elif resp.headers["content-type"] == "text/event-stream":
        _check_stream(resp.text)
    else:
        assert isinstance(resp.json(), dict)


def _outside_schema(path: str, body: bytes) -> bool:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return True
    return not REQUESTS[path].is_valid(parsed)


def test_any_request_gets_a_bounded_openai_shaped_answer(make_gateway: GatewayFactory,
                                                         fake: FakeUpstream) -> None:
    gw = make_gateway(fake_opts={"max_retries": 0})
    with httpx.Client(base_url=gw.base_url, timeout=SECONDS) as client:

        @settings(max_examples=200, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(requests)
        def probe(request: tuple[str, bytes, dict[str, Any]]) -> None:
            path, body, extra = request
            sent = len(fake.requests)
            started = time.monotonic()
            resp = client.post(path, content=body,
                               headers={"content-type": "application/json", **extra})
            _check(resp, time.monotonic() - started)
            if _outside_schema(path, body):
                assert resp.status_code == 400, resp.text
                assert len(fake.requests) == sent

        probe()
