"""The assets capability: metafiles the real bundlers wrote, the analysis with budgets, history
and the alert; precompression on a real worker; purges at loopback servers that speak the
providers' APIs; the static view's headers; the CLI's bad-input exits; no secret in Redis or logs.

The metafiles under tests/fixtures/assets/ were written by esbuild 0.28 (``--metafile``),
webpack 5.113 (``--json``, ``concatenateModules: false``) and Vite 8.4 (``build.manifest``)
building one tiny app of two entries (status.js and admin.js) sharing util.js and chart.js.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import brotli
import pytest
from click.testing import CliRunner
from django.test import Client, override_settings

from hms_tasks import assets, store
from hms_tasks.assets import analysis, cdn, compression, keys, settings
from hms_tasks.cli import cli, mount
from hms_tasks.errors import ConfigurationError
from hms_tasks.metrics import alerts
from hms_tasks.metrics import store as ts
from tests.helpers import wait_for

mount(cli)

FIXTURES = Path(__file__).parent / "fixtures" / "assets"
TOKEN = "cf-secret-token-7d1f0c"
AWS_KEY = "AKIDEXAMPLE0TEST"
AWS_SECRET = "aws-secret-4b9e2a-never-logged"
FASTLY_TOKEN = "fastly-secret-91aa"

JS = ("function render(rows){return rows.map(function(r){return r.name+': '+r.value})"
      ".join('\\n')}\n") * 200


def _static(root: Path, files: dict[str, bytes]) -> dict[str, str]:
    """What collectstatic with ManifestStaticFilesStorage writes: hashed copies + manifest."""
    paths = {}
    for name, data in files.items():
        stem, dot, ext = name.rpartition(".")
        hashed = f"{stem}.{abs(hash(data)) % 10**12:012x}{dot}{ext}"
        for n in (name, hashed):
            (root / n).parent.mkdir(parents=True, exist_ok=True)
            (root / n).write_bytes(data)
        paths[name] = hashed
    (root / "staticfiles.json").write_text(json.dumps({"paths": paths, "version": "1.1"}))
    return paths


# -- metafiles ---------------------------------------------------------------------------------


def test_esbuild_metafile_bundles_largest_inputs_and_duplicates() -> None:
    report = analysis.read_metafile(settings.Metafile(kind="esbuild",
                                                      path=str(FIXTURES / "esbuild-meta.json")))
    by_name = {b["name"]: b for b in report["bundles"]}
    assert set(by_name) == {"src/status.js", "src/admin.js"}
    assert by_name["src/status.js"]["largest_inputs"][0]["module"] == "src/status.js"
    assert by_name["src/status.js"]["inputs"] == 3
    dups = {d["module"]: d["bundles"] for d in report["duplicates"]}
    # esbuild without --splitting copies the shared modules into both entries.
    assert dups == {"src/util.js": ["src/admin.js", "src/status.js"],
                    "src/chart.js": ["src/admin.js", "src/status.js"]}


def test_webpack_stats_duplicates_leave_the_runtime_out() -> None:
    report = analysis.read_metafile(settings.Metafile(kind="webpack",
                                                      path=str(FIXTURES / "webpack-stats.json")))
    by_name = {b["name"]: b for b in report["bundles"]}
    assert set(by_name) == {"status", "admin"}
    assert by_name["status"]["files"][0].startswith("status.")
    assert by_name["status"]["largest_inputs"][0] == {"module": "webpack/runtime/define property"
                                                      " getters", "bytes": 314}
    assert {d["module"] for d in report["duplicates"]} == {"./src/util.js", "./src/chart.js"}


def test_vite_manifest_reports_entries_and_the_shared_chunk() -> None:
    report = analysis.read_metafile(settings.Metafile(kind="vite",
                                                      path=str(FIXTURES / "vite-manifest.json")))
    assert {b["name"] for b in report["bundles"]} == {"status", "admin"}
    assert report["shared"] == ["_chart-mk-JYose.js"]
    assert report["duplicates"] == []


def test_a_metafile_of_the_wrong_kind_names_the_setting() -> None:
    with pytest.raises(ConfigurationError, match=r"HMS_TASKS_ASSETS_METAFILE"):
        analysis.read_metafile(settings.Metafile(kind="webpack",
                                                 path=str(FIXTURES / "esbuild-meta.json")))


# -- analysis, budgets, history, alert ---------------------------------------------------------


def test_analysis_measures_records_history_and_fires_the_budget_alert(tmp_path: Path) -> None:
    _static(tmp_path, {"demo/app.js": JS.encode(), "demo/logo.png": os.urandom(2000)})
    with override_settings(HMS_TASKS_ASSETS_BUDGETS={"demo/app.js": 100_000},
                           HMS_TASKS_ASSETS_METAFILE={"kind": "esbuild",
                                                      "path": str(FIXTURES / "esbuild-meta.json")}):
        first = assets.analyze(root=tmp_path, now=time.time() - 60)
    sizes = {a["name"]: a for a in first["assets"]}
    assert sizes["demo/app.js"]["raw"] == len(JS)
    assert sizes["demo/app.js"]["br"] == len(brotli.compress(JS.encode(), quality=11))
    assert sizes["demo/app.js"]["gzip"] < sizes["demo/app.js"]["raw"]
    assert first["budgets"][0]["over"] is False
    assert first["regressions"] == 0
    assert first["metafile"] is not None
    assert first["metafile"]["kind"] == "esbuild"

    # The next deploy doubles the bundle and the budget is lowered: a regression.
    _static(tmp_path, {"demo/app.js": (JS * 2 + "x").encode()})
    with override_settings(HMS_TASKS_ASSETS_BUDGETS={"demo/app.js": 10}):
        second = assets.analyze(root=tmp_path)
    budget = second["budgets"][0]
    assert budget["over"]
    assert budget["regressed"]
    assert second["regressions"] == 1
    assert budget["previous"] == sizes["demo/app.js"]["br"]
    assert [h["budgets"]["demo/app.js"] for h in analysis.history()] == [
        budget["size"], sizes["demo/app.js"]["br"]]
    assert assets.latest() == json.loads(json.dumps(second))

    series = "assets.over_budget{asset=demo/app.js}"
    assert ts.latest()[series].value == 1.0
    alerts.evaluate_and_store()
    firing = {a["rule"] for a in alerts.states().values() if a["state"] == "firing"}
    assert "assets_over_budget" in firing


def test_history_is_capped(tmp_path: Path) -> None:
    _static(tmp_path, {"a.css": b"body{color:red}" * 50})
    with override_settings(HMS_TASKS_ASSETS_HISTORY=2, HMS_TASKS_ASSETS_BUDGETS={"a.css": 9999}):
        for _ in range(4):
            assets.analyze(root=tmp_path)
    assert store.client().llen(keys.history()) == 2


@pytest.mark.parametrize(("given", "message"), [
    ({"HMS_TASKS_ASSETS_BUDGETS": {"demo/app.js": "20kb"}},
     r"HMS_TASKS_ASSETS_BUDGETS\[…\]: must be a whole number of bytes"),
    ({"HMS_TASKS_ASSETS_BUDGETS": {"demo/app.js": 2.5}},
     r"HMS_TASKS_ASSETS_BUDGETS\[…\]: must be a whole number of bytes"),
    ({"HMS_TASKS_ASSETS_BUDGETS": {"/abs path.js": 10}}, r"budget names are static asset"),
    ({"HMS_TASKS_ASSETS_CDN": {"akamai": {}}},
     r"HMS_TASKS_ASSETS_CDN: unknown provider; allowed: cloudflare, cloudfront, fastly"),
    ({"HMS_TASKS_ASSETS_CDN": {"cloudflare": {"zone_id": "z1", "site_url": "https://s.example",
                                              "token": TOKEN}}},
     r"HMS_TASKS_ASSETS_CDN\['cloudflare'\]\['api_base'\] is not allowed"),
    ({"HMS_TASKS_ASSETS_CDN": {"fastly": {"service_id": "s", "mode": "url"}},
      "HMS_TASKS_ASSETS_CDN_ALLOWLIST": ["https://api.fastly.com"]},
     r"mode url needs site_url"),
])
def test_bad_settings_name_the_setting_and_never_the_value(given: dict[str, Any],
                                                           message: str) -> None:
    with override_settings(**given), pytest.raises(ConfigurationError, match=message) as exc:
        settings.get()
    assert TOKEN not in str(exc.value)
    assert "20kb" not in str(exc.value)


# -- precompression ----------------------------------------------------------------------------


def test_precompress_writes_br_and_gz_skips_what_does_not_shrink_and_is_idempotent(
        tmp_path: Path) -> None:
    paths = _static(tmp_path, {"app.js": JS.encode(), "noise.txt": os.urandom(4096)})
    files = compression.hashed_files(tmp_path)
    first = compression.precompress_files(files, root=tmp_path)
    js = tmp_path / paths["app.js"]
    assert brotli.decompress(js.with_name(js.name + ".br").read_bytes()) == JS.encode()
    assert gzip.decompress(js.with_name(js.name + ".gz").read_bytes()) == JS.encode()
    noise = tmp_path / paths["noise.txt"]
    assert not noise.with_name(noise.name + ".br").exists()
    assert (first["written"], first["no_gain"]) == (2, 2)
    assert not list(tmp_path.rglob("*.tmp"))
    again = compression.precompress_files(files, root=tmp_path)
    assert (again["written"], again["fresh"]) == (0, 2)


def test_a_file_another_writer_holds_is_left_to_it(tmp_path: Path) -> None:
    paths = _static(tmp_path, {"app.js": JS.encode()})
    target = (tmp_path / paths["app.js"]).resolve()
    import hashlib

    held = store.lock("assets.precompress:" + hashlib.sha1(
        str(target).encode(), usedforsecurity=False).hexdigest(), ttl=30)
    assert held.acquire(blocking=False)
    try:
        counts = compression.precompress_files([paths["app.js"]], root=tmp_path)
    finally:
        held.release()
    assert counts["busy"] == 1
    assert not target.with_name(target.name + ".br").exists()


def test_names_outside_static_root_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="inside STATIC_ROOT"):
        compression.precompress_files(["../../etc/passwd"], root=tmp_path)


def test_precompress_task_fans_chunks_out_to_the_workers(worker: Any, tmp_path: Path) -> None:
    files = {f"js/m{i}.js": (JS + str(i)).encode() for i in range(7)}
    paths = _static(tmp_path, files)
    from hms_tasks.assets import tasks

    with override_settings(STATIC_ROOT=str(tmp_path), HMS_TASKS_ASSETS_PRECOMPRESS_CHUNK=3):
        result = tasks.precompress_all.delay().get(timeout=30)
        assert (result["files"], result["chunks"]) == (7, 3)
        wait_for(lambda: all((tmp_path / f"{h}.br").exists() and (tmp_path / f"{h}.gz").exists()
                             for h in paths.values()), timeout=60)


# -- the static view ---------------------------------------------------------------------------


def test_static_view_immutable_hashed_assets_and_precompressed_bodies(tmp_path: Path) -> None:
    paths = _static(tmp_path, {"demo/app.js": JS.encode()})
    compression.precompress_files(compression.hashed_files(tmp_path), root=tmp_path)
    client = Client()
    with override_settings(STATIC_ROOT=str(tmp_path)):
        hashed = client.get(f"/static/{paths['demo/app.js']}", HTTP_ACCEPT_ENCODING="gzip, br")
        gz = client.get(f"/static/{paths['demo/app.js']}",
                        HTTP_ACCEPT_ENCODING="gzip;q=1, br;q=0")
        plain = client.get("/static/demo/app.js", HTTP_ACCEPT_ENCODING="gzip, br")
        missing = client.get("/static/../staticfiles.json")
    assert hashed.status_code == 200
    assert hashed["Cache-Control"] == "public, max-age=31536000, immutable"
    assert hashed["Content-Encoding"] == "br"
    assert hashed["Vary"] == "Accept-Encoding"
    assert hashed["Content-Type"].startswith("text/javascript")
    assert brotli.decompress(b"".join(hashed.streaming_content)) == JS.encode()  # type: ignore[attr-defined]
    assert gz["Content-Encoding"] == "gzip"
    # Only hashed names are precompressed; the unhashed alias revalidates.
    assert plain["Cache-Control"] == "public, max-age=60, must-revalidate"
    # No precompressed sidecar for an unhashed name: the demo's CompressionMiddleware (the
    # cache's HTTP responses) compresses it on the fly instead; it decodes to the same file.
    body = b"".join(plain.streaming_content) if plain.streaming else plain.content
    decode = {"br": brotli.decompress, "gzip": gzip.decompress, None: bytes}
    assert decode[plain.get("Content-Encoding")](body) == JS.encode()  # type: ignore[operator]
    assert missing.status_code == 404


@pytest.mark.parametrize(("header", "expected"), [
    ("gzip, deflate, br", ["br", "gzip"]), ("gzip;q=1.0, br;q=0.5", ["gzip", "br"]),
    ("br;q=0, gzip", ["gzip"]), ("identity", []), ("*", ["br", "gzip"]),
    ("*;q=0.1, gzip", ["gzip", "br"]), ("", []),
])
def test_accept_encoding_q_values(header: str, expected: list[str]) -> None:
    assert assets.serve.accepted_encodings(header) == expected


# -- purges ------------------------------------------------------------------------------------


class _CDN:
    """One loopback server speaking the three providers' purge APIs (their documented request
    and response shapes); the first call of each provider answers 429 with Retry-After."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.throttled: set[str] = set()
        self.always: int | None = None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                provider = ("cloudflare" if "/purge_cache" in self.path else "cloudfront"
                            if "/invalidation" in self.path else "fastly")
                outer.calls.append({"provider": provider, "path": self.path, "body": body,
                                    "headers": dict(self.headers.items())})
                if outer.always is not None:
                    self._answer(outer.always, b"{}", "application/json")
                    return
                if provider not in outer.throttled:
                    outer.throttled.add(provider)
                    self._answer(429, b'{"success":false}', "application/json",
                                 {"Retry-After": "1"})
                    return
                if provider == "cloudflare":
                    self._answer(200, json.dumps({"success": True, "errors": [], "messages": [],
                                                  "result": {"id": "cf-purge-1"}}).encode(),
                                 "application/json")
                elif provider == "cloudfront":
                    self._answer(201, (
                        b'<?xml version="1.0"?><Invalidation xmlns="http://cloudfront.amazonaws'
                        b'.com/doc/2020-05-31/"><Id>I2J0I21PCUYOIK</Id><Status>InProgress'
                        b'</Status></Invalidation>'), "text/xml",
                        {"Location": "https://cloudfront.amazonaws.com/2020-05-31/distribution"
                                     "/EDFDVBD6EXAMPLE/invalidation/I2J0I21PCUYOIK"})
                else:
                    keys_ = json.loads(body)["surrogate_keys"] if body else []
                    self._answer(200, json.dumps({k: f"p-{i}" for i, k in enumerate(keys_)}
                                                 ).encode(), "application/json")

            def _answer(self, code: int, body: bytes, ctype: str,
                        extra: dict[str, str] | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, provider: str) -> list[dict[str, Any]]:
        return [c for c in self.calls if c["provider"] == provider]


