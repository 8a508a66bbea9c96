"""The OpenAI-compatible provider's batch API against the fake upstream's files and batches."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from skinflint.config import ProviderConfig
from skinflint.errors import UpstreamConnectionError, UpstreamProtocolError, UpstreamStatusError
from skinflint.interfaces import BatchAPI
from skinflint.models import BatchLine, UpstreamRequest, Usage
from skinflint.providers import open_provider
from skinflint.providers.http import new_session
from skinflint.providers.openai_batches import ENDPOINT, state_of
from skinflint.providers.openai_compat import OpenAICompatProvider
from tests.fake_batches import FAIL_MARKER
from tests.fake_upstream import FakeUpstream
from tests.providers.batching import finish, run_batch

KEY = "sk-upstream-batch-secret-42"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    s = new_session()
    yield s
    await s.close()


@pytest.fixture
def provider(fake: FakeUpstream, session: aiohttp.ClientSession) -> OpenAICompatProvider:
    return OpenAICompatProvider("up", base_url=fake.base_url, api_key=KEY, session=session,
                                headers={"x-org": "acme"})


def _line(custom_id: str, text: str, model: str = "gpt-4o-mini") -> BatchLine:
    return BatchLine(custom_id, {"model": model, "temperature": 0,
                                 "messages": [{"role": "user", "content": text}]})


async def test_a_batch_runs_and_every_line_has_its_outcome(
    provider: OpenAICompatProvider, fake: FakeUpstream
) -> None:
    lines = [_line("a", "one two"), _line("b", f"broken {FAIL_MARKER}"),
             _line("c", "three [[cached=2]]")]
    batch_id = await provider.submit_batch(lines, 5)
    seen = await finish(provider, batch_id)
    assert [s.detail for s in seen] == ["in_progress", "finalizing", "completed"]
    assert [s.state for s in seen] == ["running", "running", "ended"]
    assert (seen[-1].id, seen[-1].total, seen[-1].succeeded, seen[-1].failed) == (
        batch_id, 3, 2, 1)
    outcomes = {o.custom_id: o for o in await provider.batch_results(batch_id, 5)}
    assert set(outcomes) == {"a", "b", "c"}
    a = outcomes["a"].completion
    assert a is not None and outcomes["a"].error is None
    assert a.body["choices"][0]["message"]["content"] == "echo: one two"
    assert (outcomes["b"].completion, outcomes["b"].error) == (None, "failed")
    assert "error while processing" in outcomes["b"].message
    assert fake.batches.submitted == 3


async def test_usage_is_the_same_as_a_live_call_of_the_same_line(
    provider: OpenAICompatProvider,
) -> None:
    line = _line("u", "count these words please [[cached=3]] [[reasoning=4]]")
    outcome = (await run_batch(provider, [line]))["u"]
    live = await provider.complete(UpstreamRequest(body=line.body, provider_model="gpt-4o-mini",
                                                   timeout=5))
    assert outcome.completion is not None
    batched = outcome.completion.body["usage"]
    assert batched == live.body["usage"]
    usage = Usage.from_openai(batched)
    assert usage is not None and (usage.cached_tokens, usage.reasoning_tokens) == (3, 4)


async def test_the_upload_and_the_batch_are_what_openai_expects(
    provider: OpenAICompatProvider, fake: FakeUpstream
) -> None:
    streamed = _line("y", "there")
    streamed.body.update(stream=True, stream_options={"include_usage": True})
    batch_id = await provider.submit_batch([_line("x", "hi"), streamed], 5)
    (upload,) = fake.calls("/v1/files")
    assert upload.headers["authorization"] == f"Bearer {KEY}"
    assert upload.headers["x-org"] == "acme"
    assert upload.headers["content-type"].startswith("multipart/form-data")
    assert b'name="purpose"' in upload.raw and b"\r\nbatch\r\n" in upload.raw
    (create,) = fake.calls("/v1/batches")
    assert create.body is not None
    assert (create.body["endpoint"], create.body["completion_window"]) == (ENDPOINT, "24h")
    batch = fake.batches.batch(batch_id)
    assert batch["api"] == "openai" and batch["custom_ids"] == ["x", "y"]
    (jsonl,) = [r for r in upload.raw.split(b"\r\n") if r.startswith(b"{")]
    rows = [json.loads(r) for r in jsonl.splitlines()]
    assert [r["custom_id"] for r in rows] == ["x", "y"]
    assert rows[0] == {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
                       "body": _line("x", "hi").body}
    assert rows[1]["body"] == _line("y", "there").body  # a batch line is never streamed
    assert streamed.body["stream"] is True  # the caller's line is left as it was


async def test_an_expired_batch_ends_with_every_line_expired(
    provider: OpenAICompatProvider, fake: FakeUpstream
) -> None:
    fake.batches.expire_next()
    batch_id = await provider.submit_batch([_line("a", "one"), _line("b", "two")], 5)
    last = (await finish(provider, batch_id))[-1]
    assert (last.state, last.detail) == ("ended", "expired")
    outcomes = await provider.batch_results(batch_id, 5)
    assert [(o.custom_id, o.error, o.completion) for o in outcomes] == [
        ("a", "expired", None), ("b", "expired", None)]


async def test_a_cancelled_batch_ends_with_its_lines_cancelled(
    provider: OpenAICompatProvider,
) -> None:
    batch_id = await provider.submit_batch([_line("a", "one"), _line("b", "two")], 5)
    await provider.cancel_batch(batch_id, 5)
    last = (await finish(provider, batch_id))[-1]
    assert (last.state, last.detail) == ("ended", "cancelled")
    outcomes = await provider.batch_results(batch_id, 5)
    assert {(o.custom_id, o.error) for o in outcomes} == {("a", "cancelled"), ("b", "cancelled")}


async def test_a_line_in_no_result_file_is_expired(
    provider: OpenAICompatProvider, fake: FakeUpstream
) -> None:
    fake.batches.omit_unrun_next()
    batch_id = await provider.submit_batch([_line("a", "one"), _line("b", "two")], 5)
    await provider.cancel_batch(batch_id, 5)
    assert (await finish(provider, batch_id))[-1].detail == "cancelled"
    outcomes = await provider.batch_results(batch_id, 5)
    assert [(o.custom_id, o.error) for o in outcomes] == [("a", "expired"), ("b", "expired")]
    assert "no result" in outcomes[0].message


async def test_a_held_batch_keeps_running_until_released(
    provider: OpenAICompatProvider, fake: FakeUpstream
) -> None:
    fake.batches.hold()
    batch_id = await provider.submit_batch([_line("a", "one")], 5)
    held = [await provider.batch_status(batch_id, 5) for _ in range(5)]
    assert {s.state for s in held} == {"running"}
    fake.batches.release()
    assert (await finish(provider, batch_id))[-1].state == "ended"
    (outcome,) = await provider.batch_results(batch_id, 5)
    assert outcome.completion is not None


async def test_an_unknown_batch_is_the_vendors_404_without_the_key(
    provider: OpenAICompatProvider,
) -> None:
    with pytest.raises(UpstreamStatusError) as info:
        await provider.batch_status("batch_nope", 5)
    assert info.value.status == 404 and info.value.provider == "up"
    assert "no such batch" in str(info.value) and KEY not in str(info.value)
    with pytest.raises(UpstreamStatusError):
        await provider.batch_results("../files/x", 5)  # quoted: still one path segment


async def test_an_unreachable_upstream_is_a_connection_error(
    session: aiohttp.ClientSession,
) -> None:
    dead = OpenAICompatProvider("up", base_url="http://127.0.0.1:9/v1", api_key=KEY,
                                session=session)
    with pytest.raises(UpstreamConnectionError) as info:
        await dead.submit_batch([_line("a", "one")], 2)
    assert KEY not in str(info.value) and KEY not in repr(dead)


@pytest.mark.parametrize(("status", "state"), [
    ("validating", "running"), ("in_progress", "running"), ("finalizing", "running"),
    ("cancelling", "running"), ("completed", "ended"), ("expired", "ended"),
    ("cancelled", "ended"), ("failed", "failed"), ("a_new_status", "running")])
def test_every_openai_status_has_its_state(status: str, state: str) -> None:
    found = state_of({"id": "b1", "status": status,
                      "request_counts": {"total": 5, "completed": 3, "failed": 1}})
    assert (found.state, found.detail, found.total, found.succeeded, found.failed) == (
        state, status, 5, 3, 1)


async def test_results_are_refused_while_the_batch_runs(
    provider: OpenAICompatProvider, fake: FakeUpstream
) -> None:
    fake.batches.hold()
    batch_id = await provider.submit_batch([_line("a", "one")], 5)
    with pytest.raises(UpstreamProtocolError) as info:
        await provider.batch_results(batch_id, 5)  # else every line would look unrun
    assert info.value.code == "batch_not_ended"
    assert not [r for r in fake.requests if r.path.endswith("/content")]


def test_the_http_providers_offer_the_batch_api(session: aiohttp.ClientSession) -> None:
    def provider(kind: str) -> object:
        return open_provider("p", ProviderConfig(kind=kind, base_url="http://127.0.0.1:9/v1"),
                             session)

    assert isinstance(provider("openai-compatible"), BatchAPI)
    assert isinstance(provider("anthropic"), BatchAPI)
    assert not isinstance(provider("replay"), BatchAPI)


async def test_a_batch_that_fails_validation_ran_no_line(
    provider: OpenAICompatProvider, fake: FakeUpstream
) -> None:
    fake.batches.refuse_next()
    batch_id = await provider.submit_batch([_line("a", "one"), _line("b", "two")], 5)
    (status,) = await finish(provider, batch_id)
    assert (status.state, status.detail) == ("failed", "failed")
    outcomes = await provider.batch_results(batch_id, 5)
    assert [(o.custom_id, o.error, o.completion) for o in outcomes] == [
        ("a", "expired", None), ("b", "expired", None)]
    assert "model is not available" in outcomes[0].message


async def test_a_large_batch_comes_back_whole(provider: OpenAICompatProvider) -> None:
    # Its result file passes OFF_LOOP_BYTES, so it is parsed in a worker thread.
    lines = [_line(f"r{i}", f"item {i} to classify") for i in range(4000)]
    outcomes = await run_batch(provider, lines, timeout=30)
    assert len(outcomes) == 4000
    assert all(o.completion is not None and o.completion.body["choices"][0]["message"]["content"]
               == f"echo: item {i} to classify" for i, o in enumerate(outcomes.values()))
