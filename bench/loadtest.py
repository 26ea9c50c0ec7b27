"""Load-test benchmarks: the generator's capacity under hms-tasks against plain Locust, scaling
from one shard to two, and the cost of merging a big run.

- **Capacity**: one shard (a real ``hms.loadtest.run`` through a prefork worker subprocess, the
  runner subprocess, Redis checkpoints) against ``locust --headless`` with the same locustfile
  and users, alternated in the same run, both against a fast loopback endpoint (an asyncio
  server in its own process answering a fixed 2-byte body). Requests per second as each side
  reports them (requests / load window). Target: ratio >= 0.95.
- **Containment**: the same shard with its runner in a network namespace, its connections to
  the target made by the shard and handed over (``HMS_TASKS_LOADTEST_CONTAINMENT``
  "required"), against the Python-level guard alone ("off"): a worker of each kind in turn,
  alternated in each round. The capacity row uses the contained shard. The shard's process
  (the connector's thread, the checkpoints) counts as generator CPU on both sides.
- **Scaling**: the same users as 1 shard and as 2 shards against the same endpoint, with the
  CPU each process used, to say which side saturates (on this 2-core machine the target and
  the generators share the cores).
- **Connect cost**: what containment costs per new connection instead (a socket from the shard:
  the request over the socket pair, the shard's connect, ``SCM_RIGHTS`` back, ``dup2``) against
  a plain ``connect``, both ends in this process, CPU from ``os.times()``. Alone:
  ``python -c "from bench.loadtest import connect_cost; print(connect_cost())"``.
- **Merge**: ``merge_run`` of 8 shards' results of a 10-minute run with 20 endpoints (built in
  Redis as the shards store them), report and HTML page included. Target: under 1 s.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psutil

from bench.common import REPO, Row, private_redis, stop, wait_until

USERS = int(os.environ.get("BENCH_LOADTEST_USERS", "20"))
DURATION = int(os.environ.get("BENCH_LOADTEST_DURATION", "12"))
ROUNDS = int(os.environ.get("BENCH_LOADTEST_ROUNDS", "3"))
#: Seconds after the load starts before measuring (ramp-up left out).
WARMUP = 2.0
NODE = "bench-loadtest@localhost"

SERVER = r"""
import asyncio, sys
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"

COUNT = [0]

class Http(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""

    def data_received(self, data):
        self.buf += data
        n = self.buf.count(b"\r\n\r\n")
        if n:
            if self.buf.startswith(b"GET /__count "):  # the benchmark's probe, not counted
                body = str(COUNT[0]).encode()
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                     % (len(body), body))
                n -= 1
            COUNT[0] += n
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4:]
            self.transport.write(RESP * n)

async def main():
    server = await asyncio.get_running_loop().create_server(
        Http, "127.0.0.1", int(sys.argv[1]), backlog=2048)
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""

LOCUSTFILE = """
from locust import FastHttpUser, constant, task


class Fast(FastHttpUser):
    wait_time = constant(0)

    @task
    def root(self):
        self.client.get("/")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _fast_server() -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        yield port, proc
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def _worker(env: dict[str, str], home: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = (home / "worker.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "hms_tasks", "worker", "--pool", "prefork",
         "--concurrency", "2", "-Q", "hms.loadtest", "-n", NODE, "--without-mingle",
         "--without-gossip", "--loglevel", "WARNING"],
        env=env, cwd=REPO, stdout=log, stderr=log)
    try:
        yield proc
    finally:
        stop(proc, timeout=60)
        log.close()


class _Cpu:
    """CPU seconds used by some processes between start() and stop()."""

    def __init__(self) -> None:
        self.procs: dict[int, psutil.Process] = {}
        self.base: dict[int, float] = {}
        self.used: dict[int, float] = {}
        self.machine_base = 0.0
        self.machine_used = 0.0

    @staticmethod
    def _total(p: psutil.Process) -> float:
        t = p.cpu_times()
        return float(t.user + t.system)

    def watch(self, pid: int) -> None:
        if pid in self.procs:
            return
        try:
            p = psutil.Process(pid)
            self.procs[pid] = p
            self.base[pid] = self._total(p)
        except psutil.Error:
            pass

    @staticmethod
    def _machine() -> float:
        t = psutil.cpu_times()
        return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))

    def rebase(self) -> None:
        self.machine_base = self._machine()
        for pid, p in self.procs.items():
            with suppress(psutil.Error):
                self.base[pid] = self._total(p)

    def sample(self) -> None:
        self.machine_used = self._machine() - self.machine_base
        for pid, p in self.procs.items():
            with suppress(psutil.Error):
                self.used[pid] = self._total(p) - self.base[pid]


def _runner_pids() -> list[int]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if "hms_tasks.loadtest.runner" in cmd:
            out.append(p.pid)
    return out


def _count(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/__count")
        return int(conn.getresponse().read())
    finally:
        conn.close()


def _measure(*, port: int, server: int, load_start: float, load_end: float,
             generators: Any) -> dict[str, Any]:
    """Requests/s the target answered, and the CPU of target and generators, from WARMUP s after
    the load started to 1 s before it ends (ramp-up and stop left out, for both sides)."""
    while time.time() < load_start + WARMUP:
        time.sleep(0.05)
    cpu = _Cpu()
    cpu.watch(server)
    for pid in generators():
        cpu.watch(pid)
    cpu.rebase()
    c1, t1 = _count(port), time.time()
    while time.time() < load_end - 1:
        time.sleep(0.1)
    cpu.sample()
    c2, t2 = _count(port), time.time()
    span = t2 - t1
    cores = psutil.cpu_count() or 1
    return {"rps": (c2 - c1) / span, "server_cpu": cpu.used.get(server, 0.0) / span,
            "machine_cpu": cpu.machine_used / span / cores,
            "generator_cpu": [cpu.used.get(p, 0.0) / span for p in cpu.procs if p != server]}


def _pool_pids(worker: int) -> list[int]:
    """The worker's pool processes (where the shard and its connector run)."""
    try:
        return [c.pid for c in psutil.Process(worker).children()]
    except psutil.Error:
        return []