@pytest.fixture
def cdn_server() -> Iterator[_CDN]:
    server = _CDN()
    yield server
    server.server.shutdown()
    server.server.server_close()


def _cdn_settings(base: str) -> dict[str, Any]:
    return {
        "HMS_TASKS_ASSETS_CDN_ALLOWLIST": [base],
        "HMS_TASKS_ASSETS_CDN": {
            "cloudflare": {"api_base": f"{base}/client/v4", "zone_id": "023e105f4ecef8ad",
                           "site_url": "https://hms.example.org", "token": TOKEN},
            "cloudfront": {"api_base": base, "distribution_id": "EDFDVBD6EXAMPLE",
                           "access_key_id": AWS_KEY, "secret_access_key": AWS_SECRET},
            "fastly": {"api_base": base, "service_id": "SU1Z0isxPaozGVKXdv0eY",
                       "token": FASTLY_TOKEN},
        },
    }


def _everything_in_redis() -> str:
    client = store.client()
    out = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == "string":
            out.append(str(client.get(key)))
        elif kind == "list":
            out.extend(client.lrange(key, 0, -1))
        elif kind == "hash":
            out.extend(f"{k}={v}" for k, v in client.hgetall(key).items())
        elif kind in ("set", "zset"):
            out.append(str(client.zrange(key, 0, -1) if kind == "zset" else client.smembers(key)))
        elif kind == "stream":
            out.append(str(client.xrange(key)))
    return "\n".join(out)


