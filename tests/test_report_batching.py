"""``skinflint report --by strategy`` over a ledger a real gateway wrote with both kinds of
batching: deferred requests answered through the provider's batch API (``batch``: requests,
at the batch price) and a ``batch_map`` call (one row per item, with the prompt tokens packing
saved), beside a real-time request whose system prompt the compress stage sent to a cheap
model (``compress_call``: an attempt, not a request). Every figure is checked against the
ledger's rows."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from skinflint.cli.output import count, usd
from skinflint.models import COMPRESS_CALL
from tests.conftest import GatewayFactory, ledger_rows
from tests.fake_packed import PackedAnswerer
from tests.fake_upstream import FakeUpstream
from tests.test_report import _cli, _figures, _fits, _piped

ITEMS = 12
DEFERRED = 3
SYSTEM = "\n\n".join(f"Rule {i}: answer politely, cite the manual, never guess about item {i}."
                     for i in range(12))


@pytest.fixture
def ledger(make_gateway: GatewayFactory, fake: FakeUpstream,
           tmp_path: Path) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    """The ledger after the traffic, and its rows."""
    fake.add_answerer(PackedAnswerer())
    gw = make_gateway(
        batching={"window_seconds": 0.1, "poll_seconds": 0.05,
                  "features": {"nightly": {"deferrable": True}}},
        compression={"features": {"support": {
            "system_prompt": {"rewrite_with": "gpt-4o-mini", "min_tokens": 50}}}})
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0, timeout=30) as client:
        mapped = client.post("/skinflint/batch_map", cast_to=object, body={
            "model": "gpt-4o-mini", "instruction": "Classify the sentiment of the review.",
            "items": [f"review {i}: {'love it' if i % 2 else 'broken'}" for i in range(ITEMS)],
            "max_items_per_call": 4}, options={"headers": {"x-skinflint-feature": "labels"}})
        assert isinstance(mapped, dict) and mapped["calls"] == ITEMS // 4
        jobs = []
        for i in range(DEFERRED):
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=[{"role": "user", "content": f"Nightly check {i}"}],
                extra_headers={"x-skinflint-feature": "nightly"})
            assert raw.status_code == 202
            jobs.append(raw.http_response.json()["id"])
        client.chat.completions.create(
            model="gpt-4o", extra_headers={"x-skinflint-feature": "support"},
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}])
        deadline = time.monotonic() + 10
        for job in jobs:
            while client.get(f"/skinflint/jobs/{job}", cast_to=object)["status"] != "completed":
                assert time.monotonic() < deadline
                time.sleep(0.05)
    db = tmp_path / "skinflint.db"
    rows = ledger_rows(db, expect=ITEMS + DEFERRED + 2)
    yield db, rows


def _of(rows: list[dict[str, Any]], strategy: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["strategy"] == strategy]


def _sum(rows: list[dict[str, Any]], key: str) -> float:
    return math.fsum(r[key] or 0.0 for r in rows)


def test_batch_and_batch_map_rows_by_strategy(
    ledger: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    db, rows = ledger
    batch, mapped = _of(rows, "batch"), _of(rows, "batch_map")
    compress, plain = _of(rows, COMPRESS_CALL), _of(rows, "")
    assert (len(batch), len(mapped), len(compress), len(plain)) == (DEFERRED, ITEMS, 1, 1)
    report = _cli(capsys, "report", "--db", str(db), "--by", "strategy", "--json")
    groups = {g["key"]: g for g in report["groups"]}
    assert set(groups) == {"batch", "batch_map", COMPRESS_CALL, "none"}

    b = groups["batch"]  # client requests, answered later at the batch price
    assert (b["requests"], b["cascade_attempts"], b["errors"]) == (DEFERRED, 0, 0)
    assert b["cost_usd"] == pytest.approx(_sum(batch, "cost_usd"))
    assert b["baseline_cost_usd"] == pytest.approx(_sum(batch, "baseline_cost_usd"))
    assert b["saved_usd"] == pytest.approx(_sum(batch, "saved_usd"))
    assert b["cost_usd"] > 0 and b["saved_usd"] == pytest.approx(b["cost_usd"])  # half price
    assert b["tokens_saved"] == 0
    assert b["input_tokens"] == sum(r["input_tokens"] for r in batch)

    m = groups["batch_map"]  # one request per item, with the tokens packing saved
    assert m["requests"] == ITEMS
    assert m["tokens_saved"] == sum(r["tokens_saved"] for r in mapped) > 0
    assert m["cost_usd"] == pytest.approx(_sum(mapped, "cost_usd"))
    assert m["saved_usd"] == pytest.approx(_sum(mapped, "saved_usd"))
    assert m["cost_usd"] > 0 and m["saved_usd"] > 0

    c = groups[COMPRESS_CALL]  # an attempt on behalf of the support request
    assert (c["requests"], c["compress_calls"]) == (0, 1)
    assert compress[0]["cost_usd"] > 0
    assert c["compress_cost_usd"] == pytest.approx(compress[0]["cost_usd"])

    total = report["total"]
    assert total["requests"] == DEFERRED + ITEMS + 1
    assert total["cost_usd"] == pytest.approx(_sum(rows, "cost_usd"))
    realtime = sorted(r["latency_ms"] for r in rows if r["strategy"] not in ("batch",
                                                                              COMPRESS_CALL))
    assert total["p95_latency_ms"] == realtime[min(int(len(realtime) * 0.95),
                                                   len(realtime) - 1)]
    assert b["p50_latency_ms"] == 0.0  # waiting for a batch is not a response time

    lines = _fits(_piped(tmp_path, "report", "--db", str(db), "--by", "strategy"))
    share = b["saved_usd"] / b["baseline_cost_usd"]
    assert _figures(lines, "Spend by strategy", "batch") == [
        str(DEFERRED), usd(b["cost_usd"]), usd(b["baseline_cost_usd"]), usd(b["saved_usd"]),
        f"{share:.0%}"]
    traffic = _figures(lines, "Requests by strategy", "batch_map")
    assert traffic[0] == str(ITEMS) and count(m["tokens_saved"]) in traffic
    assert _figures(lines, "Requests by strategy", "batch")[-1] == "-"
