"""Distributed load tests end to end: the demo API under a real gunicorn on 127.0.0.1, a real
prefork Celery worker subprocess consuming ``hms.loadtest`` (two processes: two shards), Locust
in subprocesses. Runs are a few seconds long.

The worker loads a settings module written for this module (targets pointing at the servers
started here, raw samples kept), the test process the same values through override_settings.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest
from click.testing import CliRunner
from django.test import override_settings

from hms_tasks import capabilities, store
from hms_tasks.errors import InvalidArguments, LoadTestRefused
from hms_tasks.loadtest import containment, keys, names, stats
from tests.helpers import RedisServer, free_port, stop, wait_for
from tests.test_loadtest_unit import parse_html

REPO = Path(__file__).resolve().parent.parent
NODE = "loadtest@localhost"


class _Counting(ThreadingHTTPServer):
    """A loopback HTTP server that counts the TCP connections it accepted."""

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.connections = 0

    def get_request(self) -> tuple[socket.socket, Any]:
        conn = super().get_request()
        self.connections += 1
        return conn


def _server(handler: type[BaseHTTPRequestHandler]) -> _Counting:
    srv = _Counting(handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


class _Decoy(_Quiet):
    def do_GET(self) -> None:
        self._answer(200)


@dataclass
class Stack:
    api_port: int
    access_log: Path
    decoy: _Counting
    redirector: _Counting
    home: Path
    reports: Path
    settings: dict[str, Any]
    worker: subprocess.Popen[bytes]

    def api_lines(self, since: int) -> list[str]:
        with self.access_log.open() as f:
            f.seek(since)
            return [line for line in f if '"GET /api/' in line]

    def log_size(self) -> int:
        return self.access_log.stat().st_size


def _env(home: Path, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)  # a SQLite file under the stack's home, also on PostgreSQL runs
    env.update(REDIS_URL=redis_url, HMS_TASKS_HOME=str(home), PYTHONUNBUFFERED="1",
               DJANGO_SETTINGS_MODULE="hms_tasks.demo.settings")
    return env


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, celery_app: Any,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("loadtest")
    home, reports, scenarios = tmp / "home", tmp / "reports", tmp / "scenarios"
    for d in (home, reports, scenarios):
        d.mkdir()
    env = _env(home, redis_server.url)
    subprocess.run([sys.executable, "-m", "hms_tasks", "seed", "--patients", "200"], env=env,
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    api_port = free_port()
    access_log = tmp / "access.log"
    api = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "hms_tasks.demo.wsgi:application", "-b",
         f"127.0.0.1:{api_port}", "-w", "2", "--access-logfile", str(access_log),
         "--access-logformat", '%(h)s "%(m)s %(U)s" %(s)s', "--log-level", "warning"],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    decoy = _server(_Decoy)
    decoy_url = f"http://127.0.0.1:{decoy.server_address[1]}"

    class Redirector(_Quiet):
        def do_GET(self) -> None:
            if self.path.startswith("/ok"):
                self._answer(200)
            else:  # every other path redirects off the target
                self._answer(302, {"Location": f"{decoy_url}/stolen"})

    redirector = _server(Redirector)
    (scenarios / "sneaky.py").write_text(textwrap.dedent(f"""
        import socket
        from locust import FastHttpUser, constant, task

        class Sneaky(FastHttpUser):
            wait_time = constant(0.05)

            @task
            def fine(self):
                self.client.get("/ok")

            @task
            def follow_redirect(self):
                self.client.get("/elsewhere", name="redirect")  # followed by default

            @task
            def absolute_url(self):
                self.client.get("{decoy_url}/absolute", name="absolute")

            @task
            def raw_socket(self):
                try:
                    socket.create_connection(("127.0.0.1", {decoy.server_address[1]}), 1).close()
                except OSError as exc:
                    self.environment.events.request.fire(
                        request_type="RAW", name="socket", response_time=0,
                        response_length=0, exception=exc)
    """))
    settings: dict[str, Any] = {
        "HMS_TASKS_LOADTEST_TARGETS": {
            "demo": f"http://127.0.0.1:{api_port}",
            "redirector": f"http://127.0.0.1:{redirector.server_address[1]}"},
        "HMS_TASKS_LOADTEST_TESTS": {},
        "HMS_TASKS_LOADTEST_NIGHTLY": None,
        "HMS_TASKS_LOADTEST_SCENARIOS_DIR": str(scenarios),
        "HMS_TASKS_LOADTEST_REPORTS_DIR": str(reports),
        "HMS_TASKS_LOADTEST_START_DELAY": 2.0,
        "HMS_TASKS_LOADTEST_GRACE": 5,
        "HMS_TASKS_LOADTEST_MAX_DURATION": 60,
        "HMS_TASKS_LOADTEST_KEEP_RAW": True,
    }
    (tmp / "loadtest_e2e_settings.py").write_text(
        "from hms_tasks.demo.settings import *  # noqa: F403\n"
        + "".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    wenv = {**env, "DJANGO_SETTINGS_MODULE": "loadtest_e2e_settings",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp), env.get("PYTHONPATH")]))}
    worker_log = (tmp / "worker.log").open("ab")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "hms_tasks", "worker", "--pool", "prefork",
         "--concurrency", "2", "-Q", capabilities.queue("loadtest"), "-n", NODE, "-E",
         "--without-mingle", "--without-gossip", "--loglevel", "INFO"],
        cwd=REPO, env=wenv, stdout=worker_log, stderr=worker_log)
    override = override_settings(**settings)
    override.enable()
    try:
        def api_up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", api_port), timeout=0.5):
                    return True
            except OSError:
                assert api.poll() is None, "gunicorn exited"
                return False

        wait_for(api_up, timeout=60, what="the demo API")
        wait_for(lambda: worker.poll() is None and celery_app.control.ping(
            destination=[NODE], timeout=0.5), timeout=90, what="the loadtest worker")
        yield Stack(api_port=api_port, access_log=access_log, decoy=decoy,
                    redirector=redirector, home=home, reports=reports, settings=settings,
                    worker=worker)
    finally:
        override.disable()
        for proc in (worker, api):
            stop(proc)
        worker_log.close()
        decoy.shutdown()
        redirector.shutdown()


def _idle(celery_app: Any) -> None:
    """Until the loadtest worker answers that it runs nothing: the previous test's merge may
    still be finishing after its report is written, and a run refuses shards it has no free
    process for."""

    def idle() -> bool:
        active = celery_app.control.inspect(destination=[NODE], timeout=1).active()
        return active is not None and NODE in active and not active[NODE]

    wait_for(idle, timeout=30, what="the worker to be idle")


def _start(celery_app: Any, definition: dict[str, Any]) -> str:
    _idle(celery_app)
    result = celery_app.send_task(names.RUN, kwargs={"test": definition})
    summary = result.get(timeout=60)
    assert summary["run_id"] == result.id
    return str(result.id)


def _report(run_id: str, timeout: float = 90) -> dict[str, Any]:
    return wait_for(lambda: keys.report(run_id), timeout=timeout, what="the run's report")


def _runner_pids(run_id: str, count: int) -> list[int]:
    def running() -> list[int] | None:
        shards = keys.shards(run_id, count)
        ok = all(s.get("state") == "running" and s.get("progress")
                 and json.loads(s["progress"])["requests"] > 0 for s in shards)
        return [int(s["runner_pid"]) for s in shards] if ok else None

    return wait_for(running, timeout=30, what="every shard to be generating load")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # gone between two looks, too
        return False


def _raw_samples(stack: Stack, run_id: str) -> list[tuple[str, float]]:
    out = []
    for path in sorted((stack.reports / run_id).glob("shard-*.raw")):
        for line in path.read_text().splitlines():
            key, ms = line.rsplit("\t", 1)
            out.append((key, float(ms)))
    return out


def _locust_reference(samples: list[tuple[str, float]]) -> dict[str, Any]:
    """Counts and percentiles Locust itself computes from the raw samples (in a subprocess:
    importing Locust monkey-patches the process)."""
    code = textwrap.dedent(f"""
        import json, sys
        from locust.stats import bucket_response_time, calculate_response_time_percentile
        samples = json.load(sys.stdin)
        groups = {{"Aggregated": [ms for _, ms in samples]}}
        for key, ms in samples:
            groups.setdefault(key, []).append(ms)
        out = {{}}
        for key, values in groups.items():
            hist = {{}}
            for ms in values:
                b = bucket_response_time(ms)
                hist[b] = hist.get(b, 0) + 1
            out[key] = {{"n": len(values), "min": min(values), "max": max(values),
                        "p": [calculate_response_time_percentile(hist, len(values), p)
                              for p in {list(stats.PERCENTILES)!r}]}}
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(samples),
                          capture_output=True, text=True, check=True, timeout=120)
    return dict(json.loads(proc.stdout))


