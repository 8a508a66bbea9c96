"""The fake upstream's batch APIs behave as the official SDKs expect (``fake`` is the
session's fake upstream, reset for each test: tests/conftest.py)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import anthropic
import openai
import pytest

from tests.fake_batches import FAIL_MARKER
from tests.fake_upstream import FakeUpstream


@pytest.fixture
def oai(fake: FakeUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0,
                       timeout=5) as client:
        yield client


@pytest.fixture
def claude(fake: FakeUpstream) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=fake.root_url, api_key="sk-ant-test", max_retries=0,
                             timeout=5) as client:
        yield client


def _jsonl(texts: list[str]) -> bytes:
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": t}]}}
             for i, t in enumerate(texts)]
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _submit(oai: openai.OpenAI, texts: list[str]) -> str:
    upload = oai.files.create(file=("in.jsonl", io.BytesIO(_jsonl(texts))), purpose="batch")
    batch = oai.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    assert batch.status == "validating" and batch.request_counts is not None
    assert batch.request_counts.total == len(texts)
    return batch.id


def _lines(oai: openai.OpenAI, file_id: str | None) -> list[dict[str, object]]:
    assert file_id is not None
    return [json.loads(x) for x in oai.files.content(file_id).read().splitlines()]


def test_openai_batch_steps_through_each_status_to_results(oai: openai.OpenAI,
                                                           fake: FakeUpstream) -> None:
    batch_id = _submit(oai, ["one two", f"broken {FAIL_MARKER}", "three"])
    seen = [oai.batches.retrieve(batch_id).status for _ in range(3)]
    assert seen == ["in_progress", "finalizing", "completed"]
    done = oai.batches.retrieve(batch_id)
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
    results = _lines(oai, done.output_file_id)
    assert [r["custom_id"] for r in results] == ["r0", "r2"]
    body = results[0]["response"]["body"]  # type: ignore[index]
    assert body["choices"][0]["message"]["content"] == "echo: one two"
    assert body["usage"]["prompt_tokens"] == 2 + 3
    (error,) = _lines(oai, done.error_file_id)
    assert error["custom_id"] == "r1" and error["response"]["status_code"] == 500  # type: ignore[index]
    assert fake.batches.submitted == 3


def test_held_batches_wait_and_expired_ones_answer_nothing(oai: openai.OpenAI,
                                                           fake: FakeUpstream) -> None:
    fake.batches.hold()
    held = _submit(oai, ["a"])
    assert {oai.batches.retrieve(held).status for _ in range(5)} <= {"in_progress", "finalizing"}
    fake.batches.release()
    fake.batches.expire_next()
    assert oai.batches.retrieve(held).status == "expired"
    done = oai.batches.retrieve(held)
    assert done.output_file_id is None
    (error,) = _lines(oai, done.error_file_id)
    assert error["error"] == {"code": "batch_expired",  # type: ignore[comparison-overlap]
                              "message": "this line was not run: the batch expired"}


def test_openai_cancel(oai: openai.OpenAI) -> None:
    batch_id = _submit(oai, ["a", "b"])
    assert oai.batches.cancel(batch_id).status == "cancelling"
    done = oai.batches.retrieve(batch_id)
    assert done.status == "cancelled" and len(_lines(oai, done.error_file_id)) == 2


def test_anthropic_message_batch(claude: anthropic.Anthropic, fake: FakeUpstream) -> None:
    requests = [{"custom_id": "a", "params": {"model": "claude-haiku-4-5", "max_tokens": 50,
                                              "messages": [{"role": "user", "content": "hi"}]}},
                {"custom_id": "b", "params": {"model": "claude-haiku-4-5", "max_tokens": 50,
                                              "messages": [{"role": "user",
                                                            "content": f"x {FAIL_MARKER}"}]}}]
    batch = claude.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    assert batch.processing_status == "in_progress"
    assert batch.request_counts.processing == 2
    ended = claude.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended" and ended.results_url is not None
    results = {r.custom_id: r.result for r in claude.messages.batches.results(batch.id)}
    assert results["a"].type == "succeeded" and results["b"].type == "errored"
    assert results["a"].message.content[0].text == "echo: hi"  # type: ignore[union-attr]


def test_answerers_answer_live_and_batch_lines(oai: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.add_answerer(lambda body: "packed" if "PACK" in json.dumps(body) else None)
    live = oai.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": "PACK me"}])
    assert live.choices[0].message.content == "packed"
    batch_id = _submit(oai, ["PACK", "plain"])
    for _ in range(3):
        oai.batches.retrieve(batch_id)
    results = _lines(oai, oai.batches.retrieve(batch_id).output_file_id)
    texts = [r["response"]["body"]["choices"][0]["message"]["content"]  # type: ignore[index]
             for r in results]
    assert texts == ["packed", "echo: plain"]
