"""The Anthropic provider's batch API (Message Batches) against the fake upstream: OpenAI
chat-completions lines in, OpenAI ``chat.completion`` results out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from skinflint.errors import UpstreamProtocolError, UpstreamStatusError
from skinflint.models import BatchLine, UpstreamRequest, Usage
from skinflint.providers.anthropic import AnthropicProvider
from skinflint.providers.anthropic_batches import outcome_of
from skinflint.providers.http import new_session
from tests.fake_batches import FAIL_MARKER
from tests.fake_upstream import FakeUpstream
from tests.providers.batching import finish, run_batch

KEY = "sk-ant-batch-secret-77"
MODEL = "claude-haiku-4-5"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    s = new_session()
    yield s
    await s.close()


@pytest.fixture
def provider(fake: FakeUpstream, session: aiohttp.ClientSession) -> AnthropicProvider:
    return AnthropicProvider("claude", base_url=fake.root_url + "/v1", api_key=KEY,
                             session=session)


def _line(custom_id: str, text: str, **extra: object) -> BatchLine:
    return BatchLine(custom_id, {"model": MODEL, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": text}],
        **extra})


async def test_lines_are_sent_as_anthropic_requests(
    provider: AnthropicProvider, fake: FakeUpstream
) -> None:
    lines = [_line("a", "hi", max_completion_tokens=50, temperature=1.7, stream=True,
                   response_format={"type": "json_object"}),
             _line("b", "there")]
    batch_id = await provider.submit_batch(lines, 5)
    (sent,) = fake.calls("/v1/messages/batches")
    assert sent.headers["x-api-key"] == KEY and "anthropic-version" in sent.headers
    assert sent.body is not None
    first, second = sent.body["requests"]
    assert first["custom_id"] == "a" and second["custom_id"] == "b"
    params = first["params"]
    assert params["model"] == MODEL and params["max_tokens"] == 50
    assert params["temperature"] == 1.0  # Anthropic's range is 0..1
    assert params["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert params["system"].startswith("Be brief.") and "JSON" in params["system"]
    assert "stream" not in params and "response_format" not in params
    assert second["params"]["max_tokens"] == 4096  # the provider's default
    assert fake.batches.batch(batch_id)["custom_ids"] == ["a", "b"]


async def test_results_come_back_as_openai_completions_with_their_usage(
    provider: AnthropicProvider, fake: FakeUpstream
) -> None:
    ok = _line("ok", "one two [[cached=2]] [[cache_write=3]]")
    batch_id = await provider.submit_batch([ok, _line("bad", f"x {FAIL_MARKER}")], 5)
    seen = await finish(provider, batch_id)
    assert [(s.state, s.detail) for s in seen] == [("ended", "ended")]
    assert (seen[0].total, seen[0].succeeded, seen[0].failed) == (2, 1, 1)
    outcomes = {o.custom_id: o for o in await provider.batch_results(batch_id, 5)}
    done = outcomes["ok"].completion
    assert done is not None and outcomes["ok"].error is None
    assert done.body["object"] == "chat.completion" and done.body["model"] == MODEL
    choice = done.body["choices"][0]
    assert choice["message"]["content"].startswith("echo: one two")
    assert choice["finish_reason"] == "stop"
    live = await provider.complete(UpstreamRequest(body=ok.body, provider_model=MODEL,
                                                   timeout=5))
    assert done.body["usage"] == live.body["usage"]
    usage = Usage.from_openai(done.body["usage"])
    assert usage is not None and (usage.cached_tokens, usage.cache_write_tokens) == (2, 3)
    bad = outcomes["bad"]
    assert (bad.completion, bad.error) == (None, "failed")
    assert bad.message.startswith("anthropic: ") and "error while processing" in bad.message


async def test_an_expired_batch_ends_with_every_request_expired(
    provider: AnthropicProvider, fake: FakeUpstream
) -> None:
    fake.batches.expire_next()
    batch_id = await provider.submit_batch([_line("a", "one"), _line("b", "two")], 5)
    assert (await finish(provider, batch_id))[-1].state == "ended"
    outcomes = await provider.batch_results(batch_id, 5)
    assert sorted((o.custom_id, o.error) for o in outcomes) == [("a", "expired"),
                                                                ("b", "expired")]


async def test_a_cancelled_batch_reports_its_requests_cancelled(
    provider: AnthropicProvider, fake: FakeUpstream
) -> None:
    fake.batches.hold()
    batch_id = await provider.submit_batch([_line("a", "one")], 5)
    assert (await provider.batch_status(batch_id, 5)).state == "running"
    await provider.cancel_batch(batch_id, 5)
    seen = await finish(provider, batch_id)
    assert seen[-1].state == "ended"
    (outcome,) = await provider.batch_results(batch_id, 5)
    assert (outcome.custom_id, outcome.error, outcome.completion) == ("a", "cancelled", None)


async def test_a_held_batch_keeps_running_and_has_no_results_yet(
    provider: AnthropicProvider, fake: FakeUpstream
) -> None:
    fake.batches.hold()
    batch_id = await provider.submit_batch([_line("a", "one")], 5)
    held = [await provider.batch_status(batch_id, 5) for _ in range(4)]
    assert {(s.state, s.detail) for s in held} == {("running", "in_progress")}
    with pytest.raises(UpstreamProtocolError):
        await provider.batch_results(batch_id, 5)
    fake.batches.release()
    assert (await finish(provider, batch_id))[-1].state == "ended"
    (outcome,) = await provider.batch_results(batch_id, 5)
    assert outcome.completion is not None


async def test_an_untranslatable_line_is_refused_before_anything_is_sent(
    provider: AnthropicProvider, fake: FakeUpstream
) -> None:
    with pytest.raises(UpstreamStatusError) as info:
        await provider.submit_batch([_line("a", "one"), _line("b", "two", n=2)], 5)
    assert info.value.status == 400 and "'b'" in info.value.message
    assert fake.calls("/v1/messages/batches") == [] and fake.batches.submitted == 0


async def test_a_custom_id_anthropic_would_refuse_is_refused_before_sending(
    provider: AnthropicProvider, fake: FakeUpstream
) -> None:
    for bad in ("has space", "x" * 65, ""):
        with pytest.raises(UpstreamStatusError) as info:
            await provider.submit_batch([_line("ok", "one"), _line(bad, "two")], 5)
        assert info.value.status == 400 and info.value.code == "invalid_custom_id"
    assert fake.calls("/v1/messages/batches") == []
    outcomes = await run_batch(provider, [_line("job-1_A", "fine")])
    assert outcomes["job-1_A"].completion is not None


async def test_an_unknown_batch_is_anthropics_404_without_the_key(
    provider: AnthropicProvider,
) -> None:
    with pytest.raises(UpstreamStatusError) as info:
        await provider.batch_status("msgbatch_nope", 5)
    assert info.value.status == 404 and info.value.code == "not_found_error"
    assert KEY not in str(info.value) and KEY not in repr(provider)


@pytest.mark.parametrize("error", [
    {"type": "error", "error": {"type": "invalid_request_error", "message": "bad key=abc1234"}},
    {"type": "invalid_request_error", "message": "bad key=abc1234"}])
def test_an_errored_result_is_failed_with_the_vendors_message_redacted(
    error: dict[str, object],
) -> None:
    outcome = outcome_of({"custom_id": "z", "result": {"type": "errored", "error": error}},
                         "claude")
    assert (outcome.custom_id, outcome.error) == ("z", "failed")
    assert outcome.message == "anthropic: bad [redacted]"


async def test_a_large_batch_comes_back_whole(provider: AnthropicProvider) -> None:
    # Its results pass OFF_LOOP_BYTES, so they are parsed and translated in a worker thread.
    lines = [_line(f"r{i}", f"item {i} to classify") for i in range(4000)]
    outcomes = await run_batch(provider, lines, timeout=30)
    assert len(outcomes) == 4000
    assert all(outcomes[f"r{i}"].completion is not None for i in range(4000))
    assert outcomes["r3999"].completion.body["choices"][0]["message"]["content"] == (  # type: ignore[union-attr]
        "echo: item 3999 to classify")
