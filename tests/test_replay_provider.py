"""The replay provider: recorded answers, OpenAI shapes, errors, prices, latency, determinism."""

from __future__ import annotations

import gzip
import json
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from skinflint.errors import UpstreamProtocolError, UpstreamStatusError
from skinflint.interfaces import Provider
from skinflint.models import BatchLine, StreamChunk, UpstreamRequest
from skinflint.providers import replay
from skinflint.providers.replay import (
    REPLAY_LATENCY,
    REPLAY_PRICES,
    ReplayProvider,
    ReplaySample,
    count_tokens,
    token_counter,
)

GPT4 = "gpt-4-1106-preview"
EXTRACT = resources.files("skinflint") / "data" / "routerbench.jsonl.gz"
# Largest relative error of REPLAY_PRICES against the recorded costs, measured: 2.2e-16.
PRICE_FIT_ERROR = 1e-12


@pytest.fixture(scope="module")
def provider() -> ReplayProvider:
    p = ReplayProvider(latency_scale=0.0)
    p.load()
    return p


@pytest.fixture(scope="module")
def arc(provider: ReplayProvider) -> ReplaySample:
    return next(s for s in provider.samples() if s.id == "arc-challenge.test.1108")


@pytest.fixture(scope="module")
def mbpp(provider: ReplayProvider) -> ReplaySample:
    return next(s for s in provider.samples() if s.eval == "mbpp")


def request(prompt: Any, model: str = GPT4, **body: Any) -> UpstreamRequest:
    messages = [{"role": "user", "content": prompt}]
    return UpstreamRequest(provider_model=model, body={"model": model, "messages": messages,
                                                        **body})


def cost(usage: dict[str, int], model: str) -> float:
    rate_in, rate_out = REPLAY_PRICES[model]
    return (usage["prompt_tokens"] * rate_in + usage["completion_tokens"] * rate_out) / 1e6


async def collect(p: ReplayProvider, req: UpstreamRequest) -> list[StreamChunk]:
    return [chunk async for chunk in p.stream(req)]


def test_public_surface() -> None:
    assert set(replay.__all__) == {"REPLAY_LATENCY", "REPLAY_PRICES", "ReplayProvider",
                                   "ReplaySample", "count_tokens", "token_counter"}
    p: Provider = ReplayProvider()
    assert p.name == "replay"


def test_extract_is_small_and_complete(provider: ReplayProvider) -> None:
    assert len(EXTRACT.read_bytes()) <= 2 * 1024 * 1024
    samples = provider.samples()
    assert len(samples) == 2217
    assert {s.eval for s in samples} == {"arc-challenge", "mbpp", "winogrande"}
    assert set(provider.models()) == set(REPLAY_PRICES) == set(REPLAY_LATENCY)
    assert len({s.prompt.strip() for s in samples}) == len(samples)


async def test_complete_returns_the_recorded_answer(provider: ReplayProvider,
                                                    arc: ReplaySample) -> None:
    body = (await provider.complete(request(arc.prompt))).body
    assert body["object"] == "chat.completion"
    assert body["model"] == GPT4
    assert body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": arc.responses[GPT4]}
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert cost(usage, GPT4) == pytest.approx(arc.cost[GPT4], rel=PRICE_FIT_ERROR)


async def test_lookup_strips_whitespace_and_reads_content_parts(provider: ReplayProvider,
                                                                arc: ReplaySample) -> None:
    parts = [{"type": "text", "text": "\n  " + arc.prompt + "  \n"}]
    body = (await provider.complete(request(parts, "claude-v2"))).body
    assert body["choices"][0]["message"]["content"] == arc.responses["claude-v2"]


async def test_other_messages_count_as_input(provider: ReplayProvider, arc: ReplaySample) -> None:
    req = request(arc.prompt)
    req.body["messages"].insert(0, {"role": "system", "content": "Answer tersely."})
    usage = (await provider.complete(req)).body["usage"]
    assert usage["prompt_tokens"] == count_tokens(arc.prompt) + count_tokens("Answer tersely.")


async def test_stream_chunks(provider: ReplayProvider, mbpp: ReplaySample) -> None:
    chunks = [c.data for c in await collect(provider, request(mbpp.prompt))]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]]
    assert len([piece for piece in content if piece]) > 1
    assert "".join(content) == mbpp.responses[GPT4]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert cost(chunks[-1]["usage"], GPT4) == pytest.approx(mbpp.cost[GPT4], rel=PRICE_FIT_ERROR)