def test_purge_batches_per_provider_retries_429_and_keeps_secrets_out(
        cdn_server: _CDN, caplog: pytest.LogCaptureFixture) -> None:
    paths = [f"/static/js/m{i}.js" for i in range(250)]
    caplog.set_level(logging.DEBUG)
    with override_settings(**_cdn_settings(cdn_server.base)):
        report = assets.purge(paths)
    cf, cfr, fa = (report["providers"][p] for p in ("cloudflare", "cloudfront", "fastly"))
    assert all(r["status"] == "ok" and r["purged"] == 250 and r["retries"] == 1
               for r in (cf, cfr, fa))
    # Cloudflare: 100 files per call -> 3 batches (+1 throttled call).
    assert (cf["batches"], cf["calls"]) == (3, 4)
    cf_calls = cdn_server.of("cloudflare")
    assert all(c["path"] == "/client/v4/zones/023e105f4ecef8ad/purge_cache" for c in cf_calls)
    assert cf_calls[-1]["headers"]["Authorization"] == f"Bearer {TOKEN}"
    files = [f for c in cf_calls[1:] for f in json.loads(c["body"])["files"]]
    assert sorted(files) == sorted(f"https://hms.example.org{p}" for p in paths)
    # CloudFront: one invalidation of up to 1,000 paths, SigV4-signed, same CallerReference on
    # the retry (no second invalidation).
    assert (cfr["batches"], cfr["calls"], cfr["ids"]) == (1, 2, ["I2J0I21PCUYOIK"])
    inv = cdn_server.of("cloudfront")
    assert inv[0]["path"] == "/2020-05-31/distribution/EDFDVBD6EXAMPLE/invalidation"
    assert inv[1]["headers"]["Authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={AWS_KEY}/")
    assert "/us-east-1/cloudfront/aws4_request" in inv[1]["headers"]["Authorization"]
    assert inv[0]["body"] == inv[1]["body"]
    assert b"<Quantity>250</Quantity>" in inv[1]["body"]
    # Fastly: surrogate keys, 256 per call -> 1 batch.
    assert (fa["batches"], fa["calls"]) == (1, 2)
    assert cdn_server.of("fastly")[-1]["headers"]["Fastly-Key"] == FASTLY_TOKEN
    assert sorted(json.loads(cdn_server.of("fastly")[-1]["body"])["surrogate_keys"]) == sorted(
        paths)
    assert cdn.last_reports()["cloudflare"]["calls"] == 4

    stored = _everything_in_redis()
    logged = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    for secret in (TOKEN, AWS_SECRET, FASTLY_TOKEN):
        assert secret not in stored
        assert secret not in logged
        assert secret not in json.dumps(report)