def _ours(app: Any, *, users: int, shards: int, port: int, server: int,
          worker: int) -> dict[str, Any]:
    from hms_tasks.loadtest import keys, names

    result = app.send_task(names.RUN, kwargs={"test": {
        "name": f"bench-{shards}", "target": "fast", "scenario": {"locustfile": "fast.py"},
        "users": users, "spawn_rate": users, "duration": DURATION, "shards": shards}})
    summary = result.get(timeout=60)
    m = _measure(port=port, server=server, load_start=summary["start_at"],
                 load_end=summary["end_at"],
                 generators=lambda: _runner_pids() + _pool_pids(worker))
    doc = None
    deadline = time.time() + 120
    while doc is None and time.time() < deadline:
        doc = keys.report(summary["run_id"])
        time.sleep(0.2)
    assert doc is not None, "no report"
    assert doc["verdict"]["status"] == "passed", doc["verdict"]
    assert doc["total"]["failures"] == 0
    m["reported_rps"] = doc["total"]["rps"]
    m["contained"] = [s["contained"] for s in doc["shards"]]
    return m


def _baseline(*, users: int, port: int, locustfile: Path, server: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "VIRTUAL_ENV")}
    before = _count(port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "-u", str(users),
         "-r", str(users), "-t", f"{DURATION}s", "--host", f"http://127.0.0.1:{port}",
         "--json", "--only-summary", "--loglevel", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=locustfile.parent)
    wait_until(lambda: _count(port) > before, 60, "plain locust to start")
    start = time.time()
    m = _measure(port=port, server=server, load_start=start, load_end=start + DURATION,
                 generators=lambda: [proc.pid])
    out, _ = proc.communicate(timeout=DURATION + 60)
    entries = json.loads(out)
    requests = sum(e["num_requests"] for e in entries)
    first = min(e["start_time"] for e in entries)
    last = max(e["last_request_timestamp"] for e in entries)
    assert sum(e["num_failures"] for e in entries) == 0
    m["reported_rps"] = requests / (last - first)
    return m


def _saturation(m: dict[str, Any]) -> str:
    """Which side ran out of CPU: a generator or the target at >= 90 % of a core, else the
    machine when all its cores were >= 90 % busy (target, generators and whatever else ran)."""
    if m["generator_cpu"] and min(m["generator_cpu"]) >= 0.9:
        side = "the generator saturates"
    elif m["server_cpu"] >= 0.9:
        side = "the target saturates"
    elif m["machine_cpu"] >= 0.9:
        side = "the machine's cores saturate (shared by target, generators and other load)"
    else:
        side = "nothing saturates"
    gens = "+".join(f"{g * 100:.0f}" for g in m["generator_cpu"])
    return (f"target {m['server_cpu'] * 100:.0f}% of a core, generators {gens}%, all cores"
            f" {m['machine_cpu'] * 100:.0f}% busy: {side}")