async def test_max_tokens_cuts_the_answer(provider: ReplayProvider, mbpp: ReplaySample) -> None:
    body = (await provider.complete(request(mbpp.prompt, max_tokens=5))).body
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    assert mbpp.responses[GPT4].startswith(body["choices"][0]["message"]["content"])
    chunks = await collect(provider, request(mbpp.prompt, max_completion_tokens=5))
    assert chunks[-2].data["choices"][0]["finish_reason"] == "length"


async def test_unknown_prompt(provider: ReplayProvider) -> None:
    with pytest.raises(UpstreamStatusError) as info:
        await provider.complete(request("What is the capital of France?"))
    assert (info.value.status, info.value.code) == (404, "replay_prompt_unknown")
    assert info.value.provider == "replay"
    with pytest.raises(UpstreamStatusError):
        await collect(provider, request("What is the capital of France?"))


async def test_unknown_model(provider: ReplayProvider, arc: ReplaySample) -> None:
    with pytest.raises(UpstreamStatusError) as info:
        await provider.complete(request(arc.prompt, "gpt-4o"))
    assert (info.value.status, info.value.code) == (404, "model_not_found")
    assert "gpt-4o" in info.value.message and GPT4 in info.value.message


def write_extract(path: Path, response: str) -> None:
    record = {"id": "t.1", "eval": "mbpp", "prompt": "Say hi.", "oracle": "m",
              "models": {"m": {"response": response, "correct": 1, "cost": 0.5}}}
    path.write_bytes(gzip.compress(json.dumps(record).encode()))


async def test_empty_recorded_response_is_not_found(tmp_path: Path) -> None:
    write_extract(tmp_path / "x.jsonl.gz", "")
    p = ReplayProvider(data_path=tmp_path / "x.jsonl.gz", latency_scale=0.0)
    with pytest.raises(UpstreamStatusError) as info:
        await p.complete(request("Say hi.", "m"))
    assert (info.value.status, info.value.code) == (404, "replay_prompt_unknown")


async def test_unreadable_data_is_an_upstream_error(tmp_path: Path) -> None:
    p = ReplayProvider(data_path=tmp_path / "missing.jsonl.gz")
    with pytest.raises(UpstreamProtocolError):
        await p.complete(request("Say hi.", "m"))


async def test_embeddings_are_refused(provider: ReplayProvider) -> None:
    with pytest.raises(UpstreamStatusError) as info:
        await provider.embed(UpstreamRequest(provider_model=GPT4, body={"input": "x"}))
    assert info.value.status == 400
    await provider.close()


async def test_the_model_list_is_the_recorded_models(provider: ReplayProvider) -> None:
    listed = await provider.list_models(1.0)
    assert [m["id"] for m in listed] == provider.models() and GPT4 in provider.models()
    assert {m["object"] for m in listed} == {"model"}


@pytest.mark.skipif(token_counter() != "cl100k_base", reason="cl100k_base files not installed")
def test_prices_reproduce_every_recorded_cost(provider: ReplayProvider) -> None:
    worst = 0.0
    for s in provider.samples():
        prompt_tokens = count_tokens(s.prompt)
        for model, response in s.responses.items():
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": count_tokens(response)}
            worst = max(worst, abs(cost(usage, model) - s.cost[model]) / s.cost[model])
    assert worst <= PRICE_FIT_ERROR


def test_correctness_labels_and_grading(provider: ReplayProvider, arc: ReplaySample,
                                        mbpp: ReplaySample) -> None:
    assert provider.correctness(arc.prompt, GPT4) == arc.correct[GPT4] == 1
    assert provider.correctness(arc.prompt, "claude-instant-v1") == 0
    gold = arc.responses[GPT4].strip()
    assert provider.correctness(arc.prompt, "claude-instant-v1", answer=gold + ")") == 1
    assert provider.correctness(arc.prompt, GPT4, answer="A") == 0
    assert provider.correctness(arc.prompt, GPT4, answer="I cannot say") == 0
    assert provider.correctness(mbpp.prompt, GPT4, answer=mbpp.responses["claude-v1"]) == \
        mbpp.correct["claude-v1"]
    assert provider.correctness(mbpp.prompt, GPT4, answer="def f(): pass") is None
    with pytest.raises(KeyError):
        provider.correctness("never recorded", GPT4)


