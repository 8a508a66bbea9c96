"""Deferred requests end to end: the openai SDK through a real gateway to the fake upstream's
batch API: 202 and a job id, the job polled to completion, the ledger at the batch price,
failed and expired lines, the webhook, a restart in the middle of a job, tenants."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import jsonschema
import openai
import pytest

from skinflint.models import Usage
from skinflint.pricing import PriceCatalog
from skinflint.server.openapi import openapi_document
from tests.conftest import GatewayFactory, budget_row, ledger_rows
from tests.fake_batches import FAIL_MARKER
from tests.fake_upstream import FakeUpstream

BATCH = {"x-skinflint-priority": "batch"}
FAST = {"window_seconds": 0.1, "poll_seconds": 0.05}


def sdk(base_url: str, key: str = "client-key") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=10)


def defer(client: openai.OpenAI, text: str, *, model: str = "gpt-4o-mini",
          headers: dict[str, str] | None = None) -> dict[str, Any]:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}],
        extra_headers={**BATCH, **(headers or {})})
    assert raw.status_code == 202
    body: dict[str, Any] = json.loads(raw.content)
    return body


def job(client: openai.OpenAI, job_id: str) -> dict[str, Any]:
    found: dict[str, Any] = client.get(f"/skinflint/jobs/{job_id}", cast_to=object)
    return found


def wait_done(client: openai.OpenAI, job_id: str, wait: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + wait
    while True:
        found = job(client, job_id)
        if found["status"] in ("completed", "failed", "cancelled"):
            return found
        assert time.monotonic() < deadline, found
        time.sleep(0.05)


def test_a_deferred_request_is_accepted_then_answered_at_the_batch_price(
        make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path) -> None:
    gw = make_gateway(batching=FAST)
    with sdk(gw.base_url) as client:
        accepted = defer(client, "what is two plus two?",
                         headers={"x-skinflint-feature": "nightly"})
        assert accepted["object"] == "skinflint.job" and accepted["status"] == "queued"
        assert accepted["id"].startswith("job_")
        done = wait_done(client, accepted["id"])
    assert done["status"] == "completed"
    schema = openapi_document()["components"]["schemas"]["Job"]
    for shown in (accepted, done):
        jsonschema.validate(shown, schema)
    completion = done["response"]
    assert completion["object"] == "chat.completion"
    assert "two plus two" in completion["choices"][0]["message"]["content"]
    assert fake.batches.submitted == 1
    rows = ledger_rows(tmp_path / "skinflint.db", expect=1)
    assert len(rows) == 1
    row = rows[0]
    assert (row["strategy"], row["feature"], row["status"]) == ("batch", "nightly", 200)
    usage = Usage(input_tokens=row["input_tokens"], output_tokens=row["output_tokens"])
    realtime = PriceCatalog().cost("gpt-4o-mini", usage)
    assert realtime is not None and realtime > 0
    assert row["baseline_cost_usd"] == pytest.approx(realtime)
    assert row["cost_usd"] == pytest.approx(realtime * 0.5)
    assert row["saved_usd"] == pytest.approx(realtime * 0.5)
    assert row["request_id"] == accepted["request_id"]


def test_requests_of_one_model_share_one_provider_batch(
        make_gateway: GatewayFactory, fake: FakeUpstream) -> None:
    gw = make_gateway(batching={"window_seconds": 0.5, "poll_seconds": 0.05})
    with sdk(gw.base_url) as client:
        ids = [defer(client, f"question {i}")["id"] for i in range(5)]
        other = defer(client, "for another model", model="gpt-4o")["id"]
        answers = [wait_done(client, i) for i in [*ids, other]]
    assert all(a["status"] == "completed" for a in answers)
    sizes = sorted(fake.batches.batch(b)["lines"] for b in fake.batches.batch_ids())
    assert sizes == [1, 5]


def test_a_deferrable_feature_is_deferred_without_asking(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(batching={**FAST, "features": {"nightly": {"deferrable": True}}})
    with sdk(gw.base_url) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-skinflint-feature": "nightly"})
        assert raw.status_code == 202
        live = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-skinflint-feature": "nightly",
                           "x-skinflint-priority": "realtime"})
        assert live.status_code == 200
        streamed = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True,
            extra_headers={"x-skinflint-feature": "nightly"})
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)


def test_what_cannot_be_deferred_is_refused(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(batching=FAST)
    with sdk(gw.base_url) as client:
        with pytest.raises(openai.BadRequestError, match="non-streaming"):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                stream=True, extra_headers=BATCH)
        with pytest.raises(openai.BadRequestError, match="x-skinflint-priority"):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-skinflint-priority": "soon"})
        with pytest.raises(openai.NotFoundError):
            job(client, "job_nothing")


@pytest.mark.parametrize("on_failure", ["realtime", "fail"])
def test_a_failed_line_is_retried_in_real_time_or_reported(
        make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path,
        on_failure: str) -> None:
    gw = make_gateway(batching={**FAST, "on_failure": on_failure})
    with sdk(gw.base_url) as client:
        good = defer(client, "fine")["id"]
        bad = defer(client, f"this one breaks {FAIL_MARKER}")["id"]
        answers = {i: wait_done(client, i) for i in (good, bad)}
    assert answers[good]["status"] == "completed"
    rows = {r["request_id"]: r for r in ledger_rows(tmp_path / "skinflint.db", expect=2)}
    assert len(rows) == 2
    bad_row = rows[answers[bad]["request_id"]]
    if on_failure == "realtime":
        assert answers[bad]["status"] == "completed"
        assert answers[bad]["response"]["object"] == "chat.completion"
        assert len(fake.calls()) == 1  # the one real-time retry
        assert (bad_row["strategy"], bad_row["status"]) == ("", 200)
        assert bad_row["cost_usd"] == pytest.approx(bad_row["baseline_cost_usd"])
        assert bad_row["cost_usd"] > 0
    else:
        assert answers[bad]["status"] == "failed"
        assert answers[bad]["error"]["code"] == "failed"
        assert "error" in answers[bad]["error"]["message"]
        assert len(fake.calls()) == 0
        assert (bad_row["strategy"], bad_row["status"], bad_row["cost_usd"]) == ("batch", 502, 0)


@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-sonnet"])
def test_an_expired_batch_is_answered_in_real_time(
        make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path, model: str) -> None:
    fake.batches.expire_next(1)
    gw = make_gateway(batching=FAST)
    with sdk(gw.base_url) as client:
        ids = [defer(client, f"late {i}", model=model)["id"] for i in range(3)]
        answers = [wait_done(client, i) for i in ids]
    assert [a["status"] for a in answers] == ["completed"] * 3
    assert all(a["response"]["object"] == "chat.completion" for a in answers)
    path = "/v1/chat/completions" if model.startswith("gpt") else "/v1/messages"
    assert len(fake.calls(path)) == 3
    rows = ledger_rows(tmp_path / "skinflint.db", expect=3)
    assert sorted(r["strategy"] for r in rows) == ["", "", ""]


def test_an_expired_line_is_reported_failed(make_gateway: GatewayFactory,
                                             fake: FakeUpstream) -> None:
    fake.batches.expire_next(1)
    gw = make_gateway(batching={**FAST, "on_failure": "fail"})
    with sdk(gw.base_url) as client:
        answer = wait_done(client, defer(client, "too late")["id"])
    assert answer["status"] == "failed" and answer["error"]["code"] == "expired"
    assert "response" not in answer and len(fake.calls()) == 0


def test_an_anthropic_model_is_deferred_through_message_batches(
        make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path) -> None:
    gw = make_gateway(batching=FAST)
    with sdk(gw.base_url) as client:
        answer = wait_done(client, defer(client, "bonjour", model="claude-sonnet")["id"])
    assert answer["status"] == "completed"
    assert "bonjour" in answer["response"]["choices"][0]["message"]["content"]
    assert [fake.batches.batch(b)["api"] for b in fake.batches.batch_ids()] == ["anthropic"]
    (row,) = ledger_rows(tmp_path / "skinflint.db", expect=1)
    assert row["strategy"] == "batch" and row["provider"] == "claude"
    assert row["cost_usd"] == pytest.approx(row["baseline_cost_usd"] / 2)


class _Hooks(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []
    fail_first = 0

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if _Hooks.fail_first > 0:
            _Hooks.fail_first -= 1
            self.send_response(503)
        else:
            _Hooks.received.append(body)
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hooks() -> Iterator[str]:
    _Hooks.received, _Hooks.fail_first = [], 1
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hooks)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook?token=abc"
    server.shutdown()
    server.server_close()


def test_the_webhook_hears_each_finished_job(make_gateway: GatewayFactory, hooks: str) -> None:
    gw = make_gateway(batching={**FAST, "webhook": hooks})
    with sdk(gw.base_url) as client:
        job_id = defer(client, "tell me when")["id"]
        wait_done(client, job_id)
    deadline = time.monotonic() + 10  # the first delivery failed: retried after a second
    while not _Hooks.received and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _Hooks.received == [{"id": job_id, "status": "completed"}]


def test_a_restart_in_the_middle_of_a_job_loses_and_doubles_nothing(
        make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path) -> None:
    fake.batches.hold()
    first = make_gateway(batching=FAST)
    with sdk(first.base_url) as client:
        ids = [defer(client, f"survive {i}")["id"] for i in range(4)]
        deadline = time.monotonic() + 10
        while not fake.batches.batch_ids():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert job(client, ids[0])["status"] == "submitted"
    first.__exit__(None, None, None)
    second = make_gateway(batching=FAST)
    fake.batches.release()
    with sdk(second.base_url) as client:
        answers = [wait_done(client, i) for i in ids]
    assert [a["status"] for a in answers] == ["completed"] * 4
    assert fake.batches.submitted == 4  # sent once
    rows = ledger_rows(tmp_path / "skinflint.db", expect=4)
    time.sleep(0.3)  # nothing more arrives
    rows = ledger_rows(tmp_path / "skinflint.db")
    assert sorted(r["request_id"] for r in rows) == sorted(a["request_id"] for a in answers)
    assert {r["strategy"] for r in rows} == {"batch"}


def test_a_job_is_seen_only_with_its_tenants_key(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(batching=FAST, keys=[{"key": "sk-team-a", "tenant": "a"},
                                           {"key": "sk-team-b", "tenant": "b"}])
    with sdk(gw.base_url, "sk-team-a") as a, sdk(gw.base_url, "sk-team-b") as b:
        job_id = defer(a, "private")["id"]
        assert wait_done(a, job_id)["status"] == "completed"
        with pytest.raises(openai.NotFoundError):
            job(b, job_id)
    with sdk(gw.base_url, "sk-nobody") as nobody, pytest.raises(openai.AuthenticationError):
        job(nobody, job_id)


def test_a_route_is_answered_in_real_time_or_refused(make_gateway: GatewayFactory) -> None:
    routes = {"smart": {"default_task": "chat", "tasks": {"chat": {"model": "gpt-4o-mini"}}}}
    gw = make_gateway(routes=routes, batching={**FAST, "features": {"nightly": {
        "deferrable": True}}})
    with sdk(gw.base_url) as client:
        with pytest.raises(openai.BadRequestError, match="cannot be deferred"):
            client.chat.completions.create(
                model="smart", messages=[{"role": "user", "content": "hi"}], extra_headers=BATCH)
        live = client.chat.completions.with_raw_response.create(
            model="smart", messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-skinflint-feature": "nightly"})
        assert live.status_code == 200


def test_the_providers_batch_discount_prices_a_model_the_catalog_has_no_batch_price_for(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = make_gateway(batching=FAST, fake_opts={"batch_discount": 0.8})
    with sdk(gw.base_url) as client:
        done = wait_done(client, defer(client, "priced by the config", model="cheap")["id"])
    assert done["status"] == "completed"
    (row,) = ledger_rows(tmp_path / "skinflint.db", expect=1)
    realtime = (row["input_tokens"] * 0.01 + row["output_tokens"] * 0.02) / 1e6  # its override
    assert row["baseline_cost_usd"] == pytest.approx(realtime)
    assert row["cost_usd"] == pytest.approx(realtime * 0.8)


def test_budgets_admit_at_acceptance_and_count_the_spend_when_the_result_arrives(
        make_gateway: GatewayFactory, fake: FakeUpstream) -> None:
    fake.batches.hold()
    budget = {"name": "nightly-day", "per": "feature", "match": "nightly", "window": "day",
              "limit": {"usd": 10.0, "requests": 2}}
    gw = make_gateway(batching=FAST, budgets=[budget])
    nightly = {"x-skinflint-feature": "nightly"}
    with sdk(gw.base_url) as client:
        ids = [defer(client, f"job {i}", headers=nightly)["id"] for i in range(2)]
        with pytest.raises(openai.RateLimitError):  # the third is refused at acceptance
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}],
                extra_headers={**BATCH, **nightly})
        (row,) = httpx.get(gw.root_url + "/api/budgets").json()["data"]
        assert row["spent"]["requests"] == 2 and row["spent"]["usd"] == 0
        fake.batches.release()
        for i in ids:
            wait_done(client, i)
        row = budget_row(gw, lambda b: b["spent"]["usd"] > 0)
    assert row["spent"]["requests"] == 2 and row["spent"]["usd"] > 0
    assert row["reserved"] == {"usd": 0, "requests": 0, "tokens": 0}


def test_a_batch_line_keeps_every_token_column_of_its_usage(
        make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path) -> None:
    gw = make_gateway(batching=FAST)
    with sdk(gw.base_url) as client:
        accepted = defer(client, "listen [[audio_in=2]] [[reasoning=3]] [[cached=1]]")
        assert wait_done(client, accepted["id"])["status"] == "completed"
    (row,) = ledger_rows(tmp_path / "skinflint.db", expect=1)
    assert (row["input_audio_tokens"], row["reasoning_tokens"], row["cached_tokens"]) == (2, 3, 1)


def _ask(client: openai.OpenAI, text: str, headers: dict[str, str]) -> Any:
    return client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}], temperature=0,
        extra_headers=headers)


def test_a_deferred_request_the_cache_answers_is_not_sent_again(
        make_gateway: GatewayFactory, fake: FakeUpstream, hooks: str, tmp_path: Path) -> None:
    gw = make_gateway(batching={**FAST, "webhook": hooks})
    with sdk(gw.base_url) as client:
        paid = json.loads(_ask(client, "what is two plus two?", {}).content)
        calls = len(fake.calls())
        raw = _ask(client, "what is two plus two?", BATCH)
        assert raw.status_code == 202
        accepted = json.loads(raw.content)
        assert accepted["status"] == "completed" and accepted["response"] == paid
        jsonschema.validate(accepted, openapi_document()["components"]["schemas"]["Job"])
        assert job(client, accepted["id"])["response"] == paid
        refused = _ask(client, "what is two plus two?", {**BATCH, "x-skinflint-cache": "bypass"})
        sent = wait_done(client, json.loads(refused.content)["id"])
    assert sent["status"] == "completed"
    assert fake.batches.submitted == 1  # the request that would not take the cached answer
    assert len(fake.calls()) == calls == 1  # nothing else went upstream in real time
    rows = ledger_rows(tmp_path / "skinflint.db", expect=3)
    hit = next(r for r in rows if r["request_id"] == accepted["request_id"])
    assert (hit["cache_status"], hit["strategy"], hit["cost_usd"], hit["status"]) == (
        "hit-exact", "exact_cache", 0.0, 200)
    assert hit["saved_usd"] == hit["baseline_cost_usd"] > 0
    assert sorted(r["strategy"] for r in rows) == ["", "batch", "exact_cache"]
    deadline = time.monotonic() + 10  # the first delivery failed: retried after a second
    while len(_Hooks.received) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {"id": accepted["id"], "status": "completed"} in _Hooks.received
    metrics = httpx.get(gw.root_url + "/metrics").text
    assert 'skinflint_jobs_finished_total{outcome="completed"} 2.0' in metrics.splitlines()


def test_a_deferred_request_is_not_answered_from_another_tenants_cache(
        make_gateway: GatewayFactory, fake: FakeUpstream) -> None:
    gw = make_gateway(batching=FAST, keys=[{"key": "key-a", "tenant": "a"},
                                           {"key": "key-b", "tenant": "b"}])
    with sdk(gw.base_url, "key-a") as a, sdk(gw.base_url, "key-b") as b:
        _ask(a, "what is two plus two?", {})
        accepted = json.loads(_ask(b, "what is two plus two?", BATCH).content)
        assert accepted["status"] == "queued"
        assert wait_done(b, accepted["id"])["status"] == "completed"
    assert fake.batches.submitted == 1


def test_a_batchs_answer_is_stored_for_the_requests_that_follow(
        make_gateway: GatewayFactory, fake: FakeUpstream) -> None:
    gw = make_gateway(batching=FAST)
    with sdk(gw.base_url) as client:
        first = json.loads(_ask(client, "what is three plus three?", BATCH).content)
        answer = wait_done(client, first["id"])["response"]
        again = _ask(client, "what is three plus three?", {})
        assert json.loads(again.content) == answer
        assert again.headers["x-skinflint-cache"] == "hit-exact"
        repeat = json.loads(_ask(client, "what is three plus three?", BATCH).content)
        assert repeat["status"] == "completed" and repeat["response"] == answer
        tagged = json.loads(_ask(client, "what is four plus four?",
                                 {**BATCH, "x-skinflint-tags": "docs"}).content)
        wait_done(client, tagged["id"])
        assert _ask(client, "what is four plus four?",
                    {"x-skinflint-tags": "docs"}).headers["x-skinflint-cache"] == "miss"
    assert fake.batches.submitted == 2 and len(fake.calls()) == 1


def test_capped_and_uncapped_answers_are_kept_apart(
        make_gateway: GatewayFactory, fake: FakeUpstream) -> None:
    """A deferred request is sent with no output cap: its answer is never served to a request
    the token budgets cap, nor a capped answer to it."""
    gw = make_gateway(batching=FAST, token_budgets={"default": {"max_tokens": 50}})
    with sdk(gw.base_url) as client:
        _ask(client, "what is five plus five?", {})  # capped, cached
        first = json.loads(_ask(client, "what is five plus five?", BATCH).content)
        assert first["status"] == "queued"
        wait_done(client, first["id"])
        assert _ask(client, "what is five plus five?", {}).headers["x-skinflint-cache"] == (
            "hit-exact")  # the capped answer, still
        again = json.loads(_ask(client, "what is five plus five?", BATCH).content)
        assert again["status"] == "completed"  # the batch's own answer
    assert fake.batches.submitted == 1 and len(fake.calls()) == 1


def test_an_answer_of_another_model_than_the_one_asked_is_not_stored(
        make_gateway: GatewayFactory, fake: FakeUpstream) -> None:
    budget = {"name": "bulk-daily", "per": "feature", "match": "bulk", "limit": {"requests": 1},
              "action": "downgrade", "downgrade_to": "cheap"}
    gw = make_gateway(batching=FAST, budgets=[budget])
    bulk = {**BATCH, "x-skinflint-feature": "bulk"}
    with sdk(gw.base_url) as client:
        first = json.loads(_ask(client, "what is six plus six?", bulk).content)
        second = json.loads(_ask(client, "what is seven plus seven?", bulk).content)
        assert wait_done(client, second["id"])["response"]["model"] == "qwen3-8b"
        wait_done(client, first["id"])
        hits = [_ask(client, f"what is {n} plus {n}?", {}).headers["x-skinflint-cache"]
                for n in ("six", "seven")]
    assert hits == ["hit-exact", "miss"]
