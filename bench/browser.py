"""Headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven through selenium, for
the status page's browser test and the assets benchmark.

Selenium talks WebDriver to Debian's chromedriver (never a downloaded browser) and passes
Chrome DevTools Protocol commands through ``execute_cdp_cmd``; the Network domain's events come
from the ``performance`` log. A visit reports what the page fetched: per URL the bytes on the
wire (``Network.loadingFinished``'s ``encodedDataLength``) and whether the browser's cache
answered (``Network.requestServedFromCache``, or a resource the page used without any network
event), plus the Performance API's navigation timing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CHROMEDRIVER", "CHROMIUM", "Visit", "available", "browser", "visit"]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

# No update checks, sync, first-run pages or background traffic: the page's own requests only.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--disable-extensions", "--window-size=1280,900")


def available() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


@contextmanager
def browser() -> Iterator[Any]:
    """A fresh headless Chromium (its own user-data dir, removed after) with performance logs."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="hms-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.execute_cdp_cmd("Network.enable", {})
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@dataclass
class Visit:
    #: URL -> bytes received for it (headers and body as sent: compressed if it was).
    wire: dict[str, int] = field(default_factory=dict)
    #: URLs the browser's cache answered.
    cached: set[str] = field(default_factory=set)
    #: Resources the page used (Performance API) with their transferSize.
    resources: dict[str, int] = field(default_factory=dict)
    #: Navigation start to the end of the load event, in ms (Performance API).
    load_ms: float = 0.0
    #: Navigation start to the page's data rendered (body[data-ready]), in ms.
    ready_ms: float = 0.0

    @property
    def bytes(self) -> int:
        return sum(self.wire.values())


def visit(driver: Any, url: str, *, timeout: float = 30.0) -> Visit:
    """Open ``url`` in ``driver`` and wait for the status page's data (``body[data-ready]``);
    what it fetched (see :class:`Visit`)."""
    driver.get_log("performance")  # drop the events of earlier visits
    driver.get(url)
    deadline = time.monotonic() + timeout
    while not driver.execute_script(
            "return document.body && document.body.dataset.ready === '1'"
            " && performance.getEntriesByType('navigation')[0].loadEventEnd > 0"):
        if time.monotonic() > deadline:
            raise AssertionError(f"the page did not render its data within {timeout} s")
        time.sleep(0.05)
    timing = driver.execute_script("""
        const nav = performance.getEntriesByType('navigation')[0];
        const mark = performance.getEntriesByName('status-ready')[0].startTime;
        return {load: nav.loadEventEnd - nav.startTime, ready: mark,
                resources: performance.getEntriesByType('resource').map(
                    (r) => [r.name, r.transferSize])};
    """)
    out = Visit(load_ms=float(timing["load"]), ready_ms=float(timing["ready"]),
                resources={name: int(size) for name, size in timing["resources"]})
    urls: dict[str, str] = {}
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            urls[params["requestId"]] = params["request"]["url"]
        elif method == "Network.requestServedFromCache":
            out.cached.add(urls.get(params["requestId"], params["requestId"]))
        elif method == "Network.loadingFinished":
            target = urls.get(params["requestId"])
            if target is not None:
                out.wire[target] = out.wire.get(target, 0) + int(params["encodedDataLength"])
    return out