def test_correctness_grading_reproduces_labels(provider: ReplayProvider) -> None:
    for s in provider.samples():
        for model, response in s.responses.items():
            if s.correct[model] is not None:
                assert provider.correctness(s.prompt, GPT4, answer=response) == s.correct[model]


def test_latency_model(provider: ReplayProvider, mbpp: ReplaySample) -> None:
    timed = ReplayProvider(seed=0)
    ttft, throughput = REPLAY_LATENCY[GPT4]
    nominal = ttft + count_tokens(mbpp.responses[GPT4]) / throughput
    assert 0.85 * nominal <= timed.latency(mbpp.prompt, GPT4) < 1.15 * nominal
    assert provider.latency(mbpp.prompt, GPT4) == 0.0


async def test_complete_waits_the_scaled_latency(mbpp: ReplaySample) -> None:
    p = ReplayProvider(latency_scale=0.01)
    expected = p.latency(mbpp.prompt, GPT4)
    start = time.perf_counter()
    await p.complete(request(mbpp.prompt))
    assert time.perf_counter() - start >= 0.9 * expected > 0


async def test_deterministic(mbpp: ReplaySample) -> None:
    a, b, c = (ReplayProvider(latency_scale=0.0, seed=s) for s in (7, 7, 8))
    first = await a.complete(request(mbpp.prompt))
    second = await b.complete(request(mbpp.prompt))
    first.body.pop("created")
    second.body.pop("created")
    assert first.body == second.body
    stream_a = [c.data["choices"] for c in await collect(a, request(mbpp.prompt))]
    stream_b = [c.data["choices"] for c in await collect(b, request(mbpp.prompt))]
    assert stream_a == stream_b
    assert a.latency(mbpp.prompt, GPT4) == b.latency(mbpp.prompt, GPT4)
    timed = [ReplayProvider(seed=s).latency(mbpp.prompt, GPT4) for s in (7, 7, 8)]
    assert timed[0] == timed[1] != timed[2]
    assert c.samples() == a.samples()


def test_load_is_lazy_and_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write_extract(tmp_path / "x.jsonl.gz", "hi")
    reads = 0
    real = replay._read_extract

    def counting(source: Any) -> Any:
        nonlocal reads
        reads += 1
        time.sleep(0.05)
        return real(source)

    monkeypatch.setattr(replay, "_read_extract", counting)
    p = ReplayProvider(data_path=tmp_path / "x.jsonl.gz")
    assert reads == 0
    threads = [threading.Thread(target=p.load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reads == 1
    assert p.models() == ["m"]


def test_word_count_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay, "_cl100k", lambda: None)
    assert token_counter() == "words"
    assert count_tokens("def f(x): return x + 1") == 10
    assert replay._truncate("one, two three", 2) == "one,"


async def test_a_batch_answers_each_line_with_its_recording(provider: ReplayProvider,
                                                             arc: ReplaySample,
                                                             mbpp: ReplaySample) -> None:
    lines = [BatchLine("a", request(arc.prompt).body), BatchLine("b", request(mbpp.prompt).body),
             BatchLine("c", request("never recorded").body)]
    batch_id = await provider.submit_batch(lines, timeout=5)
    status = await provider.batch_status(batch_id, timeout=5)
    assert (status.state, status.total) == ("ended", 3)
    outcomes = {o.custom_id: o for o in await provider.batch_results(batch_id, timeout=5)}
    live = (await provider.complete(request(arc.prompt))).body
    a = outcomes["a"].completion
    assert a is not None and a.body["choices"] == live["choices"]
    assert a.body["usage"] == live["usage"]
    b = outcomes["b"].completion
    assert b is not None and b.body["choices"][0]["message"]["content"] == mbpp.responses[GPT4]
    assert (outcomes["c"].completion, outcomes["c"].error) == (None, "failed")
    await provider.cancel_batch(batch_id, timeout=5)
    with pytest.raises(UpstreamStatusError) as err:
        await provider.batch_status("replay-batch-0", timeout=5)
    assert err.value.status == 404
