"""The dashboard in a real headless browser (Debian's chromium through chromedriver), in front
of the real gateway, whose ledger holds traffic sent with the openai SDK: the page loads with
data, every chart draws, the tables hold the rows expected, the console stays clean. A
screenshot is kept in ``tests/artifacts/`` (``$SKINFLINT_ARTIFACTS`` when set)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai

from skinflint.models import LedgerRecord
from skinflint.server.run import BackgroundServer
from skinflint.storage.ledger import SQLiteLedger
from tests.browser import browser_fixture, console_errors  # noqa: F401  (fixture)
from tests.conftest import GatewayFactory, ledger_rows

ARTIFACTS = Path(os.environ.get("SKINFLINT_ARTIFACTS", Path(__file__).parents[1] / "artifacts"))
CHARTS = ("spend", "requests", "savings", "cache", "skips", "budgets")
BUDGETS = [{"name": "search-daily", "per": "feature", "match": "search", "window": "day",
            "limit": {"usd": 10.0}, "action": "alert"}]
#: (feature, user, model, question); each is asked twice at temperature 0 (the second answer
#: comes from the cache) and once with the cache bypassed.
TRAFFIC = [
    ("search", "alice", "gpt-4o-mini", "where is my invoice"),
    ("search", "bob", "gpt-4o-mini", "find the contract"),
    ("chat", "bob", "gpt-4o", "tell me about the weather in spring"),
    ("summary", "carol", "cheap", "summarise the meeting notes please"),
]
REQUESTS = 3 * len(TRAFFIC)


def _send_traffic(gw: BackgroundServer, db: Path) -> None:
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0, timeout=10) as client:
        for feature, user, model, question in TRAFFIC:
            ask: Callable[..., Any] = client.chat.completions.create
            for cache in ("default", "default", "bypass"):
                ask(model=model, temperature=0, messages=[{"role": "user", "content": question}],
                    extra_headers={"x-skinflint-feature": feature, "x-skinflint-user": user,
                                   "x-skinflint-cache": cache})
    assert len(ledger_rows(db, expect=REQUESTS)) == REQUESTS


def _wait(browser: Any, script: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := browser.execute_script(script)):
        assert time.monotonic() < deadline, f"timed out waiting for: {script}"
        time.sleep(0.05)
    return found


def _open(browser: Any, url: str) -> None:
    browser.execute_script("document.body && delete document.body.dataset.ready")
    browser.get(url)


def _states(browser: Any) -> dict[str, str]:
    return dict(browser.execute_script(
        "return [...document.querySelectorAll('main section')].map(s => [s.id, s.dataset.state])"))


def _painted(browser: Any, chart: str) -> int:
    """How many pixels of the chart's canvas are not transparent."""
    return int(browser.execute_script("""
        const canvas = document.getElementById('chart-' + arguments[0]);
        const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let n = 0;
        for (let i = 3; i < pixels.length; i += 4) { if (pixels[i]) n++; }
        return n;""", chart))


def _column(browser: Any, panel: str, index: int = 0) -> list[str]:
    return list(browser.execute_script(
        "return [...document.querySelectorAll('#' + arguments[0] + ' tbody tr')]"
        ".map(tr => tr.children[arguments[1]].textContent)", panel, index))


def _requests_by_name(browser: Any, panel: str) -> dict[str, int]:
    """A top-N table as {name: requests}."""
    rows = browser.execute_script(
        "return [...document.querySelectorAll('#' + arguments[0] + ' tbody tr')]"
        ".map(tr => [tr.children[0].textContent, tr.children[1].textContent])", panel)
    return {name: int(requests) for name, requests in rows}


def _labels(browser: Any, chart: str) -> list[str]:
    return list(browser.execute_script(
        "return Chart.getChart('chart-' + arguments[0]).data.labels", chart))


def _choose(browser: Any, select: str, value: str) -> None:
    """Pick ``value`` in the page's ``select`` and wait for the page to load again."""
    browser.execute_script("""
        delete document.body.dataset.ready;
        const select = document.getElementById(arguments[0]);
        select.value = arguments[1];
        select.dispatchEvent(new Event('change'));""", select, value)
    _wait(browser, "return document.body.dataset.ready")


def _legend(browser: Any, chart: str) -> set[str]:
    return set(browser.execute_script(
        "return Chart.getChart('chart-' + arguments[0]).data.datasets.map(d => d.label)", chart))


