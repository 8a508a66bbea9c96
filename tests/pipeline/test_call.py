"""Stage 9, call provider, through its one call, against scripted providers: retries, backoff,
``Retry-After``, fallbacks, and what is sent upstream."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from skinflint.errors import (
    UpstreamConnectionError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from skinflint.metrics import Metrics
from skinflint.pipeline.call import CallProvider, RetryPolicy
from skinflint.pipeline.context import RequestContext, Target
from tests.pipeline.parts import Recorder, Scripted, answer, chat, context

FAST = RetryPolicy(max_retries=2, backoff_base=0.001, backoff_max=0.05, timeout=5)
A, B = Target("a", "p", "a-1"), Target("b", "q", "b-1")


def _stage(*providers: Scripted, policy: RetryPolicy = FAST,
           metrics: Metrics | None = None) -> CallProvider:
    return CallProvider({p.name: p for p in providers}, {p.name: policy for p in providers},
                        metrics or Metrics())


def _request(*targets: Target, **fields: Any) -> RequestContext:
    return context(chat(), targets=targets or (A,), **fields)


def _chunk(text: str | None = None, usage: bool = False) -> dict[str, Any]:
    if usage:
        return {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    return {"model": "a-1", "choices": [{"index": 0, "delta": {"content": text}}]}


def _unavailable(**kw: Any) -> UpstreamStatusError:
    return UpstreamStatusError(503, "overloaded", provider="p", **kw)


async def test_transient_failures_are_retried_until_an_answer() -> None:
    metrics = Metrics()
    p = Scripted("p", _unavailable(), UpstreamTimeoutError("slow"), answer("ok"))
    ctx, after = _request(), Recorder()
    reply = await _stage(p, metrics=metrics)(ctx, after)
    assert reply.body == answer("ok") and reply.raw == orjson.dumps(answer("ok"))
    assert len(p.requests) == 3 and not after.called
    assert [type(e) for e in ctx.errors] == [UpstreamStatusError, UpstreamTimeoutError]
    assert ctx.answered == A and ctx.upstream_ms > 0
    assert metrics.registry.get_sample_value("skinflint_upstream_retries_total",
                                             {"provider": "p"}) == 2


async def test_the_last_failure_is_raised_when_retries_run_out() -> None:
    last = _unavailable()
    p = Scripted("p", _unavailable(), _unavailable(), last, answer())
    with pytest.raises(UpstreamStatusError) as caught:
        await _stage(p)(_request(), Recorder())
    assert caught.value is last and len(p.requests) == 3  # one call and max_retries=2


async def test_retry_after_is_waited_for() -> None:
    p = Scripted("p", _unavailable(retry_after=0.03), answer())
    started = time.perf_counter()
    await _stage(p)(_request(), Recorder())
    assert time.perf_counter() - started >= 0.03  # the backoff alone is at most 1 ms
    assert len(p.requests) == 2


async def test_a_retry_after_beyond_the_backoff_cap_is_not_waited_for() -> None:
    p = Scripted("p", _unavailable(retry_after=30), answer())
    started = time.perf_counter()
    with pytest.raises(UpstreamStatusError):
        await _stage(p)(_request(), Recorder())
    assert time.perf_counter() - started < 1 and len(p.requests) == 1


@pytest.mark.parametrize("error", [
    UpstreamStatusError(401, "bad key"), UpstreamStatusError(403, "forbidden"),
    UpstreamStatusError(404, "no such model"), UpstreamStatusError(429, "slow down"),
    UpstreamStatusError(500, "oops"), UpstreamConnectionError("refused"),
    UpstreamProtocolError("garbled"),
])
async def test_the_next_target_is_tried_after_an_auth_model_or_transient_error(
        error: UpstreamError) -> None:
    p = Scripted("p", *[error] * 3)
    q = Scripted("q", answer("from q"))
    ctx = _request(A, B)
    reply = await _stage(p, q)(ctx, Recorder())
    assert reply.body == answer("from q")
    assert ctx.answered == B and ctx.errors[-1] is error
    assert [r.provider_model for r in q.requests] == ["b-1"]
    assert q.requests[0].body["model"] == "b-1"


@pytest.mark.parametrize("error", [
    UpstreamStatusError(400, "bad request"), UpstreamStatusError(422, "unprocessable"),
])
async def test_an_error_of_the_request_itself_is_raised_at_once(error: UpstreamError) -> None:
    p, q = Scripted("p", error, answer()), Scripted("q", answer())
    ctx = _request(A, B)
    with pytest.raises(UpstreamError) as caught:
        await _stage(p, q)(ctx, Recorder())
    assert caught.value is error
    assert len(p.requests) == 1 and q.requests == []
    assert ctx.answered == A  # the target that failed, for the ledger


async def test_the_request_names_the_providers_model_and_its_timeout() -> None:
    p = Scripted("p", answer())
    ctx = context(chat(temperature=0), targets=(A,))
    await _stage(p)(ctx, Recorder())
    sent = p.requests[0]
    assert (sent.provider_model, sent.timeout) == ("a-1", 5)
    assert sent.body == {**chat(temperature=0), "model": "a-1"}
    assert ctx.body == chat(temperature=0)  # the client's body is not changed


async def test_a_request_not_streamed_upstream_asks_for_a_whole_answer() -> None:
    """A copy of a streamed request that must not stream (a cascade tier's) says so upstream,
    even though its body asked to stream."""
    p = Scripted("p", answer())
    body = chat(stream=True, stream_options={"include_usage": False})
    reply = await _stage(p)(context(body, targets=(A,), stream=False), Recorder())
    assert reply.body == answer()
    sent = p.requests[0].body
    assert sent["stream"] is False and "stream_options" not in sent


async def test_a_stream_asks_for_usage_and_relays_every_chunk() -> None:
    chunks = [_chunk("Hel"), _chunk("lo"), _chunk(usage=True)]
    p = Scripted("p", chunks)
    body = chat(stream=True, stream_options={"continuous_usage_stats": True})
    reply = await _stage(p)(context(body, targets=(A,), stream=True), Recorder())
    assert p.requests[0].body["stream"] is True
    assert p.requests[0].body["stream_options"] == {"continuous_usage_stats": True,
                                                    "include_usage": True}
    assert reply.body is None and reply.chunks is not None
    assert p.pulled == 1  # the first chunk has arrived before the stage returns
    assert [c.data async for c in reply.chunks] == chunks


async def test_a_stream_failing_before_its_first_chunk_is_retried_then_falls_back() -> None:
    p = Scripted("p", _unavailable(), [_chunk("a")])
    reply = await _stage(p)(_request(stream=True), Recorder())
    assert reply.chunks is not None and [c.data async for c in reply.chunks] == [_chunk("a")]
    assert len(p.requests) == 2

    p, q = Scripted("p", UpstreamStatusError(404, "gone")), Scripted("q", [_chunk("b")])
    ctx = _request(A, B, stream=True)
    reply = await _stage(p, q)(ctx, Recorder())
    assert reply.chunks is not None and [c.data async for c in reply.chunks] == [_chunk("b")]
    assert ctx.answered == B


async def test_an_empty_stream_is_a_protocol_error_retried_then_fallen_back_from() -> None:
    p = Scripted("p", [], [], [])
    with pytest.raises(UpstreamProtocolError, match="p: empty stream"):
        await _stage(p)(_request(A, stream=True), Recorder())
    assert len(p.requests) == 3

    p, q = Scripted("p", [], [], []), Scripted("q", [_chunk("b")])
    reply = await _stage(p, q)(_request(A, B, stream=True), Recorder())
    assert reply.chunks is not None and [c.data async for c in reply.chunks] == [_chunk("b")]
    assert len(p.requests) == 3 and len(q.requests) == 1


async def test_an_embedding_is_sent_to_the_embeddings_call() -> None:
    vectors = {"object": "list", "data": [{"embedding": [0.1, 0.2], "index": 0}]}
    p = Scripted("p", vectors)
    ctx = context({"model": "a", "input": "hello"}, endpoint="embeddings", targets=(A,))
    reply = await _stage(p)(ctx, Recorder())
    assert reply.body == vectors
    assert p.requests[0].body == {"model": "a-1", "input": "hello"}


def _cut() -> UpstreamProtocolError:
    return UpstreamProtocolError("cut", provider="p", code="upstream_cut")


async def test_a_retried_call_that_may_have_cost_is_kept_as_an_attempt() -> None:
    p = Scripted("p", UpstreamTimeoutError("slow"), _cut(), answer())
    ctx = _request()
    await _stage(p)(ctx, Recorder())
    assert [(a.retry, a.status, a.error_type, a.target, a.usage) for a in ctx.attempts] == [
        (1, 504, "timeout", A, None), (2, 502, "upstream_cut", A, None)]
    assert all(a.upstream_ms > 0 for a in ctx.attempts)


async def test_free_failures_and_the_call_that_ends_the_request_are_not_attempts() -> None:
    """A refused connection or an error answer cost nothing; the last call is the request's
    own ledger row."""
    p = Scripted("p", UpstreamConnectionError("refused"), _unavailable(), answer())
    ctx = _request()
    await _stage(p)(ctx, Recorder())
    assert ctx.attempts == []

    p = Scripted("p", _cut(), _cut(), UpstreamTimeoutError("slow"))
    ctx = _request()
    with pytest.raises(UpstreamTimeoutError):
        await _stage(p)(ctx, Recorder())
    assert [a.error_type for a in ctx.attempts] == ["upstream_cut", "upstream_cut"]


async def test_a_call_fallen_back_from_is_an_attempt_too() -> None:
    p = Scripted("p", _cut(), _cut(), UpstreamTimeoutError("slow"))
    q = Scripted("q", answer("from q"))
    ctx = _request(A, B)
    await _stage(p, q)(ctx, Recorder())
    assert [(a.retry, a.target) for a in ctx.attempts] == [(1, A), (2, A), (3, A)]
    assert ctx.answered == B
