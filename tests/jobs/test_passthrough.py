"""OpenAI's files and batches API through the gateway, with the official SDK: lines for OpenAI
and Anthropic models in one batch, status, output and error files, the ledger at the batch
price even before anything is downloaded, cancelling, tenants."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import GatewayFactory, budget_row, ledger_rows
from tests.fake_batches import FAIL_MARKER
from tests.fake_upstream import FakeUpstream

FAST = {"window_seconds": 60, "poll_seconds": 0.05}  # a passed-through batch does not wait


def sdk(base_url: str, key: str = "client-key") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=10)


def line(custom_id: str, model: str, text: str) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "max_tokens": 50,
                     "messages": [{"role": "user", "content": text}]}}


def upload(client: openai.OpenAI, lines: list[dict[str, Any]], **kw: Any) -> str:
    content = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    return client.files.create(file=("in.jsonl", content), purpose="batch", **kw).id


def until_ended(client: openai.OpenAI, batch_id: str, wait: float = 10.0) -> Any:
    deadline = time.monotonic() + wait
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "cancelled", "expired", "failed"):
            return batch
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.05)


def by_custom_id(raw: bytes) -> dict[str, dict[str, Any]]:
    return {x["custom_id"]: x for x in map(json.loads, raw.splitlines())}


def test_a_batch_through_the_sdk(make_gateway: GatewayFactory, fake: FakeUpstream,
                                 tmp_path: Path) -> None:
    gw = make_gateway(batching={**FAST, "on_failure": "fail"})
    lines = [line("a", "gpt-4o-mini", "first"), line("b", "claude-sonnet", "second"),
             line("c", "gpt-4o-mini", "third"), line("d", "gpt-4o-mini", f"bad {FAIL_MARKER}")]
    with sdk(gw.base_url) as client:
        file_id = upload(client, lines, extra_headers={"x-skinflint-feature": "reports"})
        created = client.batches.create(input_file_id=file_id,
                                        endpoint="/v1/chat/completions",
                                        completion_window="24h", metadata={"run": "7"})
        assert created.status in ("validating", "in_progress")
        assert created.request_counts is not None and created.request_counts.total == 4
        rows = ledger_rows(tmp_path / "skinflint.db", expect=4, wait=10)  # nothing downloaded
        batch = until_ended(client, created.id)
        assert batch.status == "completed" and batch.metadata == {"run": "7"}
        assert batch.request_counts is not None
        assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 1)
        assert batch.output_file_id and batch.error_file_id
        output = client.files.content(batch.output_file_id).content
        errors = by_custom_id(client.files.content(batch.error_file_id).content)
        uploaded = client.files.retrieve(file_id)
        assert (uploaded.purpose, uploaded.filename) == ("batch", "in.jsonl")
        assert client.files.retrieve(batch.output_file_id).bytes == len(output)
    answers = by_custom_id(output)
    assert [x["custom_id"] for x in map(json.loads, output.splitlines())] == ["a", "b", "c"]
    assert "second" in answers["b"]["response"]["body"]["choices"][0]["message"]["content"]
    assert answers["a"]["response"]["status_code"] == 200
    assert list(errors) == ["d"] and errors["d"]["response"]["status_code"] == 500
    assert sorted(len(fake.batches.batch(b)["custom_ids"]) for b in fake.batches.batch_ids()) \
        == [1, 3]  # one provider batch per provider and model
    assert len(rows) == 4
    assert {r["strategy"] for r in rows} == {"batch"}
    assert {r["feature"] for r in rows} == {"reports"}
    priced = [r for r in rows if r["status"] == 200]
    assert len(priced) == 3
    assert all(r["cost_usd"] == pytest.approx(r["baseline_cost_usd"] / 2) for r in priced)


def test_cancelling_a_batch(make_gateway: GatewayFactory, fake: FakeUpstream) -> None:
    fake.batches.hold()
    gw = make_gateway(batching=FAST)
    with sdk(gw.base_url) as client:
        file_id = upload(client, [line("x", "gpt-4o-mini", "one"),
                                  line("y", "gpt-4o-mini", "two")])
        created = client.batches.create(input_file_id=file_id,
                                        endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.monotonic() + 10
        while not fake.batches.batch_ids():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        cancelling = client.batches.cancel(created.id)
        assert cancelling.status in ("cancelling", "cancelled")
        batch = until_ended(client, created.id)
        assert batch.status == "cancelled" and batch.error_file_id
        errors = by_custom_id(client.files.content(batch.error_file_id).content)
    assert {e["error"]["code"] for e in errors.values()} == {"batch_cancelled"}
    assert len(fake.calls()) == 0  # a cancelled line is not retried


def test_bad_input_is_refused_naming_the_line(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(batching=FAST)
    with sdk(gw.base_url) as client:
        file_id = upload(client, [line("a", "gpt-4o-mini", "ok"), line("a", "gpt-4o", "dup")])
        with pytest.raises(openai.BadRequestError, match=r"line 2.*used twice"):
            client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
        with pytest.raises(openai.BadRequestError, match="purpose"):
            client.files.create(file=("x.jsonl", b"{}\n"), purpose="assistants")
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve("batch_none")


def test_files_and_batches_belong_to_their_tenant(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(batching=FAST, keys=[{"key": "sk-a", "tenant": "a"},
                                           {"key": "sk-b", "tenant": "b"}])
    with sdk(gw.base_url, "sk-a") as a, sdk(gw.base_url, "sk-b") as b:
        file_id = upload(a, [line("1", "gpt-4o-mini", "mine")])
        with pytest.raises(openai.NotFoundError):
            b.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                             completion_window="24h")
        created = a.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
        with pytest.raises(openai.NotFoundError):
            b.batches.retrieve(created.id)
        with pytest.raises(openai.NotFoundError):
            b.files.content(file_id)
        assert until_ended(a, created.id).status == "completed"


def test_batches_are_listed_newest_first_per_tenant(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(batching=FAST, keys=[{"key": "sk-a", "tenant": "a"},
                                           {"key": "sk-b", "tenant": "b"}])
    with sdk(gw.base_url, "sk-a") as a, sdk(gw.base_url, "sk-b") as b:
        made = []
        for i in range(3):
            file_id = upload(a, [line(str(i), "gpt-4o-mini", f"number {i}")])
            made.append(a.batches.create(input_file_id=file_id, completion_window="24h",
                                         endpoint="/v1/chat/completions").id)
        first = a.batches.list(limit=2)
        assert [x.id for x in first.data] == made[::-1][:2] and first.has_more
        assert [x.id for x in a.batches.list()] == made[::-1]  # the SDK pages on its own
        assert [x.id for x in b.batches.list()] == []
        with pytest.raises(openai.BadRequestError, match="limit"):
            a.batches.list(limit=1000)


def test_a_batch_is_admitted_by_the_budgets_whole_or_refused(
        make_gateway: GatewayFactory, fake: FakeUpstream) -> None:
    budget = {"name": "reports-day", "per": "feature", "match": "reports", "window": "day",
              "limit": {"requests": 3, "usd": 10.0}}
    gw = make_gateway(batching=FAST, budgets=[budget])
    reports = {"x-skinflint-feature": "reports"}
    with sdk(gw.base_url) as client:
        big = upload(client, [line(str(i), "gpt-4o-mini", f"q{i}") for i in range(4)],
                     extra_headers=reports)
        with pytest.raises(openai.RateLimitError, match="4 lines"):
            client.batches.create(input_file_id=big, endpoint="/v1/chat/completions",
                                  completion_window="24h")
        small = upload(client, [line(str(i), "gpt-4o-mini", f"q{i}") for i in range(3)],
                       extra_headers=reports)
        created = client.batches.create(input_file_id=small, endpoint="/v1/chat/completions",
                                        completion_window="24h")
        assert until_ended(client, created.id).status == "completed"
        row = budget_row(gw, lambda b: b["spent"]["usd"] > 0)
    assert row["spent"]["requests"] == 3 and row["spent"]["usd"] > 0
    assert row["reserved"] == {"usd": 0, "requests": 0, "tokens": 0}
    assert fake.batches.submitted == 3