def test_two_shards_merge_exactly_what_the_server_saw(stack: Stack, celery_app: Any) -> None:
    before = stack.log_size()
    run_id = _start(celery_app, {
        "name": "e2e-exact", "target": "demo", "scenario": "demo", "users": 6,
        "spawn_rate": 6, "duration": 3, "shards": 2,
        "thresholds": {"p95_ms": 60000, "error_rate": 0.5, "min_rps": 0.1,
                       "endpoints": {"GET /api/patients/[id]/": {"p99_ms": 60000}}}})
    doc = _report(run_id)
    assert doc["verdict"]["status"] == "passed", doc["verdict"]
    assert all(c["passed"] for c in doc["verdict"]["thresholds"])
    assert [s["state"] for s in doc["shards"]] == ["finished", "finished"]
    assert [s["check"] for s in doc["shards"]] == ["ok", "ok"]  # ticks add up to Locust's own
    assert doc["environment"]["nodes"] == [NODE]
    assert doc["environment"]["versions"]["locust"]
    total = doc["total"]
    # Every request the shards counted reached the server, and nothing else did.
    assert total["requests"] > 10
    assert total["requests"] == len(stack.api_lines(before))
    assert total["failures"] == 0
    # Exact merge: counts, extremes and percentiles equal what Locust computes from the same
    # raw samples, for every endpoint and in total.
    samples = _raw_samples(stack, run_id)
    assert len(samples) == total["requests"]
    reference = _locust_reference(samples)
    rows = {r["name"]: r for r in [*doc["endpoints"], total]}
    assert set(rows) == set(reference)
    for key, ref in reference.items():
        row = rows[key]
        assert row["requests"] == ref["n"], key
        assert [row[stats.percentile_key(p)] for p in stats.PERCENTILES] == ref["p"], key
        assert row["min_ms"] == pytest.approx(ref["min"], abs=1e-3)
        assert row["max_ms"] == pytest.approx(ref["max"], abs=1e-3)
    assert set(rows) >= {"GET /api/patients/", "GET /api/departments/census/"}
    # The per-second timeline adds up to the totals, and carries both shards' users.
    assert sum(p["rps"] for p in doc["timeline"]) == total["requests"]
    assert max(p["users"] for p in doc["timeline"]) == 6
    # The run's record and the CLI agree.
    assert keys.run(run_id)["status"] == "passed"
    from hms_tasks.cli import cli

    out = CliRunner().invoke(cli, ["loadtest", "report", run_id, "--json"])
    assert out.exit_code == 0
    assert json.loads(out.output) == doc
    status = CliRunner().invoke(cli, ["loadtest", "status", run_id])
    assert status.exit_code == 0
    assert "100%" in status.output
    assert f"requests {total['requests']}" in status.output
    # The HTML page the merge wrote renders, with the charts' data in it.
    page = (stack.reports / f"{run_id}.html").read_text()
    parsed = parse_html(page)
    assert parsed.external == []
    assert json.loads(parsed.data)["timeline"] == doc["timeline"]
    timed = sum(1 for p in doc["timeline"] if p["p95_ms"] is not None)
    assert parsed.polylines["chart-latency"] == {"p50_ms": timed, "p95_ms": timed,
                                                 "p99_ms": timed}
    assert parsed.polylines["chart-rps"] == {"rps": len(doc["timeline"]),
                                             "users": len(doc["timeline"])}
    html_out = stack.reports / "copy.html"
    out = CliRunner().invoke(cli, ["loadtest", "report", run_id, "--html", str(html_out)])
    assert out.exit_code == 0
    assert json.loads(parse_html(html_out.read_text()).data) == doc
    # Locust ran in subprocesses only.
    assert not {"locust", "gevent"} & set(sys.modules)


