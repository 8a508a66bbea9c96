"""The OpenAPI document: served without a key, naming every route the server has."""

from __future__ import annotations

import httpx
import jsonschema
import pytest

from skinflint.pipeline.attribute import MAX_MODEL_NAME, MAX_N
from skinflint.server.app import _ID_ROUTES, _ROUTES
from skinflint.server.openapi import openapi_document
from tests.conftest import GatewayFactory
from tests.fake_packed import PackedAnswerer
from tests.fake_upstream import FakeUpstream


def test_every_route_of_the_server_is_described() -> None:
    paths = openapi_document()["paths"]
    described = {(method.upper(), path) for path, ops in paths.items() for method in ops}
    with_id = {(m, f"{prefix}{{id}}{suffix}") for m, prefix, suffix, _ in _ID_ROUTES}
    assert described == set(_ROUTES) | with_id


def test_the_schemas_are_valid_and_say_the_limits() -> None:
    schemas = openapi_document()["components"]["schemas"]
    for schema in schemas.values():
        jsonschema.Draft202012Validator.check_schema(schema)
    assert schemas["Model"]["maxLength"] == MAX_MODEL_NAME
    assert schemas["ChatCompletionRequest"]["properties"]["n"]["maximum"] == MAX_N


@pytest.mark.parametrize(("body", "valid"), [
    ({"error": {"message": "m", "type": "t", "code": None}}, True),
    ({"error": {"message": "m", "type": "t"}}, False),
    ({"detail": "m"}, False),
])
def test_the_error_schema_is_openais(body: object, valid: bool) -> None:
    validator = jsonschema.Draft202012Validator(openapi_document()["components"]["schemas"]["Error"])
    assert validator.is_valid(body) == valid


def test_the_document_is_served_without_a_key(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(admin_key="admin-secret", keys=[{"key": "sk-gw-1", "tenant": "t"}])
    resp = httpx.get(gw.root_url + "/openapi.json")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    assert resp.json() == openapi_document()
    assert httpx.get(gw.root_url + "/metrics").status_code == 401  # the rest still needs one


def _schema(name: str) -> jsonschema.Draft202012Validator:
    schemas = openapi_document()["components"]["schemas"]
    root = {"$ref": f"#/components/schemas/{name}", "components": {"schemas": schemas}}
    return jsonschema.Draft202012Validator(root)


def test_batch_map_is_described_as_it_is_asked_and_answers(
        fake: FakeUpstream, make_gateway: GatewayFactory) -> None:
    fake.add_answerer(PackedAnswerer())
    body = {"model": "gpt-4o-mini", "instruction": "Classify.", "max_items_per_call": 2,
            "items": ["good", {"id": "b", "input": "bad"}, {"id": 7, "input": {"t": "fine"}}]}
    assert _schema("BatchMapRequest").is_valid(body)
    assert not _schema("BatchMapRequest").is_valid({**body, "temperature": 0})
    resp = httpx.post(make_gateway().base_url + "/skinflint/batch_map", json=body, timeout=30)
    assert resp.status_code == 200
    _schema("BatchMapResponse").validate(resp.json())
    assert [r["status"] for r in resp.json()["results"]] == ["ok", "ok", "ok"]
