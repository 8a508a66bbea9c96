"""skinflint.batch_map as a library call: against the fake upstream directly (any
OpenAI-compatible endpoint) and against the gateway."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

import skinflint
from skinflint.batchmap import BatchResult
from skinflint.models import Usage
from skinflint.pricing import PriceCatalog
from tests.conftest import GatewayFactory, ledger_rows
from tests.fake_packed import PackedAnswerer, classify, packed_items
from tests.fake_upstream import FakeUpstream

INSTRUCTION = "Classify the sentiment: positive or negative."
REVIEWS = [f"order {i}: " + ("it broke on day one" if i % 3 else "works great") for i in range(45)]


def _sizes(fake: FakeUpstream) -> list[int]:
    found = [packed_items(c.body) for c in fake.calls() if c.body is not None]
    return [len(c) for c in found if c is not None]


def test_the_package_exports_it() -> None:
    assert {"batch_map", "abatch_map"} <= set(skinflint.__all__)
    from skinflint import abatch_map, batch_map

    assert callable(batch_map) and callable(abatch_map)


def test_against_an_openai_compatible_endpoint(fake: FakeUpstream) -> None:
    answerer = PackedAnswerer(drop=0.1, seed=4)
    fake.add_answerer(answerer)
    result = skinflint.batch_map(REVIEWS, INSTRUCTION, model="gpt-4o-mini",
                                 base_url=fake.base_url, max_items_per_call=15, api_key="sk-x")
    assert isinstance(result, BatchResult)
    assert result.outputs == [classify(r) for r in REVIEWS]
    assert [r.id for r in result.results] == [str(i) for i in range(45)]
    assert {r.status for r in result.results} == {"ok", "retried"}
    assert _sizes(fake)[:3] == [15, 15, 15] and result.calls == len(_sizes(fake)) > 3
    assert fake.calls()[0].headers["authorization"] == "Bearer sk-x"
    # no gateway to say the cost: priced from the catalog by the usage the endpoint gave
    usage = Usage(result.usage["prompt_tokens"], result.usage["completion_tokens"])
    expected = PriceCatalog().cost("gpt-4o-mini", usage)
    assert expected is not None and result.cost_usd == pytest.approx(expected)
    as_json = result.to_json()
    assert set(as_json) == {"results", "calls", "usage", "cost_usd"}
    assert as_json["results"][0] == {"id": "0", "output": "positive",
                                     "status": result.results[0].status}


def test_through_the_gateway_each_item_is_ledgered_under_the_feature(
        fake: FakeUpstream, make_gateway: GatewayFactory, tmp_path: Path) -> None:
    fake.add_answerer(PackedAnswerer())
    gw = make_gateway()
    result = skinflint.batch_map(REVIEWS[:20], INSTRUCTION, model="cheap",
                                 base_url=gw.base_url, feature="support-triage",
                                 api_key=None)  # no key needed by this gateway
    assert result.outputs == [classify(r) for r in REVIEWS[:20]]
    rows = ledger_rows(tmp_path / "skinflint.db", expect=20)
    # the library talks chat completions: one row per call, its cost read from the gateway
    assert {r["feature"] for r in rows} == {"support-triage"}
    assert result.cost_usd == pytest.approx(sum(r["cost_usd"] for r in rows))
    assert result.calls == len(rows) == 1


async def test_the_async_variant_and_objects_with_ids(fake: FakeUpstream) -> None:
    fake.add_answerer(PackedAnswerer(as_object=True))
    items = [{"id": "sku-1", "input": "love it"}, {"id": "sku-2", "input": "awful"}]
    result = await skinflint.abatch_map(
        items, INSTRUCTION, model="gpt-4o-mini", base_url=fake.base_url,
        response_schema={"type": "object", "required": ["label"]})
    assert [r.to_json() for r in result.results] == [
        {"id": "sku-1", "output": {"label": "positive"}, "status": "ok"},
        {"id": "sku-2", "output": {"label": "negative"}, "status": "ok"}]
    with pytest.raises(RuntimeError, match="abatch_map"):
        skinflint.batch_map(items, INSTRUCTION, model="gpt-4o-mini", base_url=fake.base_url)


def test_a_refused_key_stops_the_run(fake: FakeUpstream, make_gateway: GatewayFactory) -> None:
    gw = make_gateway(keys=[{"key": "sk-gw-1", "tenant": "acme"}])
    with pytest.raises(openai.AuthenticationError):
        skinflint.batch_map(["a", "b"], INSTRUCTION, model="gpt-4o-mini", base_url=gw.base_url,
                            api_key="wrong", max_retries=0)
    assert fake.calls() == []


def test_an_upstream_failing_gives_each_item_an_error(fake: FakeUpstream) -> None:
    fake.fail_next("status=500", times=100)
    result = skinflint.batch_map(["a", "b", "c"], INSTRUCTION, model="gpt-4o-mini",
                                 base_url=fake.base_url, max_retries=0)
    assert {r.status for r in result.results} == {"error"}
    assert all(r.error.startswith("upstream call failed") for r in result.results)
    assert _sizes(fake) == [3, 1, 1, 1]  # the batch, then each alone