def test_failing_thresholds_and_a_regression_raise_the_alert(stack: Stack,
                                                             celery_app: Any) -> None:
    from hms_tasks.cli import cli
    from hms_tasks.metrics import alerts
    from hms_tasks.metrics import store as ts

    endpoints = ["GET /api/departments/census/ 1", "GET /api/patients/?limit=5 2"]
    definition = {"name": "e2e-regress", "target": "demo", "users": 2, "duration": 2,
                  "shards": 1, "scenario": {"endpoints": [
                      {"method": "GET", "path": "/api/departments/census/", "weight": 1},
                      {"method": "GET", "path": "/api/patients/?limit=5", "weight": 2}]}}
    # A previous run of the same test that was far faster.
    previous = {
        "v": 1, "run_id": "previous-run", "test": "e2e-regress", "definition": {
            **definition, "scenario": {"endpoints": [
                {"method": "GET", "path": "/api/departments/census/", "name":
                 "/api/departments/census/", "weight": 1},
                {"method": "GET", "path": "/api/patients/?limit=5", "name": "/api/patients/",
                 "weight": 2}], "wait": [0.5, 1.5], "user_class": "fast"}},
        "total": {"requests": 1000, "rps": 100000.0, "p95_ms": 1},
        "verdict": {"status": "passed", "reasons": [], "thresholds": []}}
    keys.create_run("previous-run", {"test": "e2e-regress", "status": "passed"},
                    created_at=time.time() - 86400)
    keys.record_report("previous-run", "e2e-regress", previous, status="passed")
    _idle(celery_app)
    result = CliRunner().invoke(cli, [
        "loadtest", "run", "--name", "e2e-regress", "--target", "demo", "--users", "2",
        "--duration", "2", "--shards", "1", *[a for e in endpoints for a in ("--endpoint", e)],
        "--threshold", "p95_ms=60000", "--threshold", "min_rps=1000000",
        "--threshold", "GET /api/patients/:error_rate=0", "--wait"])
    assert result.exit_code == 1, result.output
    assert "FAIL  total min_rps" in result.output
    assert "pass  total p95_ms" in result.output
    assert "pass  GET /api/patients/ error_rate" in result.output
    assert "REGRESSION" in result.output
    run_id = result.output.split("run ", 1)[1].split()[0]
    doc = keys.report(run_id)
    assert doc is not None
    assert doc["verdict"]["status"] == "failed"
    outcome = {(c["scope"], c["metric"]): c["passed"] for c in doc["verdict"]["thresholds"]}
    assert outcome == {("total", "p95_ms"): True, ("total", "min_rps"): False,
                       ("GET /api/patients/", "error_rate"): True}
    reg = doc["regression"]
    assert reg["previous_run"] == "previous-run"
    assert reg["regressed"]
    assert reg["metrics"]["rps"]["regressed"]
    # The telemetry's alerting: the series the merge wrote makes the rule fire.
    latest = ts.latest()
    assert latest["loadtest.regression{test=e2e-regress}"].value == 1.0
    assert latest["loadtest.rps{test=e2e-regress}"].value == doc["total"]["rps"]
    _, notify = alerts.evaluate_and_store()
    fired = [t for t in notify if t["rule"] == "loadtest_regression"]
    assert [(t["new"], t["labels"]) for t in fired] == [("firing", {"test": "e2e-regress"})]


