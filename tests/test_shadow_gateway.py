"""The shadow-evaluation guard in the running gateway: ``GET /api/shadow``, the operator's
``POST /api/shadow/enable``, the switch kept across a restart in the alert table, and (with
the compress stage) a strategy switched off once the uncompressed prompt's answers differ."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from skinflint.alerts import AlertEvent
from skinflint.pipeline.shadow import ALERT_RULE
from skinflint.storage.alert_store import SQLiteAlertStore
from tests.conftest import GatewayFactory, budget_row, ledger_rows

ADMIN = {"authorization": "Bearer admin-secret"}
SHADOWED = {"features": {"docs": {"shadow": {"sample": 1.0, "floor": 0.9, "judge": "exact",
                                             "min_samples": 3}}}}


def _get(gw: Any, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.get(gw.root_url + path, headers=ADMIN if headers is None else headers, timeout=5)


def _enable(gw: Any, body: Any) -> httpx.Response:
    return httpx.post(gw.root_url + "/api/shadow/enable", json=body, headers=ADMIN, timeout=5)


def _switched_off(db: Path, feature: str, strategy: str) -> None:
    """What a gateway that switched the strategy off left in the alert table."""

    async def fire() -> None:
        store = await SQLiteAlertStore.create(str(db))
        await store.fire(AlertEvent(ALERT_RULE, "feature", f"{feature}/{strategy}",
                                    time.time() - 60, None, 0.0, 0.0))
        await store.close()

    asyncio.run(fire())


def test_the_scores_need_the_admin_key_and_start_empty(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(compression=SHADOWED, admin_key="admin-secret")
    assert _get(gw, "/api/shadow", {}).status_code == 401
    assert _get(gw, "/api/shadow").json() == {"object": "list", "data": [], "dropped": 0}
    assert _enable(gw, {"feature": "docs"}).status_code == 400
    assert _enable(gw, ["docs", "context"]).status_code == 400
    assert _enable(gw, {"feature": "docs", "strategy": "context"}).json() == {
        "feature": "docs", "strategy": "context", "state": "on", "switched_on": False}


def test_without_a_shadow_policy_there_is_nothing_to_enable(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(admin_key="admin-secret")
    assert _get(gw, "/api/shadow").json()["data"] == []
    response = _enable(gw, {"feature": "docs", "strategy": "context"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("alerts", [None, []], ids=["cost-alerts-on", "cost-alerts-off"])
def test_a_switch_survives_a_restart_until_an_operator_enables_it(
    make_gateway: GatewayFactory, tmp_path: Path, alerts: list[Any] | None
) -> None:
    _switched_off(tmp_path / "skinflint.db", "docs", "context")
    extra = {} if alerts is None else {"alerts": alerts}
    gw = make_gateway(compression=SHADOWED, admin_key="admin-secret", **extra)
    [row] = _get(gw, "/api/shadow").json()["data"]
    assert (row["feature"], row["strategy"], row["state"]) == ("docs", "context", "off")
    listed = _get(gw, "/api/alerts").json()
    assert [(a["rule"], a["name"], a["state"]) for a in listed["data"]] == [
        (ALERT_RULE, "docs/context", "firing")]
    assert _enable(gw, {"feature": "docs", "strategy": "context"}).json()["switched_on"]
    assert _get(gw, "/api/shadow").json()["data"][0]["state"] == "on"
    listed = _get(gw, "/api/alerts").json()
    assert listed["active"] == 0 and listed["data"][0]["state"] == "resolved"


LONG_CONTEXT = " ".join(f"Paragraph {i} of the manual says nothing of use." for i in range(200))


def test_the_guard_switches_a_degrading_strategy_off(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """The fake upstream echoes the last user message: trimming its context changes the
    answer, so each shadowed request (streamed or not) scores 0 and the third switches
    ``context`` off."""
    docs = {"context": {"max_tokens": 200}, **SHADOWED["features"]["docs"]}
    gw = make_gateway(compression={"features": {"docs": docs}}, admin_key="admin-secret")
    question = f"{LONG_CONTEXT}\n\nWhat does the manual say?"
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0, timeout=10) as client:
        def ask(stream: bool = False) -> None:
            answer = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": question}],
                extra_headers={"x-skinflint-feature": "docs"}, stream=stream)
            if stream:
                list(answer)

        ask(stream=True)  # a stream is shadowed once it ends
        for _ in range(2):
            ask()
        deadline = time.monotonic() + 10
        while _get(gw, "/api/shadow").json()["data"][0]["state"] != "off":
            assert time.monotonic() < deadline, _get(gw, "/api/shadow").json()
            time.sleep(0.05)
        [row] = _get(gw, "/api/shadow").json()["data"]
        assert (row["strategy"], row["samples"], row["mean"]) == ("context", 3, 0.0)
        alerts = _get(gw, "/api/alerts").json()["data"]
        assert [(a["rule"], a["name"]) for a in alerts] == [(ALERT_RULE, "docs/context")]
        ask()  # now served uncompressed, and not shadowed
    rows = ledger_rows(tmp_path / "skinflint.db", expect=7)
    assert sum(r["strategy"] == "shadow" for r in rows) == 3
    assert all(r["request_id"].endswith(".shadow") for r in rows if r["strategy"] == "shadow")


def test_shadow_calls_count_in_the_budgets_of_their_request(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    docs = {"context": {"max_tokens": 200}, **SHADOWED["features"]["docs"]}
    gw = make_gateway(compression={"features": {"docs": docs}}, admin_key="admin-secret",
                      budgets=[{"name": "b", "window": "day", "limit": {"usd": 10.0}}])
    question = f"{LONG_CONTEXT}\n\nWhat does the manual say?"
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0, timeout=10) as client:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": question}],
            extra_headers={"x-skinflint-feature": "docs"})
    rows = ledger_rows(tmp_path / "skinflint.db", expect=2)
    [shadow] = [r for r in rows if r["strategy"] == "shadow"]
    assert shadow["cost_usd"] > 0
    spent = sum(r["cost_usd"] for r in rows)
    budget = budget_row(gw, lambda b: b["spent"]["usd"] == pytest.approx(spent), headers=ADMIN)
    assert budget["spent"]["usd"] == pytest.approx(spent), (budget, rows)
    assert budget["spent"]["requests"] == 1
