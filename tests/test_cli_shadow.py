"""``skinflint shadow enable``: through a running gateway's admin API (``--url``), or in the
storage the gateways share, which a gateway reads back when it starts."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from skinflint.cli import main
from tests.conftest import GatewayFactory
from tests.test_shadow_gateway import ADMIN, SHADOWED, _switched_off

ENABLE = ["shadow", "enable", "--feature", "docs", "--strategy", "context"]


def _state(root_url: str) -> str:
    [row] = httpx.get(root_url + "/api/shadow", headers=ADMIN, timeout=5).json()["data"]
    return str(row["state"])


def test_through_a_running_gateway_it_takes_effect_at_once(
    make_gateway: GatewayFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _switched_off(tmp_path / "skinflint.db", "docs", "context")
    gw = make_gateway(compression=SHADOWED, admin_key="admin-secret")
    assert _state(gw.root_url) == "off"
    assert main([*ENABLE, "--url", gw.root_url]) == 2  # no admin key
    assert "needs its admin key" in capsys.readouterr().err
    assert main([*ENABLE, "--url", gw.root_url, "--admin-key", "admin-secret"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"context for feature 'docs' is back on in the gateway at {gw.root_url}")
    assert _state(gw.root_url) == "on"


def test_in_the_storage_it_takes_effect_when_a_gateway_starts(
    make_gateway: GatewayFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "skinflint.db"
    _switched_off(db, "docs", "context")
    assert main([*ENABLE, "--db", str(db), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "feature": "docs", "strategy": "context", "switched_on": True, "where": str(db)}
    assert main([*ENABLE, "--db", str(db)]) == 0
    assert "was not switched off" in capsys.readouterr().out
    gw = make_gateway(compression=SHADOWED, admin_key="admin-secret")
    assert httpx.get(gw.root_url + "/api/shadow", headers=ADMIN).json()["data"] == []


def test_without_a_ledger_it_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*ENABLE, "--db", str(tmp_path / "none.db")]) == 2
    assert capsys.readouterr().err.startswith("skinflint: ")
