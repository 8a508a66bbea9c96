"""A headless Chromium for the tests, driven by Selenium through Debian's ``chromedriver``.

``browser`` (per test) is a fresh ``selenium`` Chrome driver on Debian's ``chromium`` with a
throwaway profile, recording the browser console. Without the browser, its driver or the
``selenium`` package the fixture skips, except under CI (``CI=true``), where it fails so that a
missing install step cannot pass unnoticed (``apt-get install chromium chromium-driver``).

A test module imports ``browser_fixture`` to use the fixture.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pg import unavailable

__all__ = ["FLAGS", "browser_fixture", "console_errors"]

#: Headless, and nothing that reaches the network on its own (updates, sync, QUIC probes).
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,2200",
)


def _binaries() -> tuple[str, str]:
    browser = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        unavailable("no chromium or chromedriver; apt-get install chromium chromium-driver",
                    "Browser")
    return browser, driver


@pytest.fixture(name="browser")
def browser_fixture(tmp_path: Path) -> Iterator[Any]:
    browser, driver = _binaries()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        unavailable(f"{exc} (pip install selenium)", "Browser")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    try:
        yield chrome
    finally:
        chrome.quit()


def console_errors(chrome: Any) -> list[str]:
    """The browser console's errors since the last call (reading the log empties it)."""
    return [e["message"] for e in chrome.get_log("browser") if e["level"] == "SEVERE"]
