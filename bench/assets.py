"""Static assets: the status page in headless Chromium, precompression on workers, CDN purges.

* ``page``: the demo's status page under gunicorn in headless Chromium (Debian's chromium and
  chromium-driver; a fresh profile per configuration), on an emulated link (CDP
  ``Network.emulateNetworkConditions``: 40 ms latency, 10 Mbit/s down, 5 up). Bytes on the
  wire (CDP ``encodedDataLength``) and load time (Performance API: navigation start to the
  load event) on the first and the repeat visit, for four configurations: ours (precompressed
  br, immutable hashed assets), ours without precompression, and the baseline: Django's
  ``django.views.static.serve`` with ``Cache-Control: no-cache`` (revalidated on every visit,
  the usual setup of unhashed assets), with and without precompression (none: it sends no
  encoding). Compared with the seed's claim of 40 % faster page loads.
* ``precompress``: ``hms.assets.precompress`` over 6 MB of generated JavaScript-like text (40
  files, 2 chunks) at brotli quality 11, with 2 worker processes against 1: MB/s of input.
* ``purge``: 1,000 changed URLs at loopback servers speaking Cloudflare's, CloudFront's and
  Fastly's purge APIs, batched (100, 1,000 and 256 per call) against one call per URL: calls
  and the time to drain them.

``BENCH_PARTS=purge make bench BENCH=assets`` runs some parts only (comma-separated).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.common import REPO, Row, private_redis, stop, wait_until, worker_process

PARTS = ("page", "precompress", "purge")
ROUNDS = int(os.environ.get("BENCH_ASSETS_ROUNDS", "3"))
LINK = {"offline": False, "latency": 40, "downloadThroughput": 10_000_000 / 8,
        "uploadThroughput": 5_000_000 / 8}


# -- the page in Chromium ----------------------------------------------------------------------


@contextmanager
def _site(redis_url: str, static: Path, settings_module: str) -> Iterator[str]:
    home = Path(tempfile.mkdtemp(prefix="hms-bench-page-"))
    env = {**os.environ, "REDIS_URL": redis_url, "HMS_TASKS_HOME": str(home),
           "HMS_TASKS_STATIC_ROOT": str(static), "DJANGO_SETTINGS_MODULE": settings_module,
           "PYTHONPATH": str(REPO)}
    env.pop("DATABASE_URL", None)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
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
        wait_until(up, 60, "gunicorn")
        yield base
    finally:
        stop(proc)
        shutil.rmtree(home, ignore_errors=True)


def _visits(base: str) -> tuple[Any, Any]:
    from bench import browser

    with browser.browser() as driver:
        driver.execute_cdp_cmd("Network.emulateNetworkConditions", LINK)
        first = browser.visit(driver, f"{base}/status/")
        second = browser.visit(driver, f"{base}/status/")
    return first, second


def _bench_page(redis_url: str) -> list[Row]:
    from hms_tasks.assets import compression

    static = Path(tempfile.mkdtemp(prefix="hms-bench-static-"))
    env = {**os.environ, "HMS_TASKS_STATIC_ROOT": str(static), "REDIS_URL": redis_url,
           "DJANGO_SETTINGS_MODULE": "hms_tasks.demo.settings", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "django", "collectstatic", "--noinput"], env=env,
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    results: dict[str, dict[str, float]] = {}
    configs = [("ours", "hms_tasks.demo.settings", True),
               ("ours, no precompression", "hms_tasks.demo.settings", False),
               ("baseline, precompressed files ignored", "bench.assets_site", True),
               ("baseline", "bench.assets_site", False)]
    try:
        for label, module, compressed in configs:
            for sidecar in list(static.rglob("*.br")) + list(static.rglob("*.gz")):
                sidecar.unlink()
            if compressed:
                compression.precompress_files(compression.hashed_files(static), root=static)
            samples: dict[str, list[float]] = {"b1": [], "b2": [], "l1": [], "l2": []}
            with _site(redis_url, static, module) as base:
                for _ in range(ROUNDS):
                    first, second = _visits(base)
                    samples["b1"].append(first.bytes)
                    samples["b2"].append(second.bytes)
                    samples["l1"].append(first.load_ms)
                    samples["l2"].append(second.load_ms)
            results[label] = {k: statistics.median(v) for k, v in samples.items()}
    finally:
        shutil.rmtree(static, ignore_errors=True)
    ours, base = results["ours"], results["baseline"]
    plain = results["ours, no precompression"]
    rows = []
    for key, what in (("b1", "first visit, bytes"), ("b2", "repeat visit, bytes")):
        rows.append(Row(f"status page {what} (ours vs Django static.serve + no-cache)",
                        ours[key] / 1024, base[key] / 1024, "KB", "-",
                        ratio=round(base[key] / ours[key], 3) if ours[key] else None))
    rows.append(Row("status page first visit, bytes (br vs identity, both immutable)",
                    ours["b1"] / 1024, plain["b1"] / 1024, "KB", "-",
                    ratio=round(plain["b1"] / ours["b1"], 3)))
    for key, what in (("l1", "first visit"), ("l2", "repeat visit")):
        faster = 1 - ours[key] / base[key]
        rows.append(Row(f"status page load, {what} (10 Mbit/s, 40 ms; seed claims 40 % faster)",
                        ours[key], base[key], "ms",
                        "compare with 40 %", ratio=round(base[key] / ours[key], 3),
                        ok=None))
        print(f"  {what}: {faster * 100:.1f} % faster than the baseline", file=sys.stderr)
    print(json.dumps(results, indent=1), file=sys.stderr)
    return rows


# -- precompression on workers -----------------------------------------------------------------


def _js_like(rng: random.Random, size: int) -> bytes:
    words = ["function", "return", "const", "let", "if", "else", "for", "while", "render",
             "patient", "state", "props", "value", "index", "=>", "{", "}", "(", ")", ";",
             "this", "null", "undefined", "await", "async", "import", "export", "default"]
    out: list[str] = []
    n = 0
    while n < size:
        token = rng.choice(words) if rng.random() < 0.8 else f"v{rng.randrange(100000):x}"
        out.append(token)
        n += len(token) + 1
    return " ".join(out).encode()[:size]


def _bench_precompress(redis_url: str) -> list[Row]:
    from hms_tasks.celery import app

    rng = random.Random(7)
    files = {f"js/chunk{i}.js": _js_like(rng, 150_000) for i in range(40)}
    total_mb = sum(len(v) for v in files.values()) / 1e6
    speeds: dict[int, float] = {}
    for workers in (1, 2):
        static = Path(tempfile.mkdtemp(prefix="hms-bench-pre-"))
        paths = {}
        for i, (name, data) in enumerate(files.items()):
            hashed = name.replace(".js", f".{i:012x}.js")
            (static / hashed).parent.mkdir(parents=True, exist_ok=True)
            (static / hashed).write_bytes(data)
            paths[name] = hashed
        (static / "staticfiles.json").write_text(json.dumps({"paths": paths}))
        extra = {"HMS_TASKS_STATIC_ROOT": str(static)}
        try:
            with ExitStack() as stack:
                for w in range(workers):
                    stack.enter_context(worker_process(
                        redis_url=redis_url, queues="hms.assets", node=f"assets{w}@bench",
                        extra_env=extra))
                # hms.assets.precompress lists STATIC_ROOT on a worker and fans the chunks out.
                t0 = time.perf_counter()
                app.send_task("hms.assets.precompress")
                wait_until(lambda s=static, p=paths: all(
                    (s / f"{h}.br").exists() and (s / f"{h}.gz").exists()
                    for h in p.values()), 600, "precompression")
                speeds[workers] = total_mb / (time.perf_counter() - t0)
        finally:
            shutil.rmtree(static, ignore_errors=True)
    return [Row(f"precompress {total_mb:.1f} MB (brotli 11 + gzip 9), 2 workers vs 1",
                speeds[2], speeds[1], "MB/s", "more than 1 worker",
                ratio=round(speeds[2] / speeds[1], 3), ok=speeds[2] > speeds[1])]


# -- purges ------------------------------------------------------------------------------------


class _CDN(BaseHTTPRequestHandler):
    calls: dict[str, int] = {}

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if "/purge_cache" in self.path:
            kind, code = "cloudflare", 200
            answer = json.dumps({"success": True, "result": {"id": "x"}}).encode()
        elif "/invalidation" in self.path:
            kind, code = "cloudfront", 201
            answer = (b'<Invalidation xmlns="http://cloudfront.amazonaws.com/doc/2020-05-31/">'
                      b"<Id>I1</Id><Status>InProgress</Status></Invalidation>")
        else:
            kind, code = "fastly", 200
            keys = json.loads(body)["surrogate_keys"] if body else ["u"]
            answer = json.dumps({k: "p" for k in keys}).encode()
        _CDN.calls[kind] = _CDN.calls.get(kind, 0) + 1
        self.send_response(code)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


def _bench_purge() -> list[Row]:
    from django.test import override_settings

    from hms_tasks import assets

    server = ThreadingHTTPServer(("127.0.0.1", 0), _CDN)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    paths = [f"/static/js/m{i}.{i:08x}.js" for i in range(1000)]
    providers = {
        "cloudflare": {"api_base": f"{base}/client/v4", "zone_id": "z1",
                       "site_url": "https://hms.example.org", "token": "t"},
        "cloudfront": {"api_base": base, "distribution_id": "E1", "access_key_id": "AKID",
                       "secret_access_key": "s"},
        "fastly": {"api_base": base, "service_id": "s1", "token": "t"},
    }
    rows = []
    try:
        for name, entry in providers.items():
            figures = {}
            for batched in (True, False):
                # One call per URL: a batch of 1, and Fastly's URL purge.
                given: dict[str, Any] = dict(entry) if batched else dict(entry, batch_size=1)
                if not batched and name == "fastly":
                    given = dict(entry, mode="url", site_url="https://hms.example.org")
                with override_settings(HMS_TASKS_ASSETS_CDN={name: given},
                                       HMS_TASKS_ASSETS_CDN_ALLOWLIST=[base]):
                    t0 = time.perf_counter()
                    report = assets.purge(paths)["providers"][name]
                    elapsed = time.perf_counter() - t0
                assert report["status"] == "ok", report
                figures[batched] = (report["calls"], elapsed)
            (calls, secs), (calls1, secs1) = figures[True], figures[False]
            rows.append(Row(f"purge 1,000 URLs at {name}: API calls, batched vs one per URL",
                            calls, calls1, "calls", ">= 20x fewer",
                            ratio=round(calls1 / calls, 1), ok=calls1 / calls >= 20))
            rows.append(Row(f"purge 1,000 URLs at {name}: time to drain (loopback)",
                            secs * 1000, secs1 * 1000, "ms", "-",
                            ratio=round(secs1 / secs, 1)))
    finally:
        server.shutdown()
        server.server_close()
    return rows


def run() -> list[Row]:
    chosen = [p for p in os.environ.get("BENCH_PARTS", "").split(",") if p] or list(PARTS)
    if unknown := [p for p in chosen if p not in PARTS]:
        raise SystemExit(f"BENCH_PARTS: unknown part {unknown[0]!r}; known: {', '.join(PARTS)}")
    rows: list[Row] = []
    with private_redis() as url:
        from bench.common import django_on

        django_on(url)
        if "purge" in chosen:
            rows += _bench_purge()
        if "precompress" in chosen:
            rows += _bench_precompress(url)
        if "page" in chosen:
            rows += _bench_page(url)
    return rows