def test_abort_stops_every_shard_and_keeps_partial_results(stack: Stack,
                                                           celery_app: Any) -> None:
    from hms_tasks.cli import cli

    run_id = _start(celery_app, {
        "name": "e2e-abort", "target": "demo", "users": 4, "duration": 45, "shards": 2,
        "scenario": {"endpoints": [{"path": "/api/departments/census/"}], "wait": [0.05, 0.1]}})
    pids = _runner_pids(run_id, 2)
    # While it runs: progress in the CLI and as the shard tasks' state (what Flower shows).
    status = CliRunner().invoke(cli, ["loadtest", "status", run_id])
    assert status.exit_code == 0
    assert "running" in status.output
    assert "users 4" in status.output or "users 3" in status.output  # spawning
    for i in range(2):
        state = wait_for(lambda i=i: (r := celery_app.AsyncResult(f"{run_id}-shard-{i}"))
                         .state == "PROGRESS" and r.info, timeout=10, what="PROGRESS state")
        assert state
        info = celery_app.AsyncResult(f"{run_id}-shard-{i}").info
        assert {"elapsed_s", "users", "rps", "requests", "failures"} <= set(info)
        assert info["run_id"] == run_id
    result = CliRunner().invoke(cli, ["loadtest", "abort", run_id])
    assert result.exit_code == 0
    assert "abort requested" in result.output
    # Every shard's load generator is gone within 5 s.
    wait_for(lambda: not any(_alive(p) for p in pids), timeout=5, what="every runner to stop")
    doc = _report(run_id, timeout=30)
    assert doc["verdict"]["status"] == "aborted"
    assert [s["state"] for s in doc["shards"]] == ["aborted", "aborted"]
    assert all(s["requests"] > 0 for s in doc["shards"])  # partial results kept
    assert doc["total"]["requests"] == sum(s["requests"] for s in doc["shards"])
    assert doc["window_s"] < 45
    again = CliRunner().invoke(cli, ["loadtest", "abort", run_id])
    assert "already over" in again.output


