"""Response benchmarks (issue #11): bytes on the wire, compression levels, and the 304 path.
``python -m bench responses`` (``make bench BENCH=responses``).

One process, one private Redis, a demo database of 2,000 patients seeded into a temporary
SQLite file. Requests go through Django's real WSGI handler (what gunicorn calls) with the
demo's middleware, in this process: no socket, so the figures are the server's work alone.

- **Bytes**: the demo API's pages, raw against br and gzip at the configured levels.
- **Levels**: CPU time per response (``time.process_time``) and total bytes over the same
  pages for brotli 0-11 and gzip 1-9; the table the levels in ``hms_tasks.cache.settings``
  were chosen from.
- **304**: ``GET /api/patients/<id>/`` with a current ``If-None-Match``, answered by
  ``NotModifiedMiddleware`` before URL resolution and the view, against the same request
  answered as a full cache hit (target: at most 0.5x its time; also against the hit as the
  endpoint answered it before ETags, and the 304 the view itself answers, without the
  middleware), and against Django's ``ConditionalGetMiddleware`` on the same endpoint, which
  reads the cached payload, encodes it and hashes the body before it can answer 304 (target:
  at least 3x faster). Beside them, what no 304 can go below: ``/healthz`` through the same
  stack (Django's request cycle) and a Redis ``PING`` (one round trip). Rounds alternate the
  sides (``BENCH_RESPONSES_ROUNDS``, ``BENCH_RESPONSES_REQUESTS`` per side and round); the
  median round is reported, every round printed.

A Redis round trip costs about twice as much when this process and redis-server run on
different cores as on the same one (cross-core wake-ups), and the scheduler picks either.
``BENCH_RESPONSES_CPUS=same`` pins both to CPU 0, ``apart`` this process to CPU 0 and Redis to
CPU 1 (as with Redis on its own core or host); unset, the scheduler decides.
"""

from __future__ import annotations

import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, JsonResponse
from django.urls import path

from bench.common import REPO, Row, django_on, private_redis

PATIENTS = 2000
ROUNDS = int(os.environ.get("BENCH_RESPONSES_ROUNDS", "16"))
REQUESTS = int(os.environ.get("BENCH_RESPONSES_REQUESTS", "400"))
#: What a browser sends.
BROWSER_ENCODINGS = "gzip, deflate, br"


# -- the baseline endpoint: the demo's view before this issue, under ConditionalGetMiddleware --


def _plain_patient(request: HttpRequest, patient_id: int) -> JsonResponse:
    from hms_tasks.cache import get_or_build, set_cache_control

    return set_cache_control(JsonResponse(get_or_build("patient", patient_id)), "patient")


def _built_patient(request: HttpRequest, patient_id: int) -> JsonResponse:
    from hms_tasks.cache import set_cache_control
    from hms_tasks.demo.api import patient_summary

    summary = patient_summary(patient_id)
    return set_cache_control(JsonResponse(dict(summary or {})), "patient")


urlpatterns = [
    path("api/patients/<int:patient_id>/", _plain_patient),
    # The same summary without the cache: what ConditionalGetMiddleware is usually put over.
    path("api/built/<int:patient_id>/", _built_patient),
]


class BaselineUrls:
    """Route the baseline handler's requests to :data:`urlpatterns` (Django's per-request
    ``request.urlconf``), whatever ``ROOT_URLCONF`` says."""

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> Any:
        request.urlconf = "bench.responses"
        return self.get_response(request)


# -- WSGI plumbing -----------------------------------------------------------------------------

Handler = Callable[..., Any]


def _environ(url: str, headers: dict[str, str]) -> dict[str, Any]:
    path_info, _, query = url.partition("?")
    env: dict[str, Any] = {
        "REQUEST_METHOD": "GET", "PATH_INFO": path_info, "QUERY_STRING": query,
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "HTTP_HOST": "127.0.0.1",
        "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
        "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False,
    }
    for name, value in headers.items():
        env["HTTP_" + name.upper().replace("-", "_")] = value
    return env


