"""A locustfile's native-code sockets reach nothing, the target included: the runner's namespace.

A user's locustfile (in the scenarios directory, as an operator would put it) opens sockets with
``_socket``, beneath the runner's Python-level connect guard, every few milliseconds for the
whole run: to a forbidden listener on 127.0.0.1 (bound to every address), to the same listener
through this machine's own non-loopback address (when it has one), to the target itself, and to
the tests' Redis, sending it ``SET`` of a canary key. Its other tasks (a FastHttpUser and an
HttpUser) send requests to the allowed target, a loopback HTTP server that counts what it
served.

The shard runs for real (:func:`hms_tasks.loadtest.shard.run_shard` in this process: its
runner subprocess with real Locust, its connector thread), with
``HMS_TASKS_LOADTEST_CONTAINMENT`` "required": the forbidden listener accepts 0 connections,
the canary never appears in Redis, every native connect fails (the one to the target too: the
runner's own connections to the target are made by the shard and handed over), and the target
serves the allowed requests of both user classes. The control run, containment "off", must
reach the listener and Redis with the same locustfile (the vector is live: the Python-level
guard alone does not stop it).

Figure: connections the forbidden listener accepted and canary writes, contained vs off; native
connects attempted; requests the target served.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

from hms_tasks import store
from hms_tasks.loadtest import containment, keys, shard, stats
from tests.helpers import CountingListener, RedisServer

pytestmark = pytest.mark.faults

CANARY = "loadtest-containment-canary"


class _Target(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    served = 0

    def do_GET(self) -> None:
        _Target.served += 1
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


def _own_address() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the route
        except OSError:
            return None
        address = str(s.getsockname()[0])
    return None if address.startswith("127.") else address


LOCUSTFILE = """
import _socket
import time

from locust import FastHttpUser, HttpUser, constant, task

VECTORS = {vectors!r}


class Plain(HttpUser):
    # urllib3's sockets: they too get theirs from the shard when contained.
    wait_time = constant(0.02)

    @task
    def allowed(self):
        self.client.get("/ok", name="/ok (HttpUser)")


class Native(FastHttpUser):
    wait_time = constant(0.02)

    @task
    def allowed(self):
        self.client.get("/ok")

    @task
    def native(self):
        for name, host, port, payload in VECTORS:
            started = time.perf_counter()
            sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
            sock.settimeout(1.0)
            error = None
            try:
                sock.connect((host, port))
                if payload:
                    sock.sendall(payload)
                    sock.recv(64)
            except OSError as exc:
                error = exc
            finally:
                sock.close()
            self.environment.events.request.fire(
                request_type="NATIVE", name=name, response_length=0, exception=error,
                response_time=(time.perf_counter() - started) * 1000)
