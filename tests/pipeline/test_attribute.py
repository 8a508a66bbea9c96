"""Stage 1, attribute, through its one call: who the request is for and what it asks."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
import pytest

from skinflint.errors import AuthenticationError, RequestError
from skinflint.models import CacheBypass
from skinflint.pipeline.attribute import UNAUTHENTICATED, Attribute
from skinflint.pipeline.context import MISS, CacheDecision, RequestContext
from tests.pipeline.parts import Recorder, chat

KEYS = {hashlib.sha256(b"sk-acme").hexdigest(): "acme",
        hashlib.sha256(b"sk-globex").hexdigest(): "globex"}


def _arrived(body: Any = None, endpoint: str = "chat", **headers: str) -> RequestContext:
    """A request as the gateway hands it to the pipeline: raw bytes and headers only."""
    raw = body if isinstance(body, bytes) else orjson.dumps(chat() if body is None else body)
    return RequestContext("r", 0.0, 0.0, endpoint, raw, headers)


async def _attribute(ctx: RequestContext, keys: dict[str, str] | None = None) -> RequestContext:
    after = Recorder()
    await Attribute(keys or {})(ctx, after)
    assert after.seen == [ctx]
    return ctx


@pytest.mark.parametrize(("authorization", "tenant"), [
    ("Bearer sk-acme", "acme"), ("Bearer sk-globex", "globex"), ("bearer  sk-acme ", "acme"),
])
async def test_the_tenant_is_the_one_whose_key_hash_matches(authorization: str,
                                                           tenant: str) -> None:
    ctx = await _attribute(_arrived(authorization=authorization), KEYS)
    assert ctx.tenant == tenant


@pytest.mark.parametrize("headers", [
    {}, {"authorization": "Bearer sk-other"}, {"authorization": "sk-acme"},
    {"authorization": "Bearer "}, {"authorization": "Basic sk-acme"},
])
async def test_without_a_known_key_the_request_goes_no_further(headers: dict[str, str]) -> None:
    after = Recorder()
    ctx = _arrived(b"not json", **headers)
    with pytest.raises(AuthenticationError):
        await Attribute(KEYS)(ctx, after)  # checked before parsing
    assert not after.called
    assert ctx.tenant == UNAUTHENTICATED != "default"  # never counted under a real tenant


async def test_with_no_keys_configured_every_request_is_the_default_tenant() -> None:
    ctx = await _attribute(_arrived(authorization="Bearer anything"))
    assert ctx.tenant == "default"


async def test_feature_and_user_come_from_headers_before_the_body() -> None:
    body = chat(metadata={"feature": "faq"}, user="u-body")
    from_body = await _attribute(_arrived(body))
    assert (from_body.feature, from_body.user) == ("faq", "u-body")
    from_headers = await _attribute(
        _arrived(body, **{"x-skinflint-feature": "billing", "x-skinflint-user": "u-head"}))
    assert (from_headers.feature, from_headers.user) == ("billing", "u-head")


async def test_malformed_metadata_and_user_are_ignored() -> None:
    ctx = await _attribute(_arrived(chat(metadata=["feature", "faq"], user=42)))
    assert (ctx.feature, ctx.user) == ("", "")


@pytest.mark.parametrize(("header", "tags"), [
    (None, ()), ("docs:v1", ("docs:v1",)), (" a, b ,,c ,", ("a", "b", "c")), (" , ", ()),
])
async def test_tags_are_a_comma_separated_list(header: str | None,
                                               tags: tuple[str, ...]) -> None:
    headers = {} if header is None else {"x-skinflint-tags": header}
    ctx = await _attribute(_arrived(**headers))
    assert ctx.tags == tags


@pytest.mark.parametrize(("header", "mode", "decision"), [
    (None, "default", MISS),
    ("refresh", "refresh", MISS),
    (" Bypass ", "bypass", CacheDecision("bypass", CacheBypass.CLIENT)),
])
async def test_the_cache_header_sets_the_mode(header: str | None, mode: str,
                                              decision: CacheDecision) -> None:
    headers = {} if header is None else {"x-skinflint-cache": header}
    ctx = await _attribute(_arrived(**headers))
    assert (ctx.cache_mode, ctx.cache) == (mode, decision)


async def test_an_unknown_cache_mode_is_a_request_error() -> None:
    after = Recorder()
    with pytest.raises(RequestError) as caught:
        await Attribute({})(_arrived(**{"x-skinflint-cache": "sometimes"}), after)
    assert caught.value.code == "invalid_header" and caught.value.status == 400
    assert not after.called


@pytest.mark.parametrize(("fields", "stream", "wants_usage"), [
    ({}, False, False),
    ({"stream": True}, True, False),
    ({"stream": "true"}, False, False),  # only JSON true streams
    ({"stream": True, "stream_options": {"include_usage": True}}, True, True),
    ({"stream": True, "stream_options": {"include_usage": 1}}, True, False),
    ({"stream": True, "stream_options": "include_usage"}, True, False),
])
async def test_stream_and_usage_flags(fields: dict[str, Any], stream: bool,
                                      wants_usage: bool) -> None:
    ctx = await _attribute(_arrived(chat(**fields)))
    assert (ctx.stream, ctx.client_wants_usage) == (stream, wants_usage)


async def test_an_embeddings_request_never_streams() -> None:
    """OpenAI's embeddings endpoint has no stream: the flag is not passed on or replayed."""
    ctx = await _attribute(_arrived({"model": "e", "input": "x", "stream": True}, "embeddings"))
    assert not ctx.stream


