"""Serving the dashboard: the page and its files ship in the package, are served with their
types and validators, need no key (the data does), and nothing else can be read through them.
The page itself is tested in a browser in ``test_dashboard_browser.py``."""

from __future__ import annotations

import http.client
import re
import tomllib
from fnmatch import fnmatch
from importlib.resources import files
from pathlib import Path

import httpx
import pytest

from skinflint.server.dashboard import PAGE, STATIC
from tests.conftest import GatewayFactory

FOLDER = files("skinflint") / "dashboard"


def test_the_page_its_files_and_the_chart_licence_ship_in_the_package() -> None:
    for name in (PAGE, *STATIC, "chart.js.LICENSE.md"):
        assert (FOLDER / name).is_file(), name
    shipped = re.match(r"/\*!\n \* Chart\.js v(4\.[0-9.]+)\n", (FOLDER / "chart.umd.min.js").read_text())
    assert shipped is not None
    noted = re.search(r"Chart\.js ([0-9.]+) \(MIT", (FOLDER / PAGE).read_text())
    assert noted is not None and noted[1] == shipped[1]  # the page says which version it ships
    assert "MIT License" in (FOLDER / "chart.js.LICENSE.md").read_text()


def test_the_wheel_takes_the_files_along() -> None:
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]
    for name in (PAGE, *STATIC, "chart.js.LICENSE.md"):
        assert any(fnmatch(f"dashboard/{name}", p) for p in patterns["skinflint"]), name


def test_the_page_loads_nothing_from_elsewhere() -> None:
    """The gateway must work offline: every script, style and fetch is the gateway's own."""
    page = (FOLDER / PAGE).read_text()
    linked = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert linked and all(u.startswith("dashboard/static/") or u == "data:," for u in linked)
    script = (FOLDER / "dashboard.js").read_text()
    fetched = re.findall(r'fetch\w*\("([^"]*)', script)
    assert sorted(set(fetched)) == ["api/alerts", "api/budgets", "api/requests?limit=50",
                                    "api/shadow", "api/spend?by=", "metrics"]
    assert "//" not in "".join(fetched)


def test_page_and_files_are_served_with_their_types_and_validators(
    make_gateway: GatewayFactory,
) -> None:
    gw = make_gateway()
    page = httpx.get(f"{gw.root_url}/dashboard", headers={"accept-encoding": "identity"})
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.content == (FOLDER / PAGE).read_bytes()
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "script-src 'self'" in csp and "unsafe" not in csp
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-cache"
    for name, kind in STATIC.items():
        answer = httpx.get(f"{gw.root_url}/dashboard/static/{name}")
        assert answer.status_code == 200, name
        assert answer.headers["content-type"] == kind.decode()
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.content == (FOLDER / name).read_bytes()  # httpx ungzips it


def test_a_current_copy_gets_a_304_and_a_gzip_client_gets_gzip(
    make_gateway: GatewayFactory,
) -> None:
    gw = make_gateway()
    url = f"{gw.root_url}/dashboard/static/chart.umd.min.js"
    zipped = httpx.get(url, headers={"accept-encoding": "gzip, deflate"})
    assert zipped.headers["content-encoding"] == "gzip"
    assert zipped.headers["vary"] == "accept-encoding"
    assert int(zipped.headers["content-length"]) < len(zipped.content) / 2  # httpx ungzips it
    plain = httpx.get(url, headers={"accept-encoding": "gzip;q=0, identity"})
    assert "content-encoding" not in plain.headers
    assert plain.content == zipped.content
    etag = plain.headers["etag"]
    again = httpx.get(url, headers={"if-none-match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == etag
    stale = httpx.get(url, headers={"if-none-match": '"something-else"'})
    assert stale.status_code == 200


@pytest.mark.parametrize("path", [
    "/dashboard/static/chart.js.LICENSE.md",  # in the folder, but not a file the page uses
    "/dashboard/static/../server/app.py",
    "/dashboard/static/%2e%2e/%2e%2e/config.py",
    "/dashboard/static/..%2f..%2fconfig.py",
    "/dashboard/static/",
    "/dashboard/static/dashboard.js/",
    "/dashboard/index.html",
    "/dashboard/",
])
def test_nothing_but_the_listed_files_can_be_read(make_gateway: GatewayFactory, path: str) -> None:
    gw = make_gateway()
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.request("GET", path)  # sent as written: no client-side normalisation of ".."
        answer = conn.getresponse()
        body = answer.read()
    finally:
        conn.close()
    assert answer.status == 404, path
    assert b'"not_found"' in body


def test_the_page_needs_no_key_but_its_data_does(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(admin_key="admin-secret")
    page = httpx.get(f"{gw.root_url}/dashboard")
    assert page.status_code == 200
    assert b'<meta name="skinflint-admin-key" content="required">' in page.content
    assert b"admin-secret" not in page.content
    for name in STATIC:
        assert httpx.get(f"{gw.root_url}/dashboard/static/{name}").status_code == 200
    assert httpx.get(f"{gw.root_url}/api/budgets").status_code == 401
    assert httpx.get(f"{gw.root_url}/metrics").status_code == 401
    keyed = {"authorization": "Bearer admin-secret"}
    assert httpx.get(f"{gw.root_url}/api/budgets", headers=keyed).status_code == 200


def test_without_an_admin_key_the_page_asks_for_none(make_gateway: GatewayFactory) -> None:
    gw = make_gateway()
    page = httpx.get(f"{gw.root_url}/dashboard")
    assert b'<meta name="skinflint-admin-key" content="optional">' in page.content