def test_an_abort_before_the_start_ends_the_run_at_once(stack: Stack,
                                                       celery_app: Any) -> None:
    from hms_tasks.loadtest import orchestrate

    run_id = _start(celery_app, {
        "name": "e2e-abort-early", "target": "demo", "users": 2, "duration": 50, "shards": 2,
        "scenario": {"endpoints": [{"path": "/api/departments/census/"}]}})
    assert orchestrate.abort_run(run_id) == "asked"
    doc = _report(run_id, timeout=20)  # long before its 50 s
    assert doc["verdict"]["status"] == "aborted"
    assert [s["state"] for s in doc["shards"]] == ["aborted", "aborted"]
    assert orchestrate.abort_run(run_id) == "over"


def test_a_redelivered_run_message_starts_nothing_twice(stack: Stack, celery_app: Any) -> None:
    from hms_tasks import reports
    from hms_tasks.loadtest import orchestrate, shard, spec

    test = spec.parse({"name": "e2e-twice", "target": "demo", "users": 2, "duration": 2,
                       "shards": 2, "scenario": {"endpoints": [{"path": "/healthz"}]}})
    _idle(celery_app)
    first = orchestrate.start_run(test, run_id="e2e-twice-1")
    again = orchestrate.start_run(test, run_id="e2e-twice-1")  # as a redelivery would
    assert first["shard_ids"] == ["e2e-twice-1-shard-0", "e2e-twice-1-shard-1"]
    assert again["redelivered"] is True
    doc = _report("e2e-twice-1")
    assert [s["state"] for s in doc["shards"]] == ["finished", "finished"]
    # The republished shard messages either expired (they came after the run's end) or found
    # their slot taken: no shard ran twice.
    client = store.client()
    wait_for(lambda: client.llen(capabilities.queue("loadtest")) == 0,
             timeout=30, what="the loadtest queue to drain")
    _idle(celery_app)
    runs = [r["summary"] for r in reports.history(names.SHARD, last=20)
            if r["summary"] and r["summary"]["run_id"] == "e2e-twice-1"]
    assert sorted(r["state"] for r in runs if r["state"] != "duplicate") == [
        "finished", "finished"]
    # A late duplicate delivery is refused by the claim, before anything starts.
    assert shard.run_shard("e2e-twice-1", 0) == {"run_id": "e2e-twice-1", "shard": 0,
                                                 "state": "duplicate"}


def test_a_dead_shard_fails_the_run_and_the_others_data_is_kept(stack: Stack,
                                                                celery_app: Any) -> None:
    run_id = _start(celery_app, {
        "name": "e2e-dead", "target": "demo", "users": 4, "duration": 5, "shards": 2,
        "scenario": {"endpoints": [{"path": "/api/departments/census/"}], "wait": [0.05, 0.1]},
        "thresholds": {"p95_ms": 60000}})
    pids = _runner_pids(run_id, 2)
    os.kill(pids[1], signal.SIGKILL)
    doc = _report(run_id, timeout=60)
    assert doc["verdict"]["status"] == "failed"
    dead, alive = doc["shards"][1], doc["shards"][0]
    assert alive["state"] == "finished"
    assert alive["requests"] > 0
    assert dead["state"] == "failed"
    assert "killed by SIGKILL" in dead["reason"]
    assert dead["requests"] > 0  # the seconds it reported before dying
    reason = doc["verdict"]["reasons"][0]
    assert reason.startswith("shard 1 failed: the load generator")
    assert "killed by SIGKILL" in reason
    assert doc["total"]["requests"] == alive["requests"] + dead["requests"]
    assert keys.run(run_id)["status"] == "failed"


