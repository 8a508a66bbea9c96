"""``GET /api/spend`` and ``GET /api/requests`` on a real gateway: after traffic through the
openai SDK (cascades with escalated attempts, cache hits, an upstream error), every grouping's
figures equal the ledger's own rows; bad parameters are a 400 naming the parameter; the admin
key is required when one is set."""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from skinflint.server.openapi import openapi_document
from tests.conftest import GatewayFactory, ledger_rows

ADMIN = {"authorization": "Bearer admin-secret"}
ROUTES: dict[str, Any] = {
    "smart": {
        "baseline": "gpt-4o",
        "default_task": "chat",
        "tasks": {  # the echo is never a choice letter: tier 1 is called, then escalated
            "chat": {"cascade": [
                {"model": "gpt-4o-mini", "gate": {"format": "choice"}}, {"model": "gpt-4o"}]},
        },
    }
}
#: (feature, user, model, text): 2 cascades (an attempt row each), 1 repeat served from the
#: cache, plain calls, and one the upstream fails.
TRAFFIC = [
    ("search", "u1", "smart", "tell me about cats"),
    ("search", "u2", "smart", "tell me about dogs"),
    ("chat", "u1", "gpt-4o-mini", "hello there"),
    ("chat", "u3", "gpt-4o", "a longer question about the weather in Paris today"),
    ("", "u3", "gpt-4o-mini", "no feature at all"),
    ("chat", "u2", "gpt-4o-mini", "hello there"),
    ("chat", "u2", "gpt-4o-mini", "[[fault:status=400]] refused"),
]
ROWS = len(TRAFFIC) + 2  # the two escalated attempts


def send_traffic(gw: Any) -> None:
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as client:
        for i, (feature, user, model, text) in enumerate(TRAFFIC):
            if i == 5:
                time.sleep(0.3)  # the repeat finds the first answer in the cache
            headers = {"x-skinflint-feature": feature, "x-skinflint-user": user}
            try:
                client.chat.completions.create(
                    model=model, temperature=0, messages=[{"role": "user", "content": text}],
                    extra_headers={k: v for k, v in headers.items() if v})
            except openai.BadRequestError:
                assert "fault" in text


@pytest.fixture(scope="module")
def schemas() -> dict[str, Any]:
    return dict(openapi_document()["components"]["schemas"])


@pytest.fixture
def served(make_gateway: GatewayFactory, tmp_path: Path) -> tuple[Any, list[dict[str, Any]]]:
    gw = make_gateway(routes=ROUTES, admin_key="admin-secret")
    send_traffic(gw)
    rows = ledger_rows(tmp_path / "skinflint.db", expect=ROWS)
    assert len(rows) == ROWS
    return gw, rows


def get(gw: Any, path: str, **params: Any) -> httpx.Response:
    return httpx.get(gw.root_url + path, params=params, headers=ADMIN, timeout=10)


def expected(rows: list[dict[str, Any]], by: str) -> dict[str, dict[str, Any]]:
    """Each group's figures counted from the raw ledger rows."""
    groups: dict[str, dict[str, Any]] = defaultdict(lambda: defaultdict(float))
    for r in rows:
        name = (r["strategy"] or "none") if by == "strategy" else r[by]
        g = groups[name]
        g["cost_usd"] += r["cost_usd"] or 0.0
        if r["strategy"] != "cascade_escalated":
            g["requests"] += 1
            g["saved_usd"] += r["saved_usd"] or 0.0
            g["cache_hits"] += r["cache_status"].startswith("hit")
    return groups


@pytest.mark.parametrize("by", ["feature", "model", "user", "tenant", "strategy"])
def test_spend_equals_the_ledger(
    served: tuple[Any, list[dict[str, Any]]], schemas: dict[str, Any], by: str
) -> None:
    gw, rows = served
    resp = get(gw, "/api/spend", by=by, since="1d")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    jsonschema.validate(body, schemas["Spend"])
    assert (body["by"], body["bucket"]) == (by, "hour")  # the default up to 2 days
    assert body["until"].endswith("Z") and body["since"].endswith("Z")
    since = datetime.fromisoformat(body["since"]).timestamp()
    assert since % 3600 == 0 and since <= time.time() - 86400
    want = expected(rows, by)
    got = {g["name"]: g for g in body["groups"]}
    assert got.keys() == want.keys()
    for name, g in want.items():
        assert got[name]["requests"] == g["requests"]
        assert got[name]["cost_usd"] == pytest.approx(g["cost_usd"])
        assert got[name]["saved_usd"] == pytest.approx(g["saved_usd"])
        assert got[name]["cache_hits"] == g["cache_hits"]
    costs = [g["cost_usd"] for g in body["groups"]]
    assert costs == sorted(costs, reverse=True)
    totals = body["totals"]
    assert totals["requests"] == len(TRAFFIC) and totals["cache_hits"] == 1
    assert totals["errors"] == 1
    assert totals["cost_usd"] == pytest.approx(sum(r["cost_usd"] or 0 for r in rows))
    assert totals["input_tokens"] == sum(r["input_tokens"] for r in rows)
    assert totals["baseline_cost_usd"] == pytest.approx(
        sum(r["baseline_cost_usd"] or 0 for r in rows))
    series = body["series"]
    assert [(s["start"], s["name"]) for s in series] == sorted(
        (s["start"], s["name"]) for s in series)
    assert sum(s["requests"] for s in series) == len(TRAFFIC)