def _merge_cost(app: Any) -> float:
    """Seconds ``merge_run`` takes for 8 shards x 600 s x 20 endpoints."""
    from hms_tasks.loadtest import keys, orchestrate, stats

    rng = random.Random(1)
    run_id = "bench-merge"
    endpoints = [{"method": "GET", "path": f"/api/e{i}/", "weight": 1} for i in range(20)]
    t0 = 1_700_000_000
    now = time.time()
    keys.create_run(run_id, {
        "id": run_id, "test": "bench-merge", "target": "fast", "status": "running",
        "spec": json.dumps({"name": "bench-merge", "target": "fast",
                            "scenario": {"endpoints": endpoints}, "users": 400,
                            "duration": 600, "shards": 8,
                            "thresholds": {"p95_ms": 500, "error_rate": 0.01}}),
        "created_at": now, "start_at": now - 700, "end_at": now - 100, "deadline": now - 80,
        "shards": 8, "users": 400, "node": NODE, "done": 8, "abort": "0"}, created_at=now)
    for shard in range(8):
        data = stats.RunData(started_at=float(t0), stopped_at=float(t0 + 600))
        for t in range(t0, t0 + 600):
            sec = data.seconds[t] = [0, 0, 50, {}]
            for i in range(20):
                row = [10, 0, 0.0, None, 0.0, 0, {}]
                for _ in range(10):
                    ms = rng.lognormvariate(3.5, 0.8)
                    b = stats.bucket(ms)
                    row[2] += ms
                    row[3] = ms if row[3] is None else min(row[3], ms)
                    row[4] = max(row[4], ms)
                    row[6][b] = row[6].get(b, 0) + 1
                    sec[3][b] = sec[3].get(b, 0) + 1
                sec[0] += 10
                ep = data.endpoints.setdefault(f"GET /api/e{i}/", stats.EndpointStats())
                ep.add_row(row)
        result = json.dumps({**data.to_json(), "check": "ok"}, separators=(",", ":"))
        keys.claim_shard(run_id, shard, node=NODE, now=now)
        from hms_tasks import store

        store.client().hset(keys.shard_key(run_id, shard), mapping={
            "state": "finished", "result": result, "users": 50, "reason": "ran its duration"})
    t = time.perf_counter()
    summary = orchestrate.merge_run(run_id)
    elapsed = time.perf_counter() - t
    assert summary["requests"] == 8 * 600 * 200, summary
    return elapsed


def connect_cost(n: int = 3000) -> dict[str, float]:
    """CPU and wall microseconds per connection, plain and through the shard (best of 2)."""
    from hms_tasks.loadtest import containment

    with socket.create_server(("127.0.0.1", 0), backlog=4096) as listener:
        port = int(listener.getsockname()[1])

        def accept() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                conn.close()

        threading.Thread(target=accept, daemon=True).start()
        ours, theirs = containment.socket_pair()
        connector = containment.Connector(ours, containment.Target(
            "127.0.0.1", port, ("127.0.0.1",)))
        connector.start()
        dialer = containment.Dialer(theirs.detach())
        ways: dict[str, Any] = {
            "plain": lambda s: s.connect(("127.0.0.1", port)),
            "shard": lambda s: dialer.connect(s, "127.0.0.1", port)}
        out: dict[str, float] = {}
        try:
            for _ in range(2):
                for name, connect in ways.items():
                    t0, c0 = time.perf_counter(), sum(os.times()[:2])
                    for _ in range(n):
                        with socket.socket() as s:
                            connect(s)
                    wall = (time.perf_counter() - t0) / n * 1e6
                    used = (sum(os.times()[:2]) - c0) / n * 1e6
                    out[f"{name}_cpu_us"] = min(out.get(f"{name}_cpu_us", used), used)
                    out[f"{name}_wall_us"] = min(out.get(f"{name}_wall_us", wall), wall)
        finally:
            dialer.channel.close()
            connector.close()
            listener.shutdown(socket.SHUT_RDWR)
    return out


