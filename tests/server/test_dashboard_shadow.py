"""The dashboard's shadow-evaluation panel: each feature and strategy the guard watches, and
whether it is on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.browser import browser_fixture  # noqa: F401  (fixture)
from tests.conftest import GatewayFactory
from tests.server.test_dashboard_browser import _open, _states, _wait
from tests.test_shadow_gateway import SHADOWED, _switched_off


def test_a_strategy_switched_off_shows_in_the_shadow_panel(
    make_gateway: GatewayFactory, browser: Any, tmp_path: Path
) -> None:
    _switched_off(tmp_path / "skinflint.db", "docs", "context")
    gw = make_gateway(compression=SHADOWED)
    _open(browser, f"{gw.root_url}/dashboard")
    _wait(browser, "return document.body.dataset.ready")
    assert _states(browser)["shadow"] == "ready"
    row = browser.execute_script(
        "return [...document.querySelectorAll('#shadow tbody tr')[0].children]"
        ".map(td => td.textContent)")
    assert row == ["off", "docs", "context", "0", "—", "—", "—"]