def test_the_dashboard_draws_every_panel_from_the_gateway(
    make_gateway: GatewayFactory, browser: Any, tmp_path: Path
) -> None:
    gw = make_gateway(budgets=BUDGETS)
    _send_traffic(gw, tmp_path / "skinflint.db")
    _open(browser, f"{gw.root_url}/dashboard")
    _wait(browser, "return document.body.dataset.ready")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))

    states = _states(browser)
    assert states.pop("alerts") in {"ready", "empty"}  # no alert rule fires on this traffic
    assert states.pop("shadow") == "empty"  # no feature is shadowed
    assert set(states.values()) == {"ready"}, states
    for chart in CHARTS:
        assert _painted(browser, chart) > 500, chart
    assert _requests_by_name(browser, "top-features") == {"search": 6, "chat": 3, "summary": 3}
    assert _requests_by_name(browser, "top-users") == {"alice": 3, "bob": 6, "carol": 3}
    cache = _column(browser, "recent", 5)
    assert len(cache) == REQUESTS
    assert cache.count("hit-exact") == len(TRAFFIC) and cache.count("bypass") == len(TRAFFIC)
    assert set(_column(browser, "recent", 3)) == {"gpt-4o-mini", "gpt-4o", "qwen3-8b"}
    assert _legend(browser, "spend") == {"search", "chat", "summary"}
    assert {"exact_cache", "none"} <= set(_labels(browser, "savings"))
    assert "client-bypass" in _labels(browser, "skips")
    assert browser.find_element("id", "kpi-requests").text == str(REQUESTS)

    assert len(_labels(browser, "spend")) in {7, 8}  # 7 days by day, the first one partial
    _choose(browser, "by", "user")
    assert _legend(browser, "spend") == {"alice", "bob", "carol"}
    _choose(browser, "since", "24h")
    assert len(_labels(browser, "spend")) in {24, 25}  # by hour
    assert _legend(browser, "spend") == {"alice", "bob", "carol"}
    assert console_errors(browser) == []

    fcp = browser.execute_script(
        "return performance.getEntriesByName('first-contentful-paint')[0].startTime")
    print(f"dashboard first contentful paint: {fcp:.0f} ms; screenshot: {ARTIFACTS}")
    assert fcp < 1000


def test_with_an_admin_key_the_page_asks_for_it_once_and_never_puts_it_in_a_url(
    make_gateway: GatewayFactory, browser: Any, tmp_path: Path
) -> None:
    gw = make_gateway(admin_key="admin-secret", budgets=BUDGETS)
    _send_traffic(gw, tmp_path / "skinflint.db")
    _open(browser, f"{gw.root_url}/dashboard")
    _wait(browser, "return !document.getElementById('login').hidden")
    assert not browser.find_element("id", "panels").is_displayed()
    assert console_errors(browser) == []  # it asked before fetching anything

    browser.find_element("id", "key").send_keys("wrong-key")
    browser.find_element("css selector", "#login button").click()
    _wait(browser, "return document.body.dataset.ready")
    _wait(browser, "return !document.getElementById('login').hidden")
    assert "refused" in browser.find_element("id", "login-error").text
    refused = console_errors(browser)
    assert refused and all("401" in line for line in refused)

    browser.execute_script("delete document.body.dataset.ready")
    browser.find_element("id", "key").send_keys("admin-secret")
    browser.find_element("css selector", "#login button").click()
    _wait(browser, "return document.body.dataset.ready")
    states = _states(browser)
    assert states.pop("alerts") in {"ready", "empty"}
    assert states.pop("shadow") == "empty"
    assert set(states.values()) == {"ready"}, states
    assert console_errors(browser) == []
    urls = browser.execute_script(
        "return [location.href, ...performance.getEntriesByType('resource').map(e => e.name)]")
    assert not any("admin-secret" in url for url in urls)
    assert browser.execute_script(
        "return sessionStorage.getItem('skinflint.adminKey')") == "admin-secret"


def _seed_a_spike(db: Path) -> None:
    """Six minutes at $0.10 for the feature "search", then the minute just ended at $1.00,
    once the monitor's grace after that minute has passed and the next is still young."""
    while not 8 <= time.time() % 60 <= 40:
        time.sleep(0.5)
    minute = int(time.time() // 60) * 60
    ledger = SQLiteLedger(str(db))
    for back in range(7, 0, -1):
        ledger.record(LedgerRecord(f"seed-{back}", minute - back * 60 + 5, feature="search",
                                   model="gpt-4o", cost_usd=1.0 if back == 1 else 0.10))
    ledger.close()


def test_a_firing_alert_shows_in_the_alerts_panel(
    make_gateway: GatewayFactory, browser: Any, tmp_path: Path
) -> None:
    _seed_a_spike(tmp_path / "skinflint.db")
    rule = {"name": "search-spike", "per": "feature", "window": "minute", "baseline_windows": 6,
            "rise": 2.0, "for_windows": 1, "min_usd": 0.05, "resolve_below": 1.3}
    gw = make_gateway(alerts=[rule])
    deadline = time.monotonic() + 15
    while httpx.get(f"{gw.root_url}/api/alerts").json()["active"] != 1:
        assert time.monotonic() < deadline, "the alert did not fire"
        time.sleep(0.1)
    _open(browser, f"{gw.root_url}/dashboard")
    _wait(browser, "return document.body.dataset.ready")
    assert _states(browser)["alerts"] == "ready"
    assert browser.find_element("id", "kpi-alerts").text == "1"
    assert browser.find_element("id", "alerts-active").text == "1 active"
    row = browser.execute_script(
        "return [...document.querySelectorAll('#alerts tbody tr')[0].children].map(td => td.textContent)")
    assert row[:3] == ["firing", "search-spike", "feature: search"]
    assert row[4] == "—" and row[5] == "$1.00" and row[6] == "$0.1"
    assert console_errors(browser) == []
