"""Headless Chromium for the page tests: Debian's `chromium` and `chromium-driver` driven by
Selenium (no browser download). Without them a test skips, naming what is missing, unless
P2S_REQUIRE_BROWSER=1 (CI installs them: `.ci/run`), where it fails."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest


def _missing() -> list[str]:
    missing = [name for name in ("chromium", "chromedriver") if not shutil.which(name)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (the dev extra)")
    return missing


def need_browser() -> None:
    """Skips the test (or fails it under P2S_REQUIRE_BROWSER=1) without a browser to drive."""
    missing = _missing()
    if missing:
        message = ("no browser to drive: missing " + ", ".join(missing)
                   + " (apt-get install chromium chromium-driver)")
        if os.environ.get("P2S_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)


@contextlib.contextmanager
def chromium(downloads: Path, width: int = 1300, height: int = 900):
    """A headless Chromium (Selenium WebDriver) whose downloads go to `downloads`."""
    need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.execute_cdp_cmd("Page.setDownloadBehavior",
                               {"behavior": "allow", "downloadPath": str(downloads)})
        yield driver
    finally:
        driver.quit()


def wait_for(driver, script: str, timeout: float = 30.0):
    """Waits until the page's `script` returns something other than null -> that value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(
        lambda d: d.execute_script(script))