async def test_the_body_model_and_task_are_read() -> None:
    ctx = await _attribute(_arrived(chat(model="auto", temperature=0),
                                    **{"x-skinflint-task": "code"}))
    assert ctx.body == chat(model="auto", temperature=0)
    assert (ctx.requested_model, ctx.task) == ("auto", "code")


async def test_the_request_hash_does_not_depend_on_key_order() -> None:
    one = await _attribute(_arrived(b'{"model":"m","temperature":0,'
                                    b'"messages":[{"role":"user","content":"hi"}]}'))
    two = await _attribute(_arrived(b'{"messages":[{"content":"hi","role":"user"}],'
                                    b'"temperature":0,"model":"m"}'))
    other = await _attribute(_arrived(chat("hello", temperature=0)))
    assert one.request_hash == two.request_hash != other.request_hash
    assert len(one.request_hash) == 24


@pytest.mark.parametrize(("raw", "endpoint", "code"), [
    (b"{not json", "chat", "invalid_json"),
    (b"[1, 2]", "chat", "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "chat", "missing_model"),
    (b'{"model": "m", "messages": []}', "chat", "invalid_messages"),
    (b'{"model": "m", "messages": [{"content": "hi"}]}', "chat", "invalid_messages"),
    (b'{"model": "m"}', "embeddings", "missing_input"),
])
async def test_a_malformed_body_is_a_request_error(raw: bytes, endpoint: str, code: str) -> None:
    after = Recorder()
    with pytest.raises(RequestError) as caught:
        await Attribute({})(_arrived(raw, endpoint), after)
    assert caught.value.code == code
    assert not after.called


def _nested(depth: int) -> Any:
    """``depth`` levels of JSON containers, the body object counting as the first."""
    value: Any = "x"
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(("body", "code", "says"), [
    (chat(model="m\n"), "invalid_model", "control characters"),
    (chat(model="m\rx"), "invalid_model", "control characters"),
    (chat(model="m\0"), "invalid_model", "control characters"),
    (chat(model="m" * 257), "invalid_model", "256 characters"),
    ({"model": "m" * 7_000_000, "input": "x"}, "invalid_model", "256 characters"),
    (chat(model=42), "missing_model", "must be a string"),
    (chat(n=0), "invalid_n", "from 1 to 128"),
    (chat(n=129), "invalid_n", "from 1 to 128"),
    (chat(n=2.0), "invalid_n", "integer"),
    (chat(n=True), "invalid_n", "integer"),
    (chat(max_tokens=-1), "invalid_max_tokens", "from 1 to 1000000"),
    (chat(max_tokens=0), "invalid_max_tokens", "from 1"),
    (chat(max_tokens="10"), "invalid_max_tokens", "integer"),
    (chat(max_completion_tokens=10**12), "invalid_max_completion_tokens", "to 1000000"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "invalid_role", "wizard"),
    ({"model": "m", "messages": [{"role": ["user"], "content": "x"}]}, "invalid_messages", "'role'"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}] * 10_001},
     "too_many_messages", "10000"),
    (chat(metadata=_nested(129)), "too_deep", "128 levels"),
    ({"model": "m", "input": _nested(200)}, "too_deep", "128 levels"),
])
async def test_a_request_outside_the_limits_says_what_is_wrong(body: dict[str, Any], code: str,
                                                               says: str) -> None:
    after = Recorder()
    endpoint = "embeddings" if "input" in body else "chat"
    with pytest.raises(RequestError) as caught:
        await Attribute({})(_arrived(body, endpoint), after)
    assert (caught.value.code, caught.value.status) == (code, 400)
    assert says.replace("wizard", "") in caught.value.message
    assert not after.called


@pytest.mark.parametrize("fields", [
    {"n": 1}, {"n": 128}, {"n": None}, {"max_tokens": 1}, {"max_tokens": None},
    {"max_completion_tokens": 1_000_000}, {"metadata": _nested(128)},
    {"tools": [{"type": "function", "function": {"parameters": {"type": "object"}}}] * 100},
])
async def test_a_request_at_the_limits_goes_on(fields: dict[str, Any]) -> None:
    ctx = await _attribute(_arrived(chat(**fields)))
    assert ctx.body == chat(**fields)


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant", "tool", "function"])
async def test_every_openai_role_is_accepted(role: str) -> None:
    body = {"model": "m", "messages": [{"role": role, "content": "x"}]}
    assert (await _attribute(_arrived(body))).body == body


async def test_a_model_name_may_hold_any_printable_text() -> None:
    ctx = await _attribute(_arrived(chat(model="org/модель-7b:free@v1.5 " + "m" * 200)))
    assert ctx.requested_model.startswith("org/модель")


def test_the_serialiser_stops_where_the_depth_check_assumes() -> None:
    """The depth check relies on orjson's recursion limit being 254 levels."""
    orjson.dumps(_nested(255))  # 254 lists around a string
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(_nested(256))


@pytest.mark.parametrize("depth", [128, 129])
async def test_depth_is_counted_exactly_in_any_container(depth: int) -> None:
    inner: Any = {}
    for i in range(depth - 3):  # body, tools and the innermost object count too
        inner = {"k": inner} if i % 2 else [inner]
    ctx = _arrived(chat(tools=[inner]))
    if depth <= 128:
        assert (await _attribute(ctx)).body is not None
    else:
        with pytest.raises(RequestError, match="128 levels"):
            await Attribute({})(ctx, Recorder())