def test_batching_cuts_provider_calls_at_least_twentyfold(cdn_server: _CDN) -> None:
    cdn_server.throttled = {"cloudflare", "cloudfront", "fastly"}  # no 429s here
    paths = [f"/static/a{i}.js" for i in range(1000)]
    given = _cdn_settings(cdn_server.base)
    given["HMS_TASKS_ASSETS_CDN"] = {"cloudflare": given["HMS_TASKS_ASSETS_CDN"]["cloudflare"]}
    with override_settings(**given):
        batched = assets.purge(paths)["providers"]["cloudflare"]["calls"]
    given["HMS_TASKS_ASSETS_CDN"]["cloudflare"]["batch_size"] = 1
    with override_settings(**given):
        single = assets.purge(paths)["providers"]["cloudflare"]["calls"]
    assert (batched, single) == (10, 1000)


def test_a_permanent_error_fails_only_that_provider(cdn_server: _CDN) -> None:
    cdn_server.always = 403
    with override_settings(**_cdn_settings(cdn_server.base)):
        report = assets.purge(["/static/a.js"], providers=["fastly"])
    fa = report["providers"]["fastly"]
    assert (fa["status"], fa["calls"], fa["error"]) == ("failed", 1, "HTTP 403")


def test_a_retry_after_beyond_the_bound_ends_the_purge(cdn_server: _CDN) -> None:
    cdn_server.always = 503
    given = _cdn_settings(cdn_server.base)
    with override_settings(**given, HMS_TASKS_ASSETS_PURGE_ATTEMPTS=3,
                           HMS_TASKS_ASSETS_PURGE_MAX_WAIT=0.2):
        report = assets.purge(["/static/a.js"], providers=["cloudflare"])
    cf = report["providers"]["cloudflare"]
    assert cf["status"] == "failed"
    assert "HTTP 503" in (cf["error"] or "")


