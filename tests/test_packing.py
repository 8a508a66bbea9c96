"""The pure part of in-prompt batching: items, the packed request, batch sizes, reading answers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from skinflint.errors import RequestError
from skinflint.packing import (
    Item,
    PackSpec,
    item_digest,
    packed_body,
    parse_answer,
    parse_items,
    plan_batches,
    retry_caps,
    validator_for,
)

SPEC = PackSpec("gpt-4o-mini", "Classify the sentiment.")


def _completion(content: Any) -> dict[str, Any]:
    text = content if isinstance(content, str) else json.dumps(content)
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}]}


def _items(*ids: str) -> list[Item]:
    return [Item(ident, f"input {ident}", n) for n, ident in enumerate(ids)]


def test_items_are_strings_indexed_or_objects_with_ids() -> None:
    items = parse_items(["a", {"id": "x", "input": {"k": 1}}, {"id": 7, "input": "b"},
                        {"input": "c"}])
    assert items == [Item("0", "a", 0), Item("x", {"k": 1}, 1), Item("7", "b", 2),
                     Item("3", "c", 3)]


@pytest.mark.parametrize(("raw", "code"), [
    (None, "invalid_items"), ([], "invalid_items"), ("abc", "invalid_items"),
    ([1], "invalid_items"), ([{"id": "a"}], "invalid_items"),
    ([{"id": "a", "input": 1, "extra": 2}], "invalid_items"),
    ([{"id": "", "input": 1}], "invalid_items"), ([{"id": True, "input": 1}], "invalid_items"),
    (["a", {"id": "0", "input": "b"}], "duplicate_id"),
])
def test_malformed_items_are_refused(raw: Any, code: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_items(raw)
    assert caught.value.code == code and caught.value.status == 400


def test_the_packed_request_holds_the_instruction_once_and_the_items_last() -> None:
    items = _items("a", "b", "c")
    body = packed_body(SPEC, items)
    system, user = body["messages"]
    assert system["role"] == "system" and system["content"].count(SPEC.instruction) == 1
    assert user["role"] == "user"
    assert json.loads(user["content"]) == [{"id": i.id, "input": i.input} for i in items]
    assert '{"results": [{"id":' in system["content"]
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["schema"]["required"] == ["results"]
    assert body["temperature"] == 0.0 and body["model"] == "gpt-4o-mini"
    assert "response_format" not in packed_body(PackSpec("m", "i", structured=False), items)


def test_a_response_schema_is_shown_and_asked_for() -> None:
    schema = {"enum": ["positive", "negative"]}
    body = packed_body(PackSpec("m", "i", schema), _items("a"))
    assert json.dumps(schema, sort_keys=True) in body["messages"][0]["content"]
    result = body["response_format"]["json_schema"]["schema"]["properties"]["results"]["items"]
    assert result["properties"]["output"] == schema


def test_batches_are_cut_by_the_input_token_budget_in_order() -> None:
    items = _items(*"abcdefgh")
    spec = PackSpec("m", "i", max_input_tokens=100)
    batches = plan_batches(items, [40, 40, 40, 90, 10, 10, 100, 200], spec)
    assert [[i.id for i in b] for b in batches] == [
        ["a", "b"], ["c"], ["d", "e"], ["f"], ["g"], ["h"]]  # an item over the budget alone


def test_batches_are_cut_by_the_expected_output_and_the_item_caps() -> None:
    items = _items(*[str(n) for n in range(100)])
    weights = [1] * 100
    by_output = PackSpec("m", "i", output_tokens_per_item=88, max_output_tokens=1016)
    assert [len(b) for b in plan_batches(items, weights, by_output)] == [10] * 10
    capped = PackSpec("m", "i", max_items_per_call=30)
    assert [len(b) for b in plan_batches(items, weights, capped)] == [30, 30, 30, 10]
    assert [len(b) for b in plan_batches(items, weights, capped, cap=7)][:2] == [7, 7]
    assert plan_batches([], [], SPEC) == []


def test_retries_go_to_a_quarter_of_the_batch_then_alone() -> None:
    assert retry_caps(40) == [10, 1]
    assert retry_caps(12) == [3, 1]
    assert retry_caps(7) == [1]
    assert retry_caps(1) == [1]


def test_a_good_answer_gives_every_output() -> None:
    items = _items("a", "b")
    parsed = parse_answer(_completion({"results": [{"id": "b", "output": 2},
                                                   {"id": "a", "output": {"x": 1}}]}), items)
    assert parsed.outputs == {"a": {"x": 1}, "b": 2} and parsed.problems == {}


def test_each_item_answered_badly_has_its_own_problem() -> None:
    items = _items("a", "b", "c", "d", "e")
    answer = {"results": [
        {"id": "a", "output": "ok"},
        {"id": "b", "output": "one"}, {"id": "b", "output": "two"},  # conflicting
        {"id": "c", "output": "same"}, {"id": "c", "output": "same"},  # a harmless repeat
        {"id": "d"},  # no output
        {"id": "zz", "output": "?"}, {"output": "?"},  # not asked
    ]}
    parsed = parse_answer(_completion(answer), items)
    assert parsed.outputs == {"a": "ok", "c": "same"}
    assert parsed.problems == {
        "b": "the answer gave this id twice, with different outputs",
        "d": "the result has no 'output'",
        "e": "the answer has no result for this id",
    }
    assert parsed.unknown == ("zz", "")


def test_numeric_ids_and_fenced_json_are_read() -> None:
    items = _items("1", "2")
    text = '```json\n{"results": [{"id": 1, "output": "x"}, {"id": "2", "output": "y"}]}\n```'
    assert parse_answer(_completion(text), items).outputs == {"1": "x", "2": "y"}
    bare = parse_answer(_completion([{"id": "1", "output": "x"}]), items)
    assert bare.outputs == {"1": "x"} and set(bare.problems) == {"2"}


@pytest.mark.parametrize(("completion", "problem"), [
    (_completion("not json at all"), "the answer is not valid JSON"),
    (_completion({"answers": []}), "the answer has no 'results' array"),
    ({"choices": []}, "the answer has no text"),
    ({"choices": [{"message": {"content": None}}]}, "the answer has no text"),
])
def test_an_unreadable_answer_fails_every_item(completion: dict[str, Any], problem: str) -> None:
    parsed = parse_answer(completion, _items("a", "b"))
    assert parsed.outputs == {} and parsed.problems == {"a": problem, "b": problem}


def test_outputs_are_checked_against_the_response_schema() -> None:
    validator = validator_for({"type": "object", "required": ["label"],
                               "properties": {"label": {"enum": ["pos", "neg"]}}})
    answer = {"results": [{"id": "a", "output": {"label": "pos"}},
                          {"id": "b", "output": {"label": "meh"}}]}
    parsed = parse_answer(_completion(answer), _items("a", "b"), validator)
    assert parsed.outputs == {"a": {"label": "pos"}}
    assert parsed.problems["b"].startswith("output does not match response_schema: 'meh'")
    with pytest.raises(RequestError) as caught:
        validator_for({"type": 12})
    assert caught.value.code == "invalid_response_schema"


def test_the_item_digest_is_the_question_not_the_id() -> None:
    a, b = Item("x", "same input", 0), Item("y", "same input", 5)
    assert item_digest(SPEC, a) == item_digest(SPEC, b)
    assert item_digest(SPEC, a) != item_digest(PackSpec("gpt-4o", SPEC.instruction), a)
    assert item_digest(SPEC, a) != item_digest(PackSpec(SPEC.model, "Other."), a)
    assert item_digest(SPEC, a) != item_digest(PackSpec(SPEC.model, SPEC.instruction,
                                                        {"type": "string"}), a)
    assert item_digest(SPEC, a) != item_digest(SPEC, Item("x", "other input", 0))


def test_a_schema_reference_outside_it_is_refused_not_fetched() -> None:
    for ref in ("http://127.0.0.1:9/schema.json", "#/$defs/missing"):
        with pytest.raises(RequestError) as caught:
            validator_for({"$ref": ref})
        assert caught.value.code == "invalid_response_schema"
        assert ref.lstrip("#") in caught.value.message
    # a reference reached only by some outputs fails those items, not the request
    validator = validator_for({"anyOf": [{"type": "null"}, {"$ref": "#/$defs/missing"}]})
    parsed = parse_answer(_completion({"results": [{"id": "a", "output": 1}]}), _items("a"),
                          validator)
    assert parsed.problems == {
        "a": "response_schema cannot be checked: unresolvable $ref '/$defs/missing'"}
    local = validator_for({"$defs": {"l": {"enum": ["x"]}}, "$ref": "#/$defs/l"})
    assert parse_answer(_completion({"results": [{"id": "a", "output": "x"}]}), _items("a"),
                        local).outputs == {"a": "x"}


def test_what_cannot_be_written_back_as_json_is_not_valid_json() -> None:
    for text in ('{"results": [{"id": "a", "output": NaN}]}',
                 '{"results": [{"id": "a", "output": 1e999}]}'):
        parsed = parse_answer(_completion(text), _items("a"))
        assert parsed.problems == {"a": "the answer is not valid JSON"}
