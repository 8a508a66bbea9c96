"""Listing and deleting files through the gateway with the official SDK (tenants, the file a
running batch uses), the job metrics on ``/metrics``, and a job gone after retention answering
404 as an unknown one does."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from skinflint.storage.sqlite_jobs import SQLiteJobStore
from tests.conftest import GatewayFactory
from tests.fake_upstream import FakeUpstream
from tests.jobs.test_deferred import FAST, defer, job, wait_done
from tests.jobs.test_passthrough import line, sdk, until_ended, upload

TENANTS = [{"key": "sk-a", "tenant": "a"}, {"key": "sk-b", "tenant": "b"}]


def test_files_are_listed_newest_first_per_tenant_in_pages(
        make_gateway: GatewayFactory) -> None:
    gw = make_gateway(batching=FAST, keys=TENANTS)
    with sdk(gw.base_url, "sk-a") as a, sdk(gw.base_url, "sk-b") as b:
        mine = [upload(a, [line(str(i), "gpt-4o-mini", "hi")]) for i in range(3)]
        theirs = upload(b, [line("x", "gpt-4o-mini", "hi")])
        listed = a.files.list()
        assert [f.id for f in listed.data] == mine[::-1]
        assert all(f.purpose == "batch" and f.filename == "in.jsonl" and f.bytes > 0
                   for f in listed.data)
        assert listed.has_more is False
        page = a.files.list(limit=2)
        assert [f.id for f in page.data] == mine[:0:-1] and page.has_more is True
        assert [f.id for f in a.files.list(limit=2)] == mine[::-1]  # the SDK pages on
        assert [f.id for f in a.files.list(after=mine[1])] == [mine[0]]
        assert [f.id for f in a.files.list(purpose="batch", order="asc")] == mine
        assert a.files.list(purpose="fine-tune").data == []
        assert [f.id for f in b.files.list()] == [theirs]
        with pytest.raises(openai.BadRequestError, match="limit"):
            a.files.list(limit=0)


def test_a_file_is_deleted_by_its_tenant_once_no_running_batch_uses_it(
        make_gateway: GatewayFactory, fake: FakeUpstream) -> None:
    fake.batches.hold()
    gw = make_gateway(batching=FAST, keys=TENANTS)
    with sdk(gw.base_url, "sk-a") as a, sdk(gw.base_url, "sk-b") as b:
        file_id = upload(a, [line("1", "gpt-4o-mini", "one")])
        spare = upload(a, [line("2", "gpt-4o-mini", "two")])
        created = a.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
        with pytest.raises(openai.NotFoundError) as other:
            b.files.delete(file_id)
        assert other.value.status_code == 404
        with pytest.raises(openai.BadRequestError) as refused:
            a.files.delete(file_id)
        assert refused.value.code == "file_in_use" and "running" in refused.value.message
        deleted = a.files.delete(spare)
        assert (deleted.id, deleted.object, deleted.deleted) == (spare, "file", True)
        with pytest.raises(openai.NotFoundError):
            a.files.retrieve(spare)
        with pytest.raises(openai.NotFoundError):
            a.files.delete(spare)
        a.batches.cancel(created.id)
        ended = until_ended(a, created.id)
        assert ended.status == "cancelled"
        assert a.files.delete(file_id).deleted is True
        assert a.files.list().data == []
        assert a.batches.retrieve(created.id).input_file_id == file_id  # the batch stays
        assert ended.error_file_id is not None
        with pytest.raises(openai.BadRequestError, match="kept as long as the batch"):
            a.files.delete(ended.error_file_id)
        with pytest.raises(openai.NotFoundError):
            b.files.delete(ended.error_file_id)


def _sample(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found is not None, name
    return float(found.group(1))


def test_job_metrics_and_a_purged_job_answers_404(make_gateway: GatewayFactory,
                                                  tmp_path: Path) -> None:
    gw = make_gateway(batching=FAST)
    with sdk(gw.base_url) as client:
        accepted = defer(client, "what is two plus two?")
        assert wait_done(client, accepted["id"])["status"] == "completed"
        file_id = upload(client, [line("a", "gpt-4o-mini", "x"), line("b", "gpt-4o-mini", "y")])
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        assert until_ended(client, batch.id).status == "completed"
        deadline = time.monotonic() + 10
        while True:  # the gauge is set at the lease holder's next round
            text = httpx.get(gw.root_url + "/metrics").text
            if _sample(text, 'skinflint_jobs_finished_total{outcome="completed"}') == 3 and \
                    _sample(text, 'skinflint_jobs_waiting{state="submitted"}') == 0:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
        assert _sample(text, 'skinflint_jobs_accepted_total{source="deferred"}') == 1
        assert _sample(text, 'skinflint_jobs_accepted_total{source="batch"}') == 2
        assert _sample(text, 'skinflint_jobs_waiting{state="queued"}') == 0
        assert _sample(text, 'skinflint_jobs_purged_total{kind="job"}') == 0
        assert _sample(text, 'skinflint_jobs_finished_total{outcome="failed"}') == 0

        async def purge() -> int:  # as the retention does, once keep_days have passed
            store = await asyncio.to_thread(SQLiteJobStore, str(tmp_path / "skinflint.db"))
            try:
                return (await store.purge(time.time() + 1, 1000)).jobs
            finally:
                await store.close()

        assert asyncio.run(purge()) == 3
        for gone in (accepted["id"], "job_never_made"):
            with pytest.raises(openai.NotFoundError) as raised:
                job(client, gone)
            body = raised.value.body
            assert isinstance(body, dict) and body["type"] == "invalid_request_error"
            assert body["code"] == "not_found" and gone in body["message"]
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve(batch.id)
        assert client.files.list().data == []
