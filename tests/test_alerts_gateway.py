"""Cost alerts in the running gateway: judged at start over the ledger it shares, listed by
``GET /api/alerts`` and counted in ``/metrics``; configured in ``alerts:``."""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from skinflint.config import load_settings, settings_from_dict
from skinflint.errors import ConfigError
from skinflint.models import LedgerRecord
from skinflint.server.openapi import openapi_document
from skinflint.storage.ledger import SQLiteLedger
from tests.conftest import GatewayFactory

RULE = {"name": "feature-spend", "per": "feature", "window": "minute", "baseline_windows": 6,
        "rise": 2.0, "for_windows": 2, "min_usd": 0.05, "resolve_below": 1.3}


def spend_lately(db: Path) -> None:
    """The feature "search" spent $0.10 a minute, then $1 in each of the last three minutes."""
    now = math.floor(time.time() / 60)
    ledger = SQLiteLedger(str(db))
    for ago in range(12, 0, -1):
        usd = 1.0 if ago <= 3 else 0.10
        ledger.record(LedgerRecord(f"r{ago}", (now - ago) * 60 + 1, feature="search",
                                   cost_usd=usd))
    ledger.close()


def alerts(root: str, **headers: str) -> httpx.Response:
    return httpx.get(root + "/api/alerts", headers=headers, timeout=5)


def wait_for_alert(root: str, **headers: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        body: dict[str, Any] = alerts(root, **headers).json()
        if body["data"] or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def test_the_gateway_fires_at_start_and_lists_the_alert(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    spend_lately(tmp_path / "skinflint.db")
    gw = make_gateway(alerts=[RULE], admin_key="admin-secret")
    assert alerts(gw.root_url).status_code == 401
    body = wait_for_alert(gw.root_url, authorization="Bearer admin-secret")
    assert body["active"] == 1
    [alert] = body["data"]
    assert {k: alert[k] for k in ("rule", "per", "name", "state", "end", "spend_usd")} == {
        "rule": "feature-spend", "per": "feature", "name": "search", "state": "firing",
        "end": None, "spend_usd": 1.0}
    assert alert["baseline_usd"] == pytest.approx(0.1)
    assert alert["start"].endswith(":00Z")
    schemas = openapi_document()["components"]["schemas"]
    document = {"components": {"schemas": schemas}, "$ref": "#/components/schemas/Alerts"}
    jsonschema.Draft202012Validator(document).validate(body)
    metrics = httpx.get(gw.root_url + "/metrics",
                        headers={"authorization": "Bearer admin-secret"}).text
    assert 'skinflint_alerts_active{rule="feature-spend"} 1.0' in metrics
    assert 'skinflint_alert_events_total{rule="feature-spend",state="firing"} 1.0' in metrics


def test_an_empty_alerts_section_turns_alerts_off(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    db = tmp_path / "skinflint.db"
    spend_lately(db)
    gw = make_gateway(alerts=[])
    assert alerts(gw.root_url).json() == {"data": [], "active": 0}
    assert gw.app.gateway is not None and gw.app.gateway.alerts is None
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "alert_events" not in tables


def test_without_an_alerts_section_the_default_rule_watches(make_gateway: GatewayFactory) -> None:
    gw = make_gateway()
    assert gw.app.gateway is not None and gw.app.gateway.alerts is not None
    assert [r.name for r in gw.app.gateway.alerts.rules] == ["feature-spend"]
    assert alerts(gw.root_url).json() == {"data": [], "active": 0}


def test_a_ledger_in_memory_has_no_alerts(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(storage={"sqlite_path": ":memory:"}, alerts=[RULE])
    assert gw.app.gateway is not None and gw.app.gateway.alerts is None
    assert alerts(gw.root_url).json() == {"data": [], "active": 0}


@pytest.mark.parametrize(("rule", "message"), [
    ({"rise": 1}, "config: alerts[0].rise: must be > 1"),
    ({"per": "key"}, "config: alerts[0].per: must be 'global', 'tenant', 'feature', 'model' or"),
    ({"window": "week"}, "config: alerts[0].window: must be 'minute', 'hour' or 'day'"),
    ({"baseline_windows": 0}, "config: alerts[0].baseline_windows: must be >= 1"),
    ({"for_windows": 1.5}, "config: alerts[0].for_windows: must be a whole number"),
    ({"min_usd": -1}, "config: alerts[0].min_usd: must be >= 0"),
    ({"resolve_below": 0}, "config: alerts[0].resolve_below: must be > 0"),
    ({"resolve_below": 2.5}, "config: alerts[0].resolve_below: must be <= rise (2)"),
    ({"webhook": "hooks.example.com/x"},
     "config: alerts[0].webhook: must be an http:// or https:// URL"),
    ({"name": "two words"}, "config: alerts[0].name: must match"),
    ({"threshold": 3}, "config: alerts[0].threshold: unknown key"),
])
def test_a_bad_rule_is_named_by_its_key(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_dict({"alerts": [{**RULE, **rule}]}, env={})
    assert str(caught.value).startswith(message)


CONTRACT_EXAMPLE = """
alerts:
  - name: feature-spend
    per: feature                # global | tenant | feature | model | user
    window: hour                # minute | hour | day
    baseline_windows: 24
    rise: 2.0
    for_windows: 3
    min_usd: 0.05
    resolve_below: 1.3
    webhook: "${ALERT_WEBHOOK}" # optional
"""


def test_rules_are_read_as_documented(tmp_path: Path) -> None:
    path = tmp_path / "alerts.yaml"
    path.write_text(CONTRACT_EXAMPLE)
    [rule] = load_settings(path, env={"ALERT_WEBHOOK": "https://hooks.example.com/T1"}).alerts
    assert (rule.per, rule.window, rule.baseline_windows, rule.for_windows) == (
        "feature", "hour", 24, 3)
    assert rule.webhook == "https://hooks.example.com/T1" and "hooks" not in repr(rule)
    with pytest.raises(ConfigError, match="ALERT_WEBHOOK is not set"):
        load_settings(path, env={})
    path.write_text("alerts:\n")  # an empty section, as [] does, turns alerts off
    assert load_settings(path, env={}).alerts == ()
    with pytest.raises(ConfigError, match=r"alerts\[1\].name: 'feature-spend' is used twice"):
        settings_from_dict({"alerts": [RULE, RULE]}, env={})
