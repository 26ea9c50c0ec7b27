"""Flower against hms_tasks (hms_tasks.flower), with real Flower and worker subprocesses.

- Off loopback without auth, ``celery -A hms_tasks flower`` exits with status 2 before it binds
  (the test watches the port the whole time and kills Flower at once if it ever listens).
- With ``FLOWER_BASIC_AUTH`` it starts, and ``/metrics`` needs the password like the pages.
- Read-only by default: every control endpoint answers 403 and the worker keeps running with
  its queues, while running a task through ``/api/task/async-apply`` still works; with
  ``HMS_TASKS_FLOWER_CONTROL = True`` a shutdown from Flower stops the worker.

Flower only ever listens on 127.0.0.1 here. Figures: refusals before binding, endpoints
checked / refused.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from hms_tasks import names
from hms_tasks.cache import names as cache_names
from hms_tasks.flower import RUN_TASK_ENDPOINTS, start_problems
from tests.helpers import RedisServer, free_port, stop, wait_for

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "flower-test-secret"
BASIC = "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()


def http(method: str, url: str, *, headers: dict[str, str] | None = None,
         body: bytes | None = None) -> tuple[int, bytes]:
    """One request to the local Flower: (status, body), 4xx and 5xx included."""
    if method != "GET" and body is None:
        body = b""
    request = urllib.request.Request(url, method=method, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def flower_env(tmp_path: Path, redis_server: RedisServer, **extra: str) -> dict[str, str]:
    """The test's environment without any FLOWER_* variable of the caller, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    env.update(REDIS_URL=redis_server.url, HMS_TASKS_HOME=str(tmp_path), **extra)
    return env


def flower_argv(port: int, address: str | None = "127.0.0.1") -> list[str]:
    argv = [sys.executable, "-m", "celery", "-A", "hms_tasks", "flower", f"--port={port}"]
    if address is not None:
        argv.append(f"--address={address}")
    return argv


