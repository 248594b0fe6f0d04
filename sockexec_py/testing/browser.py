"""Headless chromium through selenium for the dashboard's tests and benchmark:
Debian's ``chromium`` and ``chromium-driver``, the same flags for both, a profile
of the caller's (so runs never share state)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

__all__ = ["CHROMIUM_FLAGS", "chromium"]

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,860",
)


def chromium(
    profile: Path,
    binary: str = "/usr/bin/chromium",
    driver: str = "/usr/bin/chromedriver",
) -> WebDriver:
    """A headless chromium with its user data in ``profile``; the caller quits it.
    Needs the ``test`` extra (selenium)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(options=options, service=Service(driver))