def test_strategy_names_and_day_buckets(served: tuple[Any, list[dict[str, Any]]]) -> None:
    gw, rows = served
    body = get(gw, "/api/spend", by="strategy").json()  # since 7d: days
    assert body["bucket"] == "day" and body["since"].endswith("T00:00:00Z")
    names = {g["name"]: g for g in body["groups"]}
    assert {"none", "cascade", "cascade_escalated", "exact_cache"} <= names.keys()
    assert names["cascade_escalated"]["requests"] == 0
    assert names["cascade_escalated"]["cost_usd"] > 0  # attempts cost, and are no requests
    days = {r["ts"] // 86400 * 86400 for r in rows}  # UTC midnights
    assert {datetime.fromisoformat(s["start"]).timestamp() for s in body["series"]} == days


def test_recent_requests_newest_first(
    served: tuple[Any, list[dict[str, Any]]], schemas: dict[str, Any]
) -> None:
    gw, rows = served
    body = get(gw, "/api/requests").json()
    jsonschema.validate(body, schemas["RecentRequests"])
    newest = sorted(rows, key=lambda r: -r["ts"])  # an attempt has its request's time
    assert {r["request_id"] for r in body["data"]} == {r["request_id"] for r in rows}
    times = [datetime.fromisoformat(r["ts"]).timestamp() for r in body["data"]]
    assert times == pytest.approx([r["ts"] for r in newest])
    first = body["data"][0]
    assert set(first) == {"request_id", "ts", "tenant", "feature", "user", "model", "route",
                          "cache_status", "strategy", "cost_usd", "saved_usd", "status",
                          "latency_ms"}
    assert datetime.fromisoformat(first["ts"]).timestamp() == pytest.approx(newest[0]["ts"])
    assert first["status"] == newest[0]["status"]
    two = get(gw, "/api/requests", limit=2).json()["data"]
    assert [r["request_id"] for r in two] == [r["request_id"] for r in body["data"][:2]]


@pytest.mark.parametrize(("path", "params", "param"), [
    ("/api/spend", {"by": "colour"}, "by"),
    ("/api/spend", {"by": ""}, "by"),
    ("/api/spend", {"since": "7"}, "since"),
    ("/api/spend", {"since": "-1d"}, "since"),
    ("/api/spend", {"since": "0d"}, "since"),
    ("/api/spend", {"since": "7y"}, "since"),
    ("/api/spend", {"bucket": "week"}, "bucket"),
    ("/api/requests", {"limit": "0"}, "limit"),
    ("/api/requests", {"limit": "501"}, "limit"),
    ("/api/requests", {"limit": "ten"}, "limit"),
    ("/api/requests", {"limit": "\u0661"}, "limit"),  # a digit, but not ASCII
])
def test_bad_parameters_are_a_400_naming_them(
    make_gateway: GatewayFactory, path: str, params: dict[str, str], param: str
) -> None:
    gw = make_gateway()
    resp = httpx.get(gw.root_url + path, params=params, timeout=10)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == f"invalid_{param}"
    assert error["message"].startswith(f"{param} must be")


def test_the_admin_key_is_required_when_set(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(admin_key="admin-secret")
    for path in ("/api/spend", "/api/requests"):
        assert httpx.get(gw.root_url + path, timeout=10).status_code == 401
        wrong = httpx.get(gw.root_url + path, headers={"authorization": "Bearer nope"},
                          timeout=10)
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == (
            "authentication_error")
        assert get(gw, path).status_code == 200
    empty = get(gw, "/api/spend").json()
    assert empty["groups"] == [] and empty["series"] == [] and empty["totals"]["requests"] == 0


def test_no_admin_key_configured_means_open(make_gateway: GatewayFactory) -> None:
    gw = make_gateway()
    assert httpx.get(gw.root_url + "/api/requests", timeout=10).json() == {"data": []}
