"""Connection pooling: the demo API on PostgreSQL under the demo's own load test, with Django's
psycopg pool against without.

The API runs as ``hms-tasks run`` runs it (gunicorn, 2 sync workers, the demo's WSGI app) on a
seeded PostgreSQL database of its own (``hms_tasks_bench_pool``); the load is the shipped
scenario (``hms_tasks/loadtest/locustfiles/demo_api.py``, what ``hms-tasks loadtest`` runs)
under ``locust --headless``, the same users each time. Three configurations, alternated round
by round on the shared machine:

- ``pool``: the demo's settings (``OPTIONS["pool"]``, min 1, max 4 per process);
- ``persistent``: ``HMS_DB_POOL=0``: one connection per process kept 60 s (the demo before);
- ``per-request``: no pool and ``CONN_MAX_AGE = 0``, Django's default: a new connection for
  every request.

Figures: requests per second over the run and the p95 from Locust's aggregated row. The
target: the pool beats both on RPS and p95, or the report says why.

Needs ``DATABASE_URL`` naming a PostgreSQL server (``postgres://postgres@127.0.0.1:5432/x``;
the database name is replaced). ``BENCH_POOL_USERS`` (default 40), ``BENCH_POOL_SECONDS``
(20), ``BENCH_POOL_ROUNDS`` (2), ``BENCH_POOL_PATIENTS`` (2000).
"""

from __future__ import annotations

import csv
import http.client
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import REPO, Row, private_redis, stop, wait_until

USERS = int(os.environ.get("BENCH_POOL_USERS", "40"))
SECONDS = int(os.environ.get("BENCH_POOL_SECONDS", "20"))
ROUNDS = int(os.environ.get("BENCH_POOL_ROUNDS", "2"))
PATIENTS = int(os.environ.get("BENCH_POOL_PATIENTS", "2000"))
DB_NAME = "hms_tasks_bench_pool"
LOCUSTFILE = REPO / "hms_tasks" / "loadtest" / "locustfiles" / "demo_api.py"
CONFIGS = ("pool", "persistent", "per-request")

PER_REQUEST_SETTINGS = """
from hms_tasks.demo.settings import *  # noqa: F403

DATABASES["default"]["CONN_MAX_AGE"] = 0  # noqa: F405
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _database_url() -> str:
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        raise SystemExit("queries_pool needs DATABASE_URL=postgres://... (a PostgreSQL server)")
    return url.rsplit("/", 1)[0] + "/" + DB_NAME


def _env(config: str, *, redis_url: str, db_url: str, home: Path) -> dict[str, str]:
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": db_url,
           "HMS_TASKS_HOME": str(home), "DJANGO_SETTINGS_MODULE": "hms_tasks.demo.settings",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(home),
                                                       os.environ.get("PYTHONPATH")]))}
    env.pop("HMS_DB_POOL", None)
    if config != "pool":
        env["HMS_DB_POOL"] = "0"
    if config == "per-request":
        (home / "per_request_settings.py").write_text(PER_REQUEST_SETTINGS)
        env["DJANGO_SETTINGS_MODULE"] = "per_request_settings"
    return env


def _prepare(env: dict[str, str]) -> None:
    """Create, migrate and seed the bench database once (kept between runs)."""
    import psycopg

    admin = env["DATABASE_URL"].rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DB_NAME]).fetchone():
            return
        conn.execute(f"CREATE DATABASE {DB_NAME}")
    hms = [sys.executable, "-m", "hms_tasks"]
    subprocess.run([sys.executable, "-m", "django", "migrate", "-v", "0"], env=env, check=True,
                   cwd=REPO)
    subprocess.run([*hms, "seed", "--patients", str(PATIENTS)], env=env, check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)


def _healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/healthz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


@contextmanager
def _api(env: dict[str, str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    log = open(Path(env["HMS_TASKS_HOME"]) / "api.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "hms_tasks.demo.wsgi:application",
         "-b", f"127.0.0.1:{port}", "-w", "2",
         "--worker-class", "hms_tasks.demo.stack.http_errors.JsonErrorWorker"],
        env=env, cwd=REPO, stdout=log, stderr=log)
    try:
        wait_until(lambda: _healthy(port), 60, "the demo API")
        yield proc
    finally:
        stop(proc)
        log.close()


def _load(env: dict[str, str], port: int, out: Path) -> dict[str, float]:
    prefix = out / "locust"
    subprocess.run(
        [sys.executable, "-m", "locust", "--headless", "-f", str(LOCUSTFILE),
         "--host", f"http://127.0.0.1:{port}", "-u", str(USERS), "-r", str(USERS),
         "-t", f"{SECONDS}s", "--csv", str(prefix), "--only-summary", "--loglevel", "ERROR"],
        env=env, cwd=REPO, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(f"{prefix}_stats.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    return {"rps": float(row["Requests/s"]), "p95": float(row["95%"]),
            "requests": float(row["Request Count"]), "failures": float(row["Failure Count"])}


def run() -> list[Row]:
    db_url = _database_url()
    results: dict[str, list[dict[str, float]]] = {c: [] for c in CONFIGS}
    with private_redis() as redis_url:
        home = Path(tempfile.mkdtemp(prefix="hms-bench-pool-"))
        _prepare(_env("persistent", redis_url=redis_url, db_url=db_url, home=home))
        for r in range(ROUNDS):
            order = CONFIGS if r % 2 == 0 else tuple(reversed(CONFIGS))
            for config in order:
                env = _env(config, redis_url=redis_url, db_url=db_url, home=home)
                port = _free_port()
                out = Path(tempfile.mkdtemp(prefix=f"pool-{config}-", dir=home))
                with _api(env, port):
                    m = _load(env, port, out)
                results[config].append(m)
                print(f"round {r + 1} {config}: {m['rps']:.1f} req/s, p95 {m['p95']:.0f} ms,"
                      f" {m['failures']:.0f} failures of {m['requests']:.0f}", flush=True)
                time.sleep(1)  # let the closed connections leave pg_stat_activity
    rows: list[Row] = []

    def mean(config: str, key: str) -> float:
        return sum(m[key] for m in results[config]) / len(results[config])

    pool_rps, pool_p95 = mean("pool", "rps"), mean("pool", "p95")
    for base in ("persistent", "per-request"):
        rounds = " / ".join(f"{a['rps']:.1f}" for a in results["pool"]) + " vs " + " / ".join(
            f"{b['rps']:.1f}" for b in results[base])
        base_rps, base_p95 = mean(base, "rps"), mean(base, "p95")
        rows.append(Row(
            what=f"pool vs {base}: RPS, {USERS} users, {SECONDS} s, {ROUNDS} rounds ({rounds})",
            ours=round(pool_rps, 1), baseline=round(base_rps, 1), unit="req/s",
            target="pool >= baseline", ratio=round(pool_rps / base_rps, 3) if base_rps else None,
            ok=pool_rps >= base_rps))
        rounds = " / ".join(f"{a['p95']:.0f}" for a in results["pool"]) + " vs " + " / ".join(
            f"{b['p95']:.0f}" for b in results[base])
        rows.append(Row(
            what=f"pool vs {base}: p95 ({rounds})", ours=round(pool_p95, 1),
            baseline=round(base_p95, 1), unit="ms", target="pool <= baseline",
            ratio=round(base_p95 / pool_p95, 3) if pool_p95 else None, ok=pool_p95 <= base_p95))
    return rows