"""


@pytest.fixture
def setup(redis_server: RedisServer, celery_app: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    target = ThreadingHTTPServer(("127.0.0.1", 0), _Target)
    target.daemon_threads = True
    threading.Thread(target=target.serve_forever, daemon=True).start()
    forbidden = CountingListener("0.0.0.0")  # every address: reachable twice
    vectors: list[tuple[str, str, int, bytes]] = [
        ("loopback listener", "127.0.0.1", forbidden.port, b""),
        # Even the target: native code gets nothing out of the namespace (the runner's own
        # connections to the target come from the shard, through Python's socket class).
        ("target", "127.0.0.1", target.server_port, b""),
        ("redis", "127.0.0.1", redis_server.port,
         f"SET {CANARY} reached\r\n".encode()),
    ]
    own = _own_address()
    if own is not None:
        vectors.append(("own address listener", own, forbidden.port, b""))
    scenarios = tmp_path / "scenarios"
    scenarios.mkdir()
    (scenarios / "native.py").write_text(textwrap.dedent(LOCUSTFILE.format(vectors=vectors)))
    settings = {
        "HMS_TASKS_LOADTEST_TARGETS": {"allowed": f"http://127.0.0.1:{target.server_port}"},
        "HMS_TASKS_LOADTEST_SCENARIOS_DIR": str(scenarios),
        "HMS_TASKS_LOADTEST_REPORTS_DIR": str(tmp_path / "reports"),
        "HMS_TASKS_LOADTEST_GRACE": 5,
    }
    store.client().delete(CANARY)
    try:
        yield {"settings": settings, "forbidden": forbidden, "vectors": vectors}
    finally:
        target.shutdown()
        forbidden.sock.close()
        store.client().delete(CANARY)


def _run(setup: dict[str, Any], mode: str, *, duration: int = 3) -> dict[str, Any]:
    """One real shard of a one-shard run with ``mode``; the counts it caused."""
    run_id = f"containment-{mode}-{os.getpid()}-{time.monotonic_ns()}"
    now = time.time()
    start_at = now + 1.5  # the runner's start-up (Python, Locust) comes first
    definition = {"name": "containment", "target": "allowed",
                  "scenario": {"locustfile": "native.py"}, "users": 2, "spawn_rate": 2,
                  "duration": duration, "shards": 1}
    keys.create_run(run_id, {
        "id": run_id, "test": "containment", "target": "allowed", "status": "running",
        "spec": json.dumps(definition), "created_at": now, "start_at": start_at,
        "end_at": start_at + duration, "deadline": start_at + duration + 5, "shards": 1,
        "users": 2, "node": "test", "done": 0, "abort": "0"}, created_at=now)
    forbidden = setup["forbidden"]
    hits, served = forbidden.accepted, _Target.served
    store.client().delete(CANARY)
    with override_settings(**setup["settings"], HMS_TASKS_LOADTEST_CONTAINMENT=mode):
        summary = shard.run_shard(run_id, 0)
    meta = keys.shard(run_id, 0)
    data = stats.RunData.from_json(json.loads(meta["result"]))
    native = {k: v for k, v in data.endpoints.items() if k.startswith("NATIVE ")}
    return {"summary": summary, "contained": meta.get("contained"),
            "forbidden_connections": forbidden.accepted - hits,
            "canary": store.client().get(CANARY) is not None,
            "served": _Target.served - served,
            "allowed": sum(data.endpoints[k].requests for k in ("GET /ok", "GET /ok (HttpUser)")
                           if k in data.endpoints),
            "http_user": (data.endpoints["GET /ok (HttpUser)"].requests
                          if "GET /ok (HttpUser)" in data.endpoints else 0),
            "native_attempts": sum(e.requests for e in native.values()),
            "native_failures": sum(e.failures for e in native.values()),
            "native": {k: (e.requests, e.failures) for k, e in native.items()},
            "blocked": data.blocked}


def test_native_sockets_in_a_locustfile_reach_only_the_target(setup: dict[str, Any]) -> None:
    prefix, why = containment.namespace_command()
    if prefix is None:
        pytest.skip(f"this machine cannot create network namespaces: {why}")
    contained = _run(setup, "required")
    control = _run(setup, "off")
    print(f"\nvectors: {[v[0] for v in setup['vectors']]}")
    for name, row in (("contained", contained), ("off (control)", control)):
        print(f"  {name:<14} state {row['summary']['state']}, forbidden listener connections"
              f" {row['forbidden_connections']}, canary in Redis {row['canary']}, native"
              f" connects {row['native_attempts']} ({row['native_failures']} failed), target"
              f" served {row['served']} (shard counted {row['allowed']}), guard blocked"
              f" {row['blocked']}")
    print(f"FIGURE loadtest containment ({' '.join(prefix[1:])}): contained: "
          f"{contained['forbidden_connections']} connections to the forbidden listener,"
          f" canary {'written' if contained['canary'] else 'absent'},"
          f" {contained['native_failures']}/{contained['native_attempts']} native connects"
          f" failed, {contained['served']} allowed requests served; control without"
          f" containment: {control['forbidden_connections']} connections, canary"
          f" {'written' if control['canary'] else 'absent'}")
    assert contained["summary"]["state"] == "finished", contained["summary"]
    assert contained["summary"]["contained"] is True
    assert contained["contained"] == "1"
    assert contained["native_attempts"] > 0
    # Nothing reached: 0 accepted connections, no write to Redis, every native connect failed.
    assert contained["forbidden_connections"] == 0
    assert not contained["canary"]
    assert contained["native_failures"] == contained["native_attempts"], contained["native"]
    # ...while the target was served every request the shard counted, FastHttpUser's and
    # HttpUser's, on sockets the shard connected.
    assert contained["allowed"] > 0
    assert contained["http_user"] > 0
    assert contained["served"] == contained["allowed"]
    # Teeth: the same locustfile without containment gets through the Python-level guard.
    assert control["summary"]["contained"] is False
    assert control["contained"] == "0"
    assert control["forbidden_connections"] > 0
    assert control["canary"]


def test_required_containment_refuses_to_run_without_namespaces(
        setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no unshare, no ip: no namespace on this "host"
    served, hits = _Target.served, setup["forbidden"].accepted
    row = _run(setup, "required", duration=1)
    assert row["summary"]["state"] == "failed"
    assert row["summary"]["contained"] is False
    assert "HMS_TASKS_LOADTEST_CONTAINMENT is 'required'" in row["summary"]["reason"]
    assert "unshare, ip, mount not found on PATH" in row["summary"]["reason"]
    assert (_Target.served, setup["forbidden"].accepted) == (served, hits)  # nothing started
    assert row["native_attempts"] == 0


def test_an_unprivileged_worker_gets_a_user_namespace_where_the_host_allows_it() -> None:
    """As a user that is not root (nobody), the probe falls back to a user namespace."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to act as another user")
    code = ("from hms_tasks.loadtest import containment; import json;"
            " print(json.dumps(containment.namespace_command()))")
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [setpriv, "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable,
         "-c", code], capture_output=True, text=True, timeout=60, check=False, cwd="/",
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(repo)})
    if proc.returncode != 0:
        pytest.skip(f"cannot run Python as nobody here: {proc.stderr[-300:]}")
    prefix, why = json.loads(proc.stdout)
    print(f"\nnot root: {prefix or why}")
    if prefix is None:
        assert "cannot create a network namespace" in why
    else:
        assert prefix[1:] == ["--user", "--map-root-user", "--net", "--mount"]
