"""The status page in headless Chromium (Debian's chromium and chromium-driver): the demo under
a real gunicorn, assets collected with ManifestStaticFilesStorage and precompressed; the page
renders services and breakers, a firing alert, the cache hit rate and the load tests from the
JSON endpoints; a repeat visit fetches no asset bytes (immutable caching, seen in the
DevTools Protocol's Network events and the Performance API); a screenshot is taken."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

from bench import browser
from hms_tasks import assets
from hms_tasks.assets import compression
from hms_tasks.metrics import alerts
from tests.helpers import RedisServer, free_port, stop, wait_for

REPO = Path(__file__).resolve().parent.parent

# CI installs Debian's chromium and chromium-driver (Makefile): a missing browser is a failure.
pytestmark = pytest.mark.skipif(not browser.available() and not os.environ.get("CI"),
                                reason="Debian's chromium and chromium-driver are not installed")


def _env(home: Path, static: Path, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(REDIS_URL=redis_url, HMS_TASKS_HOME=str(home), HMS_TASKS_STATIC_ROOT=str(static),
               DJANGO_SETTINGS_MODULE="hms_tasks.demo.settings", PYTHONPATH=str(REPO),
               PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def site(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("status-page")
    home, static = tmp / "home", tmp / "static"
    home.mkdir()
    env = _env(home, static, redis_server.url)
    for command in (["-m", "django", "collectstatic", "--noinput"],
                    ["-m", "hms_tasks", "seed", "--patients", "20"]):
        subprocess.run([sys.executable, *command], env=env, cwd=REPO, check=True,
                       capture_output=True, timeout=300)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "hms_tasks.demo.wsgi:application", "-b",
         f"127.0.0.1:{port}", "-w", "2", "--log-level", "warning"],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    try:
        wait_for(up, timeout=60, what="gunicorn")
        yield type("Site", (), {"base": base, "static": static, "tmp": tmp})
    finally:
        stop(server)


def test_status_page_renders_its_data_and_repeat_visits_fetch_no_asset_bytes(site: Any) -> None:
    compression.precompress_files(compression.hashed_files(site.static), root=site.static)
    # A cache miss then a hit through the demo API: a 50 % hit rate.
    for _ in range(2):
        with urllib.request.urlopen(f"{site.base}/api/patients/1/", timeout=10) as r:
            assert r.status == 200
    # The status page's script over a budget of 10 bytes: the assets_over_budget alert fires.
    with override_settings(HMS_TASKS_ASSETS_BUDGETS={"demo/status.js": 10}):
        assert assets.analyze(root=site.static)["regressions"] == 1
    alerts.evaluate_and_store()

    with browser.browser() as driver:
        first = browser.visit(driver, f"{site.base}/status/")
        services = driver.find_element("css selector", "#services table").text
        alert_text = driver.find_element("css selector", "#alerts").text
        hit_rate = driver.find_element("id", "hit-rate").text
        loadtests = driver.find_element("css selector", "#loadtests table").text
        shot = site.tmp / "status.png"
        driver.save_screenshot(str(shot))
        second = browser.visit(driver, f"{site.base}/status/")

    for service in ("api", "database", "redis"):
        assert service in services
    assert "assets.over_budget{asset=demo/status.js}" in alert_text
    assert "firing" in alert_text
    assert hit_rate == "50.0 %"
    assert "smoke" in loadtests
    assert "never_run" in loadtests
    assert shot.stat().st_size > 10_000

    asset_urls = [u for u in first.wire if "/static/demo/" in u]
    assert len(asset_urls) >= 3  # status.css, status.js, favicon.svg, with their hashes
    assert all(first.wire[u] > 0 for u in asset_urls)
    # The repeat visit: the page and its JSON revalidate, the hashed assets come from the cache.
    assert all(second.wire.get(u, 0) == 0 for u in asset_urls), second.wire
    # The stylesheet and the script answered by the disk cache (the favicon, used twice by
    # the page, may come from the memory cache, which reports no Network event at all).
    assert {u for u in asset_urls if "/status." in u} <= second.cached
    assert all(second.resources[u] == 0 for u in second.resources if "/static/demo/" in u)
    assert second.wire[f"{site.base}/status/"] > 0  # the page itself revalidates (no-cache)


def test_assets_are_served_compressed_with_immutable_caching(site: Any) -> None:
    compression.precompress_files(compression.hashed_files(site.static), root=site.static)
    name = assets.load_manifest(site.static / "staticfiles.json")["demo/status.js"]
    request = urllib.request.Request(f"{site.base}/static/{name}",
                                     headers={"Accept-Encoding": "br"})
    with urllib.request.urlopen(request, timeout=10) as r:
        headers, body = r.headers, r.read()
    assert headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert headers["Content-Encoding"] == "br"
    assert headers["Vary"] == "Accept-Encoding"
    import brotli

    assert brotli.decompress(body) == (site.static / name).read_bytes()
