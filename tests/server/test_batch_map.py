"""POST /v1/skinflint/batch_map through the real gateway, the fake upstream answering the
packed format, the openai SDK as the client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from skinflint.packing import Item, PackSpec, solo_messages
from skinflint.tokens import TokenCounter
from tests.conftest import GatewayFactory, ledger_rows
from tests.fake_packed import ALWAYS_MALFORMED, PackedAnswerer, classify, packed_items
from tests.fake_upstream import FakeUpstream

INSTRUCTION = "Classify the sentiment of the review: positive or negative."
TOKENS = TokenCounter()


def _reviews(n: int, start: int = 0) -> list[str]:
    kinds = ("great value, works well", "arrived broken, want a refund", "love it",
             "terrible support and slow")
    return [f"review {i}: {kinds[i % len(kinds)]}" for i in range(start, start + n)]


def _client(gw: Any, key: str = "client-key", **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=30,
                         default_headers=headers)


def _batch_map(client: openai.OpenAI, **body: Any) -> dict[str, Any]:
    found: dict[str, Any] = client.post("/skinflint/batch_map", body=body, cast_to=object)
    return found


def _sent(fake: FakeUpstream) -> list[list[dict[str, Any]]]:
    """The items each packed call the upstream received carried, in order of arrival."""
    calls = [packed_items(c.body) for c in fake.calls() if c.body is not None]
    return [c for c in calls if c is not None]


def test_every_item_is_answered_in_order_though_the_upstream_drops_some(
        fake: FakeUpstream, make_gateway: GatewayFactory) -> None:
    answerer = PackedAnswerer(drop=0.08, duplicate=0.02, malformed=0.02, seed=1)
    fake.add_answerer(answerer)
    items = _reviews(80)
    with _client(make_gateway()) as client:
        answer = _batch_map(client, model="gpt-4o-mini", instruction=INSTRUCTION, items=items,
                            max_items_per_call=20)
    results = answer["results"]
    assert [r["id"] for r in results] == [str(i) for i in range(80)]
    assert [r for r in results if r["status"] == "error"] == []
    assert [r["output"] for r in results] == [classify(t) for t in items]
    statuses = {r["status"] for r in results}
    assert statuses == {"ok", "retried"}
    assert sum(answerer.faults.values()) == sum(r["status"] == "retried" for r in results)
    sent = _sent(fake)
    assert answer["calls"] == len(sent) == answerer.calls > 4
    assert [len(c) for c in sent[:4]] == [20, 20, 20, 20]
    upstream = [c.body for c in fake.calls()]
    assert all(b is not None and b["response_format"]["type"] == "json_schema" for b in upstream)
    assert answer["usage"]["prompt_tokens"] > 0
    assert answer["usage"]["total_tokens"] == (answer["usage"]["prompt_tokens"]
                                               + answer["usage"]["completion_tokens"])


def test_an_item_failing_is_retried_in_a_smaller_batch_then_alone_then_reported(
        fake: FakeUpstream, make_gateway: GatewayFactory) -> None:
    fake.add_answerer(PackedAnswerer())
    items = _reviews(40)
    for i in (3, 5, 8):
        items[i] = f"{ALWAYS_MALFORMED} review {i}"
    with _client(make_gateway()) as client:
        answer = _batch_map(client, model="gpt-4o-mini", instruction=INSTRUCTION, items=items,
                            max_items_per_call=20)
    results = answer["results"]
    for i, r in enumerate(results):
        if i in (3, 5, 8):
            assert r["status"] == "error" and r["output"] is None
            assert r["error"] == "the result has no 'output'"
        else:
            assert r["status"] == "ok" and r["output"] == classify(items[i])
    bad = {str(i) for i in (3, 5, 8)}
    sizes = [len(c) for c in _sent(fake) if bad & {str(i["id"]) for i in c}]
    assert sizes == [20, 3, 1, 1, 1]  # first batch, a smaller one (a quarter), then alone
    assert answer["calls"] == 2 + 1 + 3


def test_each_item_has_a_ledger_row_with_its_share_of_the_call(
        fake: FakeUpstream, make_gateway: GatewayFactory, tmp_path: Path) -> None:
    fake.add_answerer(PackedAnswerer(drop=0.1, seed=2))
    items = _reviews(30)
    with _client(make_gateway(), **{"x-skinflint-feature": "reviews"}) as client:
        answer = _batch_map(client, model="cheap", instruction=INSTRUCTION, items=items,
                            max_items_per_call=10)
    sent = sum(len(c) for c in _sent(fake))
    rows = ledger_rows(tmp_path / "skinflint.db", expect=sent)
    assert len(rows) == sent > 30  # the retried items have a row for each call they were in
    assert {r["strategy"] for r in rows} == {"batch_map"}
    assert {r["feature"] for r in rows} == {"reviews"}
    assert answer["cost_usd"] > 0
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(answer["cost_usd"], rel=1e-9)
    calls = {r["request_id"].rsplit(".i", 1)[0] for r in rows}
    assert len(calls) == answer["calls"]
    assert sum(r["input_tokens"] for r in rows) == answer["usage"]["prompt_tokens"]
    assert sum(r["output_tokens"] for r in rows) == answer["usage"]["completion_tokens"]
    first = sorted(int(r["request_id"].rsplit(".i", 1)[1]) for r in rows)
    assert set(first) == set(range(30))
    # each item's baseline is the item asked alone, counted once (a retry's rows have none)
    spec = PackSpec("cheap", INSTRUCTION)
    for position in range(30):
        mine = [r for r in rows if r["request_id"].endswith(f".i{position}")]
        based = [r for r in mine if r["baseline_cost_usd"] > 0]
        assert len(based) == 1
        alone = TOKENS.count_messages("cheap", solo_messages(spec, Item("", items[position], 0)))
        expected = (alone * 0.01 + based[0]["output_tokens"] * 0.02) / 1e6
        assert based[0]["baseline_cost_usd"] == pytest.approx(expected)
        # the prompt tokens packing saved: the item alone against its share of the call
        assert based[0]["tokens_saved"] == alone - based[0]["input_tokens"]
        for r in mine:
            assert r["saved_usd"] == pytest.approx(r["baseline_cost_usd"] - r["cost_usd"])
            if r is not based[0]:
                assert r["tokens_saved"] == 0
    assert sum(r["saved_usd"] for r in rows) > 0
    assert sum(r["tokens_saved"] for r in rows) > 0


def test_items_already_answered_are_served_from_the_cache(
        fake: FakeUpstream, make_gateway: GatewayFactory) -> None:
    fake.add_answerer(PackedAnswerer())
    first, more = _reviews(12), _reviews(5, start=100)
    with _client(make_gateway()) as client:
        _batch_map(client, model="gpt-4o-mini", instruction=INSTRUCTION, items=first)
        before = len(_sent(fake))
        answer = _batch_map(client, model="gpt-4o-mini", instruction=INSTRUCTION,
                            items=[*more[:2], *first, *more[2:]])
        later = _sent(fake)[before:]
        assert [i["input"] for c in later for i in c] == more  # only the new ones were sent
        assert answer["calls"] == len(later) == 1
        assert [r["output"] for r in answer["results"]] == [
            classify(t) for t in [*more[:2], *first, *more[2:]]]
        assert {r["status"] for r in answer["results"]} == {"ok"}
        # another instruction is another question: nothing is served from the cache
        _batch_map(client, model="gpt-4o-mini", instruction=INSTRUCTION + " Be brief.",
                   items=first[:3])
        assert [len(c) for c in _sent(fake)[before + 1:]] == [3]


def test_a_response_schema_is_checked_per_output(
        fake: FakeUpstream, make_gateway: GatewayFactory) -> None:
    fake.add_answerer(PackedAnswerer(as_object=True))
    label = {"type": "object", "required": ["label"],
             "properties": {"label": {"enum": ["positive", "negative"]}}}
    with _client(make_gateway()) as client:
        good = _batch_map(client, model="gpt-4o-mini", instruction=INSTRUCTION,
                          items=_reviews(6), response_schema=label)
        assert [r["output"] for r in good["results"]] == [
            {"label": classify(t)} for t in _reviews(6)]
        sent = fake.calls()[-1].body
        assert sent is not None
        schema = sent["response_format"]["json_schema"]["schema"]
        assert schema["properties"]["results"]["items"]["properties"]["output"] == label
        bad = _batch_map(client, model="gpt-4o-mini", instruction=INSTRUCTION,
                         items=[{"id": "a", "input": "fine"}], response_schema={"type": "string"})
    assert bad["results"] == [{"id": "a", "output": None, "status": "error", "error":
                               "output does not match response_schema: "
                               "{'label': 'positive'} is not of type 'string'"}]


@pytest.mark.parametrize(("body", "code"), [
    ({"instruction": "x", "items": ["a"]}, "missing_model"),
    ({"model": "gpt-4o-mini", "items": ["a"]}, "invalid_instruction"),
    ({"model": "gpt-4o-mini", "instruction": "x"}, "invalid_items"),
    ({"model": "gpt-4o-mini", "instruction": "x", "items": []}, "invalid_items"),
    ({"model": "gpt-4o-mini", "instruction": "x", "items": ["a", 3]}, "invalid_items"),
    ({"model": "gpt-4o-mini", "instruction": "x", "items": [{"id": "a"}]}, "invalid_items"),
    ({"model": "gpt-4o-mini", "instruction": "x",
      "items": [{"id": "a", "input": 1}, {"id": "a", "input": 2}]}, "duplicate_id"),
    ({"model": "gpt-4o-mini", "instruction": "x", "items": ["a"], "max_items_per_call": 0},
     "invalid_max_items_per_call"),
    ({"model": "gpt-4o-mini", "instruction": "x", "items": ["a"],
      "response_schema": {"type": "nonsense"}}, "invalid_response_schema"),
    ({"model": "gpt-4o-mini", "instruction": "x", "items": ["a"], "temperature": 1},
     "unknown_field"),
])
def test_bad_input_is_refused_with_an_openai_error(
        fake: FakeUpstream, make_gateway: GatewayFactory, body: dict[str, Any],
        code: str) -> None:
    with _client(make_gateway()) as client, pytest.raises(openai.BadRequestError) as caught:
        _batch_map(client, **body)
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert fake.calls() == []


def test_a_missing_key_is_refused_before_anything_is_sent(
        fake: FakeUpstream, make_gateway: GatewayFactory) -> None:
    gw = make_gateway(keys=[{"key": "sk-gw-1", "tenant": "acme"}])
    with _client(gw, key="wrong") as client, pytest.raises(openai.AuthenticationError):
        _batch_map(client, model="gpt-4o-mini", instruction="x", items=["a"])
    assert fake.calls() == []
    fake.add_answerer(PackedAnswerer())
    with _client(gw, key="sk-gw-1") as client:
        answer = _batch_map(client, model="gpt-4o-mini", instruction="x", items=["bad"])
    assert answer["results"] == [{"id": "0", "output": "negative", "status": "ok"}]


def test_an_anthropic_model_is_asked_in_its_own_format(
        fake: FakeUpstream, make_gateway: GatewayFactory) -> None:
    fake.add_answerer(PackedAnswerer())
    items = _reviews(8)
    with _client(make_gateway()) as client:
        answer = _batch_map(client, model="claude-sonnet", instruction=INSTRUCTION, items=items)
    assert [r["output"] for r in answer["results"]] == [classify(t) for t in items]
    sent = fake.calls("/v1/messages")
    assert len(sent) == answer["calls"] == 1 and sent[0].body is not None
    assert "JSON" in str(sent[0].body["system"])  # response_format, as an instruction


def test_an_answer_cut_short_is_retried_in_smaller_batches(
        fake: FakeUpstream, make_gateway: GatewayFactory) -> None:
    fake.add_answerer(PackedAnswerer())
    fake.fail_next("length")  # the first call's JSON is cut in half: none of it can be read
    items = _reviews(12)
    with _client(make_gateway()) as client:
        answer = _batch_map(client, model="gpt-4o-mini", instruction=INSTRUCTION, items=items)
    assert [r["output"] for r in answer["results"]] == [classify(t) for t in items]
    assert {r["status"] for r in answer["results"]} == {"retried"}
    assert [len(c) for c in _sent(fake)] == [12, 3, 3, 3, 3]


def test_an_unknown_model_fails_the_request(fake: FakeUpstream,
                                            make_gateway: GatewayFactory) -> None:
    with _client(make_gateway(default_provider=None)) as client, \
            pytest.raises(openai.NotFoundError):
        _batch_map(client, model="no-such-model", instruction="x", items=["a", "b"])
    assert fake.calls() == []


def test_a_packed_call_goes_whole_through_a_compressing_feature(
        fake: FakeUpstream, make_gateway: GatewayFactory) -> None:
    fake.add_answerer(PackedAnswerer())
    items = [f"{text} " * 30 for text in _reviews(20)]  # long enough for the context budget
    gw = make_gateway(compression={"features": {"reviews": {"context": {"max_tokens": 100}}}})
    with _client(gw, **{"x-skinflint-feature": "reviews"}) as client:
        answer = _batch_map(client, model="gpt-4o-mini", instruction=INSTRUCTION, items=items)
    assert [r["status"] for r in answer["results"]] == ["ok"] * 20
    assert sum(len(c) for c in _sent(fake)) == 20 == sum(len(c) for c in _sent(fake)[:2])
    assert len(fake.calls()) == answer["calls"] == 2  # the items' tokens made two calls


def test_a_similar_list_of_items_is_never_a_semantic_hit(
        fake: FakeUpstream, make_gateway: GatewayFactory) -> None:
    fake.add_answerer(PackedAnswerer())
    cache = {"exact": {}, "semantic": {"enabled": True, "embedder": "hashing",
                                       "threshold": 0.5}}
    gw = make_gateway(cache=cache)
    liked = [f"review {i}: the blender is quiet and I love it" for i in range(6)]
    hated = [f"review {i}: the blender is quiet and I hate it" for i in range(6)]
    with _client(gw) as client:
        first = _batch_map(client, model="gpt-4o-mini", instruction=INSTRUCTION, items=liked)
        second = _batch_map(client, model="gpt-4o-mini", instruction=INSTRUCTION, items=hated)
    assert [r["output"] for r in first["results"]] == ["positive"] * 6
    assert [r["output"] for r in second["results"]] == ["negative"] * 6
    assert len(_sent(fake)) == 2


def test_a_deferrable_feature_still_answers_batch_map_at_once(
        fake: FakeUpstream, make_gateway: GatewayFactory) -> None:
    fake.add_answerer(PackedAnswerer(seed=3))
    items = _reviews(6)
    gw = make_gateway(batching={"features": {"nightly": {"deferrable": True}}})
    with _client(gw, **{"x-skinflint-feature": "nightly"}) as client:
        answer = _batch_map(client, model="gpt-4o-mini", instruction=INSTRUCTION, items=items)
    assert [r["output"] for r in answer["results"]] == [classify(t) for t in items]
    assert fake.batches.submitted == 0 and len(_sent(fake)) == answer["calls"] == 1


def test_each_item_served_from_the_cache_is_a_ledger_row_saving_the_item_alone(
        fake: FakeUpstream, make_gateway: GatewayFactory, tmp_path: Path) -> None:
    fake.add_answerer(PackedAnswerer())
    first = _reviews(4)
    with _client(make_gateway()) as client:
        _batch_map(client, model="gpt-4o-mini", instruction=INSTRUCTION, items=first)
        _batch_map(client, model="gpt-4o-mini", instruction=INSTRUCTION,
                   items=[*first[2:], *_reviews(1, start=50)])
    rows = ledger_rows(tmp_path / "skinflint.db", expect=7)
    hits = sorted((r for r in rows if r["cache_status"] == "hit-exact"),
                  key=lambda r: r["request_id"])
    assert [r["request_id"].rsplit(".", 1)[1] for r in hits] == ["i0", "i1"]
    spec = PackSpec("gpt-4o-mini", INSTRUCTION, None, None)
    for row, text in zip(hits, first[2:], strict=True):
        alone = TOKENS.count_messages("gpt-4o-mini", solo_messages(spec, Item("x", text, 0)))
        assert (row["strategy"], row["provider"], row["cost_usd"]) == ("exact_cache", "cache", 0)
        assert row["input_tokens"] == alone and row["output_tokens"] > 0
        assert row["saved_usd"] == row["baseline_cost_usd"] > 0
    assert sum(r["strategy"] == "batch_map" for r in rows) == 5  # 4 items, then the new one


def test_items_another_model_answered_are_not_stored_for_the_one_asked(
        fake: FakeUpstream, make_gateway: GatewayFactory) -> None:
    fake.add_answerer(PackedAnswerer())
    models = {"gpt-4o-mini": {"provider": "fake"}, "gpt-4o": {"provider": "fake"},
              "first-choice": {"provider": "fake", "model": "gpt-4o-mini",
                               "fallbacks": ["gpt-4o"]}}
    items = _reviews(4)
    with _client(make_gateway(models=models)) as client:
        fake.fail_next("status=500", times=3)  # the model asked and its two retries
        fell_back = _batch_map(client, model="first-choice", instruction=INSTRUCTION,
                               items=items)
        assert [r["output"] for r in fell_back["results"]] == [classify(t) for t in items]
        before = len(_sent(fake))
        again = _batch_map(client, model="first-choice", instruction=INSTRUCTION, items=items)
        assert again["calls"] == 1 and len(_sent(fake)) == before + 1  # asked anew
        _batch_map(client, model="first-choice", instruction=INSTRUCTION, items=items)
        assert len(_sent(fake)) == before + 1  # the model asked answered: now stored