def _call(handler: Handler, env: dict[str, Any]) -> tuple[str, dict[str, str], bytes]:
    got: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None
                       ) -> None:
        got.append((status, headers))

    result = handler({**env, "wsgi.input": io.BytesIO(b"")}, start_response)
    try:
        body = b"".join(result)
    finally:
        result.close()
    status, headers = got[0]
    return status, {k.lower(): v for k, v in headers}, body


def _get(handler: Handler, url: str, **headers: str) -> tuple[str, dict[str, str], bytes]:
    return _call(handler, _environ(url, {k.replace("_", "-"): v for k, v in headers.items()}))


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise RuntimeError(f"benchmark set-up failed: {what}")


def _per_request_us(handler: Handler, env: dict[str, Any], n: int) -> tuple[float, float]:
    """Wall and CPU (this process) microseconds per request."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        _call(handler, env)
    return (time.perf_counter() - t0) / n * 1e6, (time.process_time() - c0) / n * 1e6


# -- the parts ---------------------------------------------------------------------------------


def _pages(handler: Handler) -> dict[str, bytes]:
    """The demo API's pages (raw JSON bodies) by label."""
    from hms_tasks.cache import get_or_build
    from hms_tasks.demo.cache import hot_practitioners
    from hms_tasks.demo.models import Department

    sizes = {}
    for pid in range(1, 301):
        summary = get_or_build("patient", pid)
        if summary is not None:
            sizes[pid] = len(JsonResponse(summary).content)
    by_size = sorted(sizes, key=lambda p: sizes[p])
    typical, largest = by_size[len(by_size) // 2], by_size[-1]
    practitioner = hot_practitioners(1)[0]
    department = Department.objects.order_by("id").values_list("id", flat=True)[0]
    urls = {
        "patients limit=200": "/api/patients/?limit=200",
        "patients limit=50": "/api/patients/?limit=50",
        "patient (median summary)": f"/api/patients/{typical}/",
        "patient (largest of 300)": f"/api/patients/{largest}/",
        "practitioner today": f"/api/practitioners/{practitioner}/appointments/today/",
        "department census": f"/api/departments/{department}/census/",
        "all departments census": "/api/departments/census/",
    }
    out = {}
    for label, url in urls.items():
        status, headers, body = _get(handler, url)
        assert status.startswith("200"), (url, status)
        assert "content-encoding" not in headers
        out[label] = body
    return out


def _cpu_us(fn: Callable[[], object], budget: float = 0.15) -> float:
    """CPU microseconds per call of ``fn``, repeated for at least ``budget`` CPU seconds."""
    n, spent = 0, 0.0
    t0 = time.process_time()
    while spent < budget:
        fn()
        n += 1
        spent = time.process_time() - t0
    return spent / n * 1e6


#: The level rule: take a higher level while it saves at least this many bytes per extra CPU
#: microsecond (along the lower convex hull of bytes against CPU). 10 B/us is where the
#: server's CPU and the client's transfer time break even on an 80 Mbit/s link.
BYTES_PER_US = 10.0


def pick_level(points: list[tuple[int, float, int]]) -> int:
    """The level the rule picks from ``(level, CPU us, bytes)`` points."""
    level, cpu, size = points[0]
    while True:
        gains = [((size - b) / (c - cpu), lv, c, b) for lv, c, b in points
                 if c > cpu and b < size]
        if not gains:
            return level
        slope, lv, c, b = max(gains)
        if slope < BYTES_PER_US:
            return level
        level, cpu, size = lv, c, b


def _levels(pages: dict[str, bytes]) -> list[Row]:
    from hms_tasks.cache import settings
    from hms_tasks.cache.compression import compress

    s = settings.get()
    bodies = list(pages.values())
    raw = sum(len(b) for b in bodies)
    rows = []
    print(f"\ncompression levels over {len(bodies)} pages ({raw:,} B raw):")
    print("coding  level  bytes      smaller  CPU us/response")
    for coding, levels, chosen in (("br", range(12), s.cache_brotli_quality),
                                   ("gzip", range(1, 10), s.cache_gzip_level)):
        points = []
        for level in levels:
            size = sum(len(compress(b, coding, level=level)) for b in bodies)
            cpu = _cpu_us(lambda c=coding, lv=level: [
                compress(b, c, level=lv) for b in bodies]) / len(bodies)
            mark = "  <- configured" if level == chosen else ""
            print(f"{coding:<6}  {level:>5}  {size:>9,}  {raw / size:>6.2f}x  {cpu:>10.1f}{mark}")
            rows.append(Row(what=f"CPU per response, {coding} level {level} ({size:,} B over the"
                                 f" pages, {raw / size:.2f}x smaller){mark}",
                            ours=cpu, baseline=None, unit="us", target="report"))
            points.append((level, cpu, size))
        picked = pick_level(points)
        print(f"the rule ({BYTES_PER_US:.0f} B saved per extra CPU us) picks {coding} {picked}")
        rows.append(Row(what=f"{coding}: the level the rule picks (configured: {chosen})",
                        ours=picked, baseline=None, unit="", target="report"))
    return rows


def _bytes(pages: dict[str, bytes]) -> list[Row]:
    from hms_tasks.cache.compression import compress

    rows = []
    for label, body in pages.items():
        for coding in ("br", "gzip"):
            size = len(compress(body, coding))
            rows.append(Row(what=f"bytes on the wire, {label}: {coding} vs raw", ours=size,
                            baseline=len(body), unit="B", ratio=len(body) / size,
                            target="report"))
    return rows


def _early(handler: Handler, env: dict[str, Any]) -> bool:
    """Whether ``NotModifiedMiddleware`` answered: a 304 from the view passes CommonMiddleware,
    which adds a Content-Length; one answered above it has none."""
    status, headers, body = _call(handler, env)
    return status.startswith("304") and body == b"" and "content-length" not in headers


def _conditional(handler: Handler, viewpath: Handler, baseline: Handler, before: Handler,
                 patient_url: str, schedule_url: str) -> list[Row]:
    from hms_tasks.cache.core import backend, count_queries

    sched_env = _environ(schedule_url, {"Accept-Encoding": BROWSER_ENCODINGS})
    status, headers, _ = _call(handler, sched_env)
    _expect(status.startswith("200") and headers.get("content-encoding") == "br", "schedule")
    sched_304 = {**sched_env, "HTTP_IF_NONE_MATCH": headers["etag"]}
    _expect(_early(handler, sched_304), "the schedule's early 304")

    hit_env = _environ(patient_url, {"Accept-Encoding": BROWSER_ENCODINGS})
    status, headers, _ = _call(handler, hit_env)
    assert status.startswith("200")
    ours_env = {**hit_env, "HTTP_IF_NONE_MATCH": headers["etag"]}
    _expect(_early(handler, ours_env), "our early 304")
    status, _, body = _call(viewpath, ours_env)
    _expect(status.startswith("304") and body == b"" and not _early(viewpath, ours_env),
            "the view's 304")
    with count_queries() as queries:
        _call(handler, ours_env)
    assert queries[0] == 0, "the 304 path ran a query"
    healthz_env = _environ("/healthz", {"Accept-Encoding": BROWSER_ENCODINGS})
    _expect(_call(handler, healthz_env)[0].startswith("200"), "/healthz")
    redis_client = backend().client()
    django_env = _django_304(baseline, hit_env)
    built_env = _django_304(baseline, {**hit_env, "PATH_INFO": hit_env["PATH_INFO"].replace(
        "/patients/", "/built/")})

    sides: dict[str, tuple[Handler, dict[str, Any]]] = {
        "ours": (handler, ours_env), "hit": (handler, hit_env),
        "django": (baseline, django_env), "django-built": (baseline, built_env),
        "hit-before": (before, hit_env), "sched-304": (handler, sched_304),
        "sched-hit": (handler, sched_env), "view-304": (viewpath, ours_env),
        "healthz": (handler, healthz_env), "redis-ping": (lambda e, s: redis_client.ping(), {})}

    def measure(name: str, n: int) -> tuple[float, float]:
        h, env = sides[name]
        return _per_ping_us(h, n) if name == "redis-ping" else _per_request_us(h, env, n)

    for name in sides:
        measure(name, 200)  # warm-up
    rounds: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for r in range(ROUNDS):
        k = r % len(order)
        for name in order[k:] + order[:k]:  # rotate who goes first
            wall, used = measure(name, REQUESTS)
            rounds[name].append(wall)
            cpu[name].append(used)
    print(f"\nper request, {ROUNDS} rounds of {REQUESTS} (wall us; CPU us of this process):")
    for name in sides:
        print(f"{name:>12}: " + " / ".join(f"{v:.0f}" for v in rounds[name]) + "  CPU "
              + " / ".join(f"{v:.0f}" for v in cpu[name]))
    ours, hit, django, built, plain, s304, shit, view, healthz, ping = (
        statistics.median(rounds[n]) for n in sides)
    c_ours, c_hit, c_django, c_built, c_plain, _, _, c_view, c_healthz, c_ping = (
        statistics.median(cpu[n]) for n in sides)
    return [
        Row(what=f"304 (NotModifiedMiddleware, one EVALSHA) vs a full cache hit, {patient_url}"
                 f" (median of {ROUNDS} rounds x {REQUESTS})",
            ours=ours, baseline=hit, unit="us", ratio=ours / hit, target="<= 0.50 (ours/hit)",
            ok=ours / hit <= 0.5),
        Row(what=f"304 vs a full cache hit, {schedule_url} (3.5 KB of JSON, sent in brotli)",
            ours=s304, baseline=shit, unit="us", ratio=s304 / shit,
            target="<= 0.50 (ours/hit)", ok=s304 / shit <= 0.5),
        Row(what="304 before the view vs the 304 the view answers (cached_response, without"
                 " the middleware)",
            ours=ours, baseline=view, unit="us", ratio=ours / view, target="report (ours/view)"),
        Row(what="304 vs the hit as the endpoint answered it before ETags (get_or_build,"
                 " JsonResponse)",
            ours=ours, baseline=plain, unit="us", ratio=ours / plain, target="report (ours/hit)"),
        Row(what="304 ours vs Django's ConditionalGetMiddleware over the cached payload (a hit,"
                 " JSON, hash), same endpoint",
            ours=ours, baseline=django, unit="us", ratio=django / ours,
            target=">= 3x faster", ok=django / ours >= 3),
        Row(what="304 ours vs ConditionalGetMiddleware over the summary built per request"
                 " (3 queries, JSON, hash)",
            ours=ours, baseline=built, unit="us", ratio=built / ours, target="report"),
        Row(what="the floors: /healthz through the same stack (Django's request cycle, no"
                 " Redis) vs one Redis round trip (PING)", ours=healthz, baseline=ping,
            unit="us", target="report"),
        Row(what="304 minus one PING: what the 304 costs besides its round trip, vs the same"
                 " for ConditionalGetMiddleware over the cached payload",
            ours=ours - ping, baseline=django - ping, unit="us",
            ratio=(django - ping) / (ours - ping), target="report (x less)"),
        Row(what="CPU of the web process: 304 vs full cache hit", ours=c_ours, baseline=c_hit,
            unit="us", ratio=c_ours / c_hit, target="report (ours/hit)"),
        Row(what="CPU of the web process: 304 before the view vs the view's 304", ours=c_ours,
            baseline=c_view, unit="us", ratio=c_ours / c_view, target="report (ours/view)"),
        Row(what="CPU of the web process: /healthz vs a PING", ours=c_healthz, baseline=c_ping,
            unit="us", target="report"),
        Row(what="CPU of the web process: 304 vs the hit before ETags", ours=c_ours,
            baseline=c_plain, unit="us", ratio=c_ours / c_plain, target="report (ours/hit)"),
        Row(what="CPU of the web process: 304 vs ConditionalGetMiddleware, cached payload",
            ours=c_ours, baseline=c_django, unit="us", ratio=c_django / c_ours,
            target="report (x less)"),
        Row(what="CPU of the web process: 304 vs ConditionalGetMiddleware, built per request",
            ours=c_ours, baseline=c_built, unit="us", ratio=c_built / c_ours,
            target="report (x less)"),
    ]


def _per_ping_us(ping: Handler, n: int) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        ping(None, None)
    return (time.perf_counter() - t0) / n * 1e6, (time.process_time() - c0) / n * 1e6


def _django_304(baseline: Handler, env: dict[str, Any]) -> dict[str, Any]:
    """The request that gets ConditionalGetMiddleware's 304 (its ETag in If-None-Match)."""
    status, headers, _ = _call(baseline, env)
    _expect(status.startswith("200") and "etag" in headers, "the baseline's ETag")
    conditional = {**env, "HTTP_IF_NONE_MATCH": headers["etag"]}
    status, _, body = _call(baseline, conditional)
    _expect(status.startswith("304") and body == b"", "the baseline's 304")
    return conditional


def _pin() -> None:
    """Place this process and its redis-server as ``BENCH_RESPONSES_CPUS`` says."""
    placement = os.environ.get("BENCH_RESPONSES_CPUS", "")
    if not placement:
        return
    if placement not in ("same", "apart"):
        raise SystemExit("BENCH_RESPONSES_CPUS must be same or apart")
    import psutil

    me = psutil.Process()
    me.cpu_affinity([0])
    for child in me.children():
        if child.name() == "redis-server":
            child.cpu_affinity([0] if placement == "same" else [1])
    print(f"CPUs: this process on 0, redis-server on {0 if placement == 'same' else 1}")


def run() -> list[Row]:
    with private_redis() as url, tempfile.TemporaryDirectory(prefix="hms-bench-resp-") as home:
        _pin()
        database = f"sqlite:///{home}/hms.sqlite3"
        env = {**os.environ, "REDIS_URL": url, "DATABASE_URL": database,
               "HMS_TASKS_HOME": home, "DJANGO_SETTINGS_MODULE": "hms_tasks.demo.settings",
               "LOG_LEVEL": "WARNING"}
        subprocess.run([sys.executable, "-m", "hms_tasks", "seed", "--patients", str(PATIENTS)],
                       env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        os.environ.update(DATABASE_URL=database, HMS_TASKS_HOME=home, LOG_LEVEL="WARNING")
        django_on(url)
        from django.conf import settings
        from django.core.handlers.wsgi import WSGIHandler
        from django.test.utils import override_settings

        handler = WSGIHandler()
        # The demo's stack without the early 304s: the view answers them.
        middleware = [m for m in settings.MIDDLEWARE
                      if m != "hms_tasks.cache.NotModifiedMiddleware"]
        with override_settings(MIDDLEWARE=middleware):
            viewpath = WSGIHandler()
        with override_settings(MIDDLEWARE=["bench.responses.BaselineUrls", *middleware]):
            before = WSGIHandler()
        # Where Django's docs put it: below compression, above what changes the body.
        middleware.insert(middleware.index("hms_tasks.cache.CompressionMiddleware") + 1,
                          "django.middleware.http.ConditionalGetMiddleware")
        with override_settings(MIDDLEWARE=["bench.responses.BaselineUrls", *middleware]):
            baseline = WSGIHandler()
        pages = _pages(handler)
        rows = _bytes(pages)
        rows += _levels(pages)
        patient_url = next(u for u in (
            f"/api/patients/{i}/" for i in range(1, 50)) if _get(handler, u)[0][:3] == "200")
        from hms_tasks.demo.cache import hot_practitioners

        schedule_url = f"/api/practitioners/{hot_practitioners(1)[0]}/appointments/today/"
        rows += _conditional(handler, viewpath, baseline, before, patient_url, schedule_url)
        return rows


if __name__ == "__main__":
    from bench.common import print_table

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hms_tasks.demo.settings")
    print_table(run())