def run() -> list[Row]:
    from django.test import override_settings

    with private_redis() as url, tempfile.TemporaryDirectory(prefix="hms-bench-lt-") as tmp, \
            _fast_server() as (port, server):
        home = Path(tmp)
        scenarios = home / "scenarios"
        scenarios.mkdir()
        locustfile = scenarios / "fast.py"
        locustfile.write_text(LOCUSTFILE)
        settings = {
            "HMS_TASKS_LOADTEST_TARGETS": {"fast": f"http://127.0.0.1:{port}"},
            "HMS_TASKS_LOADTEST_TESTS": {}, "HMS_TASKS_LOADTEST_NIGHTLY": None,
            "HMS_TASKS_LOADTEST_SCENARIOS_DIR": str(scenarios),
            "HMS_TASKS_LOADTEST_REPORTS_DIR": str(home / "reports"),
            "HMS_TASKS_LOADTEST_START_DELAY": 3.0, "HMS_TASKS_LOADTEST_GRACE": 10,
        }
        (home / "bench_loadtest_settings.py").write_text(
            "import os\nfrom hms_tasks.demo.settings import *  # noqa: F403\n"
            + "".join(f"{k} = {v!r}\n" for k, v in settings.items())
            + "HMS_TASKS_LOADTEST_CONTAINMENT = os.environ['BENCH_LOADTEST_CONTAINMENT']\n")
        os.environ["REDIS_URL"] = url
        env = {**os.environ, "REDIS_URL": url, "HMS_TASKS_HOME": str(home),
               "DJANGO_SETTINGS_MODULE": "bench_loadtest_settings",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(home),
                                                          os.environ.get("PYTHONPATH")]))}
        env.pop("DATABASE_URL", None)
        import django

        django.setup()
        from hms_tasks import conf, store
        from hms_tasks.celery import app

        with override_settings(**settings):
            conf.reset()
            store.reset()
            app.conf.update(broker_url=url, result_backend=url)
            ours_rps: list[float] = []
            base_rps: list[float] = []
            off_rps: list[float] = []
            ours_m: list[dict[str, Any]] = []
            base_m: list[dict[str, Any]] = []
            off_m: list[dict[str, Any]] = []

            def shard(mode: str, shards: int = 1) -> dict[str, Any]:
                with _worker({**env, "BENCH_LOADTEST_CONTAINMENT": mode}, home) as worker:
                    wait_until(lambda: bool(app.control.ping(destination=[NODE], timeout=0.5)),
                               90, "the loadtest worker")
                    m = _ours(app, users=USERS, shards=shards, port=port, server=server.pid,
                              worker=worker.pid)
                assert all(m["contained"]) == (mode == "required"), m["contained"]
                return m

            for _ in range(ROUNDS):
                m = shard("required")
                ours_m.append(m)
                ours_rps.append(m["rps"])
                m = shard("off")
                off_m.append(m)
                off_rps.append(m["rps"])
                b = _baseline(users=USERS, port=port, locustfile=locustfile,
                              server=server.pid)
                base_m.append(b)
                base_rps.append(b["rps"])
            two = shard("required", shards=2)
            merge_s = _merge_cost(app)
    per_connection = connect_cost()
    o, b, f = (statistics.mean(ours_rps), statistics.mean(base_rps),
               statistics.mean(off_rps))
    one = statistics.mean(m["rps"] for m in ours_m)
    def per_cpu(ms: list[dict[str, Any]]) -> list[int]:
        return [round(m["rps"] / max(sum(m["generator_cpu"]), 1e-9)) for m in ms]

    print("capacity rounds (target-side req/s): contained", [round(x) for x in ours_rps],
          "uncontained", [round(x) for x in off_rps], "baseline",
          [round(x) for x in base_rps], "; as reported: contained",
          [round(m["reported_rps"]) for m in ours_m], "uncontained",
          [round(m["reported_rps"]) for m in off_m], "baseline",
          [round(m["reported_rps"]) for m in base_m], "; requests per generator CPU-second"
          " (runner + shard process): contained", per_cpu(ours_m), "uncontained",
          per_cpu(off_m), "baseline", per_cpu(base_m), "; saturation: contained",
          [_saturation(m) for m in ours_m], "uncontained", [_saturation(m) for m in off_m],
          file=sys.stderr)
    return [
        Row(what=f"generator capacity: 1 contained shard vs `locust --headless`, same"
                 f" locustfile, {USERS} users, {DURATION} s runs, req/s the target answered"
                 f" after a {WARMUP:g} s warm-up, mean of {ROUNDS} alternated"
                 f" ({_saturation(ours_m[-1])}; baseline: {_saturation(base_m[-1])})",
            ours=o, baseline=b, unit="req/s", target=">= 0.95", ratio=o / b, ok=o / b >= 0.95),
        Row(what=f"containment: 1 shard in a network namespace (sockets from the shard) vs the"
                 f" same shard with the Python-level guard only, mean of {ROUNDS} alternated"
                 f" ({_saturation(ours_m[-1])}; uncontained: {_saturation(off_m[-1])})",
            ours=o, baseline=f, unit="req/s", target="report", ratio=o / f, ok=None),
        Row(what=f"scaling: the same {USERS} users as 2 shards vs 1 shard (2 shards:"
                 f" {_saturation(two)})",
            ours=two["rps"], baseline=one, unit="req/s", target="report",
            ratio=two["rps"] / one, ok=None),
        Row(what="containment's cost per new connection: CPU for a socket from the shard vs a"
                 " plain connect (3,000 connects, best of 2; nothing per request)",
            ours=per_connection["shard_cpu_us"], baseline=per_connection["plain_cpu_us"],
            unit="us", target="report", ratio=None, ok=None),
        Row(what="merge: 8 shards x 10 min x 20 endpoints (merge_run: Redis, merge, verdict,"
                 " report, HTML)", ours=merge_s * 1000, baseline=None, unit="ms",
            target="< 1000 ms", ratio=None, ok=merge_s < 1.0),
    ]