def listening(pid: int, port: int) -> bool:
    """Whether process ``pid`` listens on ``port``, or anything on loopback answers there."""
    with contextlib.suppress(psutil.Error):
        for conn in psutil.Process(pid).net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                return True
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def running_flower(env: dict[str, str], tmp_path: Path, name: str) -> Iterator[str]:
    """A Flower subprocess on 127.0.0.1; yields its base URL once /healthcheck answers."""
    port = free_port()
    log = (tmp_path / f"{name}.log").open("wb")
    proc = subprocess.Popen(flower_argv(port), cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, (tmp_path / f"{name}.log").read_text(errors="replace")
            with contextlib.suppress(OSError):
                return http("GET", f"{base}/healthcheck")[0] == 200
            return False

        wait_for(up, timeout=60, interval=0.1, what="Flower to answer /healthcheck")
        yield base
    finally:
        stop(proc)
        log.close()


@contextlib.contextmanager
def running_worker(env: dict[str, str], tmp_path: Path, node: str) -> Iterator[Any]:
    """A worker subprocess on the cache queue; yields its Popen."""
    log = (tmp_path / f"{node}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "hms_tasks", "worker", "--pool", "prefork",
         "--concurrency", "1", "-Q", names.queue_for(cache_names.CACHE_STATS), "-n", node,
         "--without-mingle", "--without-gossip"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop(proc)
        log.close()


def known_worker(base: str, node: str) -> bool:
    status, body = http("GET", f"{base}/api/workers?refresh=1")
    return status == 200 and node in json.loads(body)


def control_requests(node: str) -> dict[str, str]:
    """Flower route pattern -> a request to it that would change the cluster."""
    task_id = "00000000-0000-0000-0000-000000000000"
    stats = cache_names.CACHE_STATS
    return {
        r"/api/worker/shutdown/(.+)": f"/api/worker/shutdown/{node}",
        r"/api/worker/pool/restart/(.+)": f"/api/worker/pool/restart/{node}",
        r"/api/worker/pool/grow/(.+)": f"/api/worker/pool/grow/{node}?n=2",
        r"/api/worker/pool/shrink/(.+)": f"/api/worker/pool/shrink/{node}?n=1",
        r"/api/worker/pool/autoscale/(.+)": f"/api/worker/pool/autoscale/{node}?min=1&max=3",
        r"/api/worker/queue/add-consumer/(.+)":
            f"/api/worker/queue/add-consumer/{node}?queue=hms.metrics",
        r"/api/worker/queue/cancel-consumer/(.+)":
            f"/api/worker/queue/cancel-consumer/{node}?queue=hms.cache",
        r"/api/task/revoke/(.+)": f"/api/task/revoke/{task_id}?terminate=true",
        r"/api/task/abort/(.+)": f"/api/task/abort/{task_id}",
        r"/api/task/timeout/(.+)": f"/api/task/timeout/{stats}?soft=1&hard=2",
        r"/api/task/rate-limit/(.+)": f"/api/task/rate-limit/{stats}?ratelimit=1/m",
    }


def test_every_state_changing_route_of_flower_is_exercised() -> None:
    """The read-only test below covers every POST route Flower has but the run-task ones."""
    from flower import urls
    from tornado.web import RequestHandler

    posting = set()
    for entry in urls.handlers:
        pattern, cls = (entry[0], entry[1]) if isinstance(entry, tuple) else (
            entry.regex.pattern, entry.handler_class)
        if any(getattr(cls, m) is not getattr(RequestHandler, m)
               for m in ("post", "put", "patch", "delete")):
            posting.add(pattern)
    # Outside /api/ (which the guard leaves alone) only reads answer POST: the tasks table
    # (a search) and the catch-all 404.
    assert {p for p in posting if not p.startswith("/api/")} == {"/tasks/datatable$", ".*"}
    api = {p for p in posting if p.startswith("/api/")}
    run_task = {p for p in api if p.startswith(RUN_TASK_ENDPOINTS)}
    assert len(run_task) == 3
    assert api - run_task == set(control_requests("w@h"))


@pytest.mark.parametrize(("address", "loopback"), [
    ("0.0.0.0", False), ("::", False), ("10.0.0.1", False), ("", False),
    ("localhost", True), ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
    ("[::1]", True),
])
def test_start_problems_by_address(address: str, loopback: bool) -> None:
    options = SimpleNamespace(address=address, basic_auth=[], auth="", unix_socket="")
    problems = start_problems(options)
    if loopback:
        assert problems == []
    else:
        assert len(problems) == 1
        assert "FLOWER_BASIC_AUTH" in problems[0]
        # With basic auth or OAuth, or on a Unix socket, the same address is accepted.
        for fix in ({"basic_auth": ["admin:pw"]}, {"auth": r".*@hospital\.example"},
                    {"unix_socket": "/run/flower.sock"}):
            assert start_problems(SimpleNamespace(**{**vars(options), **fix})) == []


def test_a_malformed_basic_auth_entry_is_refused_without_echoing_it() -> None:
    options = SimpleNamespace(address="127.0.0.1", basic_auth=["admin:pw", "secretvalue"],
                              auth="", unix_socket="")
    problems = start_problems(options)
    assert problems == ["FLOWER_BASIC_AUTH entry 2 must be user:password (both non-empty)"]


@pytest.mark.parametrize(("address", "extra"), [
    ("0.0.0.0", {}),
    (None, {}),  # Flower's default address: every interface
    ("0.0.0.0", {"FLOWER_UNAUTHENTICATED_API": "true"}),
    ("0.0.0.0", {"FLOWER_BASIC_AUTH": "no-colon-secret"}),
])
def test_flower_off_loopback_without_auth_exits_before_binding(
    redis_server: RedisServer, tmp_path: Path, address: str | None, extra: dict[str, str]
) -> None:
    port = free_port()
    proc = subprocess.Popen(flower_argv(port, address), cwd=REPO,
                            env=flower_env(tmp_path, redis_server, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    checks = 0
    bound = False
    try:
        def exited() -> bool:
            nonlocal checks, bound
            checks += 1
            if listening(proc.pid, port):
                bound = True
                proc.kill()  # never leave it serving off loopback
                return True
            return proc.poll() is not None

        wait_for(exited, timeout=90, interval=0.01, what="Flower to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0].decode(errors="replace")
    assert not bound, f"Flower listened on port {port} before exiting:\n{out}"
    assert proc.returncode == 2, out
    assert "FLOWER_BASIC_AUTH" in out
    assert "Visit me" not in out
    assert "no-colon-secret" not in out
    print(f"\nflower refused ({address or 'every interface'}, {sorted(extra) or 'no auth'}):"
          f" exit 2, port never bound over {checks} checks")


def test_flower_with_basic_auth_starts_and_guards_metrics(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    env = flower_env(tmp_path, redis_server, FLOWER_BASIC_AUTH=f"admin:{PASSWORD}")
    auth = {"Authorization": BASIC}
    wrong = {"Authorization": "Basic " + base64.b64encode(b"admin:nope").decode()}
    with running_flower(env, tmp_path, "flower-auth") as base:
        results = {
            "/ anonymous": http("GET", f"{base}/")[0],
            "/ wrong password": http("GET", f"{base}/", headers=wrong)[0],
            "/metrics anonymous": http("GET", f"{base}/metrics")[0],
            "/metrics wrong password": http("GET", f"{base}/metrics", headers=wrong)[0],
            "/api/workers anonymous": http("GET", f"{base}/api/workers")[0],
            "/broker anonymous": http("GET", f"{base}/broker")[0],
        }
        assert all(code == 401 for code in results.values()), results
        assert http("GET", f"{base}/", headers=auth)[0] == 200
        # The guard's routes leave Flower's static files and its 404 alone.
        assert http("GET", f"{base}/static/css/flower.css", headers=auth)[0] == 200
        assert http("GET", f"{base}/favicon.ico", headers=auth)[0] == 200
        assert http("GET", f"{base}/no-such-page", headers=auth)[0] == 404
        status, body = http("GET", f"{base}/metrics", headers=auth)
        assert status == 200
        assert b"flower_" in body
        # Probes need no password, and learn nothing but OK.
        assert http("GET", f"{base}/healthcheck") == (200, b"OK")
        # Authenticated is not enough to control: read-only is the default.
        status, body = http("POST", f"{base}/api/worker/shutdown/w@h", headers=auth)
        assert status == 403
        assert b"HMS_TASKS_FLOWER_CONTROL" in body
    print(f"\nflower with basic auth: {len(results)}/{len(results)} anonymous requests refused"
          " (/metrics included), /healthcheck open")


def test_read_only_flower_refuses_control_and_still_runs_tasks(
    redis_server: RedisServer, celery_app: Any, tmp_path: Path
) -> None:
    node = "flowerro@localhost"
    # The demo stack's loopback setup: the API answers without a password.
    env = flower_env(tmp_path, redis_server, FLOWER_UNAUTHENTICATED_API="true")
    with running_worker(env, tmp_path, node) as worker, \
            running_flower(env, tmp_path, "flower-ro") as base:
        wait_for(lambda: known_worker(base, node), timeout=60, interval=0.5,
                 what="Flower to see the worker")
        requests = control_requests(node)
        refused = {}
        for path in requests.values():
            status, body = http("POST", base + path)
            refused[path] = status == 403 and b"read-only" in body
        # A page from another site open in a local browser may neither run tasks nor read
        # them (Flower answers with CORS * here); following a link to Flower still works.
        fetch = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}
        cross_site = {
            "async-apply": http("POST", f"{base}/api/task/async-apply/{cache_names.CACHE_STATS}",
                                headers={**fetch, "Content-Type": "application/json"},
                                body=b"{}")[0],
            "api tasks": http("GET", f"{base}/api/tasks", headers=fetch)[0],
            "tasks table": http("GET", f"{base}/tasks/datatable?draw=1&start=0&length=10"
                                "&order[0][column]=0", headers=fetch)[0],
            "form post": http("POST", f"{base}/api/task/send-task/{cache_names.CACHE_STATS}",
                              headers={"Sec-Fetch-Site": "cross-site",
                                       "Sec-Fetch-Mode": "navigate"}, body=b"{}")[0],
            "origin only": http("GET", f"{base}/api/workers",
                                headers={"Origin": "http://evil.example"})[0],
        }
        link = http("GET", f"{base}/", headers={"Sec-Fetch-Site": "cross-site",
                                                "Sec-Fetch-Mode": "navigate"})[0]
        status, body = http("POST", f"{base}/api/task/async-apply/{cache_names.CACHE_STATS}",
                            headers={"Content-Type": "application/json"},
                            body=json.dumps({"kwargs": {"window_minutes": 5}}).encode())
        assert status == 200, body
        run = celery_app.AsyncResult(json.loads(body)["task-id"])
        assert isinstance(run.get(timeout=60), dict)
        assert run.state == "SUCCESS"
        assert worker.poll() is None, "the worker stopped"
        queues = celery_app.control.inspect(destination=[node], timeout=5).active_queues()
        assert sorted(q["name"] for q in queues[node]) == ["flowerro@localhost.dq2", "hms.cache"]
    assert all(refused.values()), {p: ok for p, ok in refused.items() if not ok}
    assert set(cross_site.values()) == {403}, cross_site
    assert link == 200
    print(f"\nread-only flower: {len(requests)} control endpoints checked, "
          f"{sum(refused.values())} refused (403), worker alive with its queue; "
          f"async-apply ran a task; {len(cross_site)}/{len(cross_site)} cross-site requests "
          "refused, a followed link served")


def test_control_endpoints_work_when_enabled(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    node = "flowerctl@localhost"
    (tmp_path / "flower_control_settings.py").write_text(
        "from hms_tasks.demo.settings import *  # noqa: F403\n"
        "HMS_TASKS_FLOWER_CONTROL = True\n")
    env = flower_env(tmp_path, redis_server, FLOWER_UNAUTHENTICATED_API="true")
    flower = {**env, "DJANGO_SETTINGS_MODULE": "flower_control_settings",
              "PYTHONPATH": os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", str(REPO))])}
    with running_worker(env, tmp_path, node) as worker, \
            running_flower(flower, tmp_path, "flower-ctl") as base:
        wait_for(lambda: known_worker(base, node), timeout=60, interval=0.5,
                 what="Flower to see the worker")
        status, body = http("POST", f"{base}/api/worker/shutdown/{node}")
        assert status == 200, body
        wait_for(lambda: worker.poll() is not None, timeout=60, what="the worker to stop")
    print("\nflower with HMS_TASKS_FLOWER_CONTROL = True: shutdown 200, the worker exited")