def test_a_run_stays_bounded_when_a_shards_worker_process_dies(stack: Stack,
                                                               celery_app: Any) -> None:
    """The pool process supervising a shard is SIGKILLed: its runner notices and stops, the
    redelivered message does not run the shard again, and the final merge after the deadline
    reports the shard lost with the seconds it had checkpointed."""
    run_id = _start(celery_app, {
        "name": "e2e-lost", "target": "demo", "users": 2, "duration": 3, "shards": 2,
        "scenario": {"endpoints": [{"path": "/api/departments/census/"}], "wait": [0.05, 0.1]}})
    pids = _runner_pids(run_id, 2)
    supervisor = psutil.Process(pids[1]).ppid()
    assert supervisor != stack.worker.pid  # a pool child, not the worker itself
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: not _alive(pids[1]), timeout=5, what="the orphaned runner to stop")
    doc = _report(run_id, timeout=60)
    assert doc["verdict"]["status"] == "failed"
    lost = doc["shards"][1]
    assert lost["state"] == "lost"
    assert "no result by the deadline" in lost["reason"]
    assert lost["requests"] > 0  # its checkpointed seconds
    assert doc["shards"][0]["state"] == "finished"
    assert doc["total"]["requests"] == doc["shards"][0]["requests"] + lost["requests"]


def test_a_shard_never_connects_anywhere_but_its_target(stack: Stack, celery_app: Any) -> None:
    before = stack.decoy.connections
    target_before = stack.redirector.connections
    run_id = _start(celery_app, {
        "name": "e2e-egress", "target": "redirector", "users": 2, "duration": 2, "shards": 2,
        "scenario": {"locustfile": "sneaky.py"}})
    doc = _report(run_id)
    rows = {r["name"]: r for r in doc["endpoints"]}
    assert rows["GET /ok"]["requests"] > 0
    assert rows["GET /ok"]["failures"] == 0
    for key in ("GET redirect", "GET absolute", "RAW socket"):
        assert rows[key]["requests"] > 0, key
        assert rows[key]["failures"] == rows[key]["requests"], key
    assert doc["blocked_connections"] >= sum(
        rows[k]["requests"] for k in ("GET absolute", "RAW socket"))
    assert any("only the target may be contacted" in e["error"] for e in doc["errors"])
    # The decoy never saw a connection; the target did.
    assert stack.decoy.connections == before
    assert stack.redirector.connections > target_before
    # Where this machine allows namespaces (root here), each runner had its own.
    contained = containment.namespace_command()[0] is not None
    assert [s["contained"] for s in doc["shards"]] == [contained, contained]


def test_refused_runs_start_nothing(stack: Stack, celery_app: Any) -> None:
    from hms_tasks.cli import cli

    _idle(celery_app)  # the capacity message names the busy processes
    client = store.client()
    bad = [
        {"name": "x", "target": "http://127.0.0.1:1", "users": 1, "duration": 1},
        {"name": "x", "target": "prod", "users": 1, "duration": 1},
        {"name": "x", "target": "demo", "users": 1, "duration": 1,
         "scenario": {"locustfile": "../../etc/passwd"}},
        {"name": "x", "target": "demo", "users": -1, "duration": 0},
        {"name": "x", "target": "demo", "users": 1, "duration": 1,
         "thresholds": {"p95_ms": "low"}},
    ]
    for definition in bad:
        result = celery_app.send_task(names.RUN, kwargs={"test": definition})
        with pytest.raises(InvalidArguments):
            result.get(timeout=60)
    # More shards than the worker has processes: refused with how many there are.
    too_many = {"name": "x", "target": "demo", "users": 3, "duration": 1, "shards": 3}
    result = celery_app.send_task(names.RUN, kwargs={"test": too_many})
    with pytest.raises(LoadTestRefused) as info:
        result.get(timeout=60)
    assert "3 requested, but 2 free worker processes on 1 node consuming" in str(info.value)
    out = CliRunner().invoke(cli, ["loadtest", "run", "--target", "demo", "--users", "3",
                                   "--duration", "1", "--shards", "3"])
    assert out.exit_code == 2
    assert "3 requested, but 2 free worker processes" in out.output
    assert f"{NODE} (2 processes, 0 busy)" in out.output
    # Nothing was started: no run recorded, no shard published.
    assert keys.recent_runs() == []
    assert not list(client.scan_iter(match=keys.run_key("*")))
    assert client.llen(capabilities.queue("loadtest")) == 0
    counts = Counter(r["outcome"] for r in _run_reports())
    assert counts["rejected"] == len(bad)
    assert counts["failure"] == 1


def _run_reports() -> list[dict[str, Any]]:
    from hms_tasks import reports

    return [dict(r) for r in reports.history(names.RUN, last=100)]