def test_manifest_diff() -> None:
    old = {"a.js": "a.1.js", "b.css": "b.1.css", "gone.js": "gone.1.js"}
    new = {"a.js": "a.2.js", "b.css": "b.1.css", "new.js": "new.1.js"}
    assert assets.manifest_diff(old, new) == {
        "changed": ["/static/a.js"], "removed": ["/static/gone.1.js", "/static/gone.js"]}


# -- the CLI -----------------------------------------------------------------------------------


def test_cli_bad_input_exits_2_and_writes_nothing(cdn_server: _CDN, tmp_path: Path) -> None:
    runner = CliRunner()
    with override_settings(**_cdn_settings(cdn_server.base)):
        unknown = runner.invoke(cli, ["assets", "purge", "--provider", "akamai", "--path",
                                      "/static/a.js"])
        bad_path = runner.invoke(cli, ["assets", "purge", "--path", "static/a.js?x=1"])
    with override_settings(HMS_TASKS_ASSETS_CDN={"cloudflare": {
            "api_base": "https://evil.example/client/v4", "zone_id": "z", "token": TOKEN,
            "site_url": "https://hms.example.org"}}, HMS_TASKS_ASSETS_CDN_ALLOWLIST=[
            "https://api.cloudflare.com/client/v4"]):
        not_allowed = runner.invoke(cli, ["assets", "purge", "--path", "/static/a.js"])
    with override_settings(HMS_TASKS_ASSETS_BUDGETS={"demo/app.js": "big"}):
        budget = runner.invoke(cli, ["assets", "analyze", "--static-root", str(tmp_path)])
    for result, words in ((unknown, "allowed: cloudflare, cloudfront, fastly"),
                          (bad_path, "--path"), (not_allowed, "not allowed"),
                          (budget, "HMS_TASKS_ASSETS_BUDGETS")):
        assert result.exit_code == 2, result.output
        assert words in result.output
        assert TOKEN not in result.output
    assert cdn_server.calls == []
    assert not store.client().exists(keys.purges(), keys.latest())


def test_cli_analyze_report_and_purge(cdn_server: _CDN, tmp_path: Path) -> None:
    paths = _static(tmp_path, {"demo/app.js": JS.encode()})
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"paths": {"demo/app.js": "demo/app.0.js", "x.css": "x.0.css"}}))
    runner = CliRunner()
    with override_settings(HMS_TASKS_ASSETS_BUDGETS={"demo/app.js": 10}):
        analyzed = runner.invoke(cli, ["assets", "analyze", "--static-root", str(tmp_path)])
        shown = runner.invoke(cli, ["assets", "report", "--json"])
    assert analyzed.exit_code == 1
    assert "REGRESSED" in analyzed.output
    assert json.loads(shown.stdout)["analysis"]["assets"][0]["file"] == paths["demo/app.js"]
    cdn_server.throttled = {"cloudflare", "cloudfront", "fastly"}
    with override_settings(**_cdn_settings(cdn_server.base)):
        purged = runner.invoke(cli, ["assets", "purge", "--json", "--old", str(old), "--new",
                                     str(tmp_path / "staticfiles.json")])
    assert purged.exit_code == 0, purged.output
    assert json.loads(purged.stdout)["urls"] == 3  # a.js changed; x.css and x.0.css removed
    with override_settings(**_cdn_settings(cdn_server.base)):
        report = runner.invoke(cli, ["assets", "report"])
    assert "cloudflare" in report.output
    assert TOKEN not in report.output
