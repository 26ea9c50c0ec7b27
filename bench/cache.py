"""Cache benchmarks (issue #3): warming, the HMS's write path, invalidation fan-out, hit rate,
read path. ``make bench BENCH=cache``.

Each part runs in a subprocess of its own (``python -m bench.cache --part NAME``) with its own
database settings, against one private Redis, on the demo database seeded with 100,000
patients (``.hms-tasks/bench/hms-100k.sqlite3``, seeded once and reused). Every part measures
this project and its baseline in the same run and prints the ratio.
``BENCH_PARTS=latency,write-sqlite make bench BENCH=cache`` runs some parts only;
``BENCH_DUMP=FILE`` makes the latency part write every commit's latency there.
"""

from __future__ import annotations

import argparse
import bisect
import http.client
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench.common import REPO, Row, private_redis, wait_until, worker_process

PATIENTS = 100_000
BENCH_HOME = REPO / ".hms-tasks" / "bench"
SQLITE_DB = BENCH_HOME / f"hms-{PATIENTS // 1000}k.sqlite3"
PG_URL = os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/hms_tasks_bench")
#: The demo database seeded with PATIENTS on PostgreSQL, once and reused (the parts on PG_URL
#: reseed theirs small each run).
PG_SEEDED_URL = os.environ.get(
    "BENCH_PG_SEEDED_URL",
    f"postgres://postgres@127.0.0.1:5432/hms_tasks_bench_{PATIENTS // 1000}k")
#: Zipf exponent of the hit-rate read mix (BENCH_ZIPF_S overrides). With 1.1 over 100,000
#: patients, about 8% of reads fall beyond the 18,000 patients with activity: compulsory misses.
ZIPF_S = float(os.environ.get("BENCH_ZIPF_S", "1.2"))
PARTS = ("read", "miss", "miss-postgres", "warm", "write-sqlite", "write-postgres", "fanout",
         "latency", "hitrate", "stale")


# -- orchestration (the parent process) ------------------------------------------------------


def _env(redis_url: str, database_url: str) -> dict[str, str]:
    return {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url,
            "HMS_TASKS_HOME": str(BENCH_HOME), "DJANGO_SETTINGS_MODULE": "hms_tasks.demo.settings",
            "LOG_LEVEL": "WARNING"}


def _seed_sqlite(redis_url: str) -> None:
    BENCH_HOME.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "hms_tasks", "seed", "--patients", str(PATIENTS),
                    "--if-empty"], env=_env(redis_url, f"sqlite:///{SQLITE_DB}"), check=True,
                   cwd=REPO, stdout=subprocess.DEVNULL)


def _postgres_available(url: str = PG_URL) -> bool:
    """Whether PostgreSQL answers on loopback; creates ``url``'s database if it is missing."""
    try:
        import psycopg
        from psycopg import sql

        name = url.rsplit("/", 1)[1]
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=3,
                             autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)
                                ).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return True
    except Exception:
        return False


def run() -> list[Row]:
    # BENCH_PARTS=latency,write-sqlite reruns some parts only (a comma-separated list).
    chosen = [p for p in os.environ.get("BENCH_PARTS", "").split(",") if p] or list(PARTS)
    if unknown := [p for p in chosen if p not in PARTS]:
        raise SystemExit(f"BENCH_PARTS: unknown part {unknown[0]!r}; known: {', '.join(PARTS)}")
    rows: list[Row] = []
    with private_redis() as url:
        _seed_sqlite(url)
        for part in chosen:
            database = f"sqlite:///{SQLITE_DB}"
            if part == "write-postgres":
                if not _postgres_available():
                    print("no PostgreSQL on 127.0.0.1:5432: write-postgres not measured",
                          file=sys.stderr)
                    continue
                database = PG_URL
            elif part == "miss-postgres":
                if not _postgres_available(PG_SEEDED_URL):
                    print("no PostgreSQL on 127.0.0.1:5432: miss-postgres not measured",
                          file=sys.stderr)
                    continue
                database = PG_SEEDED_URL
                subprocess.run([sys.executable, "-m", "hms_tasks", "seed", "--patients",
                                str(PATIENTS), "--if-empty"], env=_env(url, database), cwd=REPO,
                               check=True, stdout=subprocess.DEVNULL)
            elif part == "stale" and _postgres_available():
                # The peers' comparison ran on PostgreSQL; concurrent processes on one SQLite
                # file would mostly measure its locking.
                database = PG_URL
            print(f"  cache: {part} ...", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, "-m", "bench.cache", "--part", part],
                                 env=_env(url, database), cwd=REPO, capture_output=True,
                                 text=True, timeout=1200)
            if out.returncode != 0:
                raise RuntimeError(f"bench.cache {part} failed:\n{out.stderr[-4000:]}")
            rows += [Row(**r) for r in json.loads(out.stdout.strip().splitlines()[-1])]
            subprocess.run(["redis-cli", "-u", url, "FLUSHALL"], check=True,
                           stdout=subprocess.DEVNULL)
    return rows


# -- helpers of the parts (a subprocess with Django set up) ----------------------------------


def _row(what: str, ours: float, baseline: float | None, unit: str, target: str,
         ratio: float | None, ok: bool | None) -> dict[str, Any]:
    return {"what": what, "ours": ours, "baseline": baseline, "unit": unit, "target": target,
            "ratio": ratio, "ok": ok}


def _patient_ids(n: int) -> list[int]:
    from hms_tasks.demo.models import Patient

    return list(Patient.objects.order_by("id").values_list("id", flat=True)[:n])


@contextmanager
def _worker(node: str) -> Iterator[None]:
    from hms_tasks.celery import app

    with worker_process(redis_url=os.environ["REDIS_URL"], queues="hms.cache", node=node,
                        extra_env={"LOG_LEVEL": "WARNING"}):
        wait_until(lambda: bool(app.control.ping(destination=[node], timeout=0.5)), 180,
                   "the worker to answer ping")
        yield


def _queue_idle(queue: str) -> bool:
    from hms_tasks.cache.core import backend

    c = backend().client()
    return int(c.llen(queue)) == 0 and int(c.hlen("unacked")) == 0


# -- the parts ---------------------------------------------------------------------------------


def part_read() -> list[dict[str, Any]]:
    """A get_or_build hit vs a plain Django cache.get of the same payload."""
    from django.core.cache import caches

    from hms_tasks.cache.core import get_or_build, warm

    ids = _patient_ids(50)
    warm("patient", ids)
    payload = get_or_build("patient", ids[0])
    plain = caches["default"]
    plain.set("bench-plain", payload, 3600)
    assert plain.get("bench-plain") == payload
    n = 4000
    ours: list[float] = []
    base: list[float] = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            plain.get("bench-plain")
        base.append((time.perf_counter() - t0) / n)
        t0 = time.perf_counter()
        for _ in range(n):
            get_or_build("patient", ids[0])
        ours.append((time.perf_counter() - t0) / n)
    o, b = statistics.median(ours) * 1e6, statistics.median(base) * 1e6
    return [_row("read path: get_or_build hit vs Django cache.get (same payload)", o, b,
                 "us/call", "<= 1.5x", o / b, o / b <= 1.5)]


def part_miss() -> list[dict[str, Any]]:
    return _miss_path("SQLite")


def part_miss_postgres() -> list[dict[str, Any]]:
    return _miss_path("PostgreSQL")


def _miss_path(label: str) -> list[dict[str, Any]]:
    """A get_or_build miss (lease, build, conditional fill) vs a plain read of the same rows
    (the demo API's patient_summary, straight from the database): 6 alternating rounds of the
    same 1,000 patients each; before a round of misses their keys are unlinked, and it ends
    once every fill has landed (a miss sends its fill without waiting for the reply: the
    round's end waits for every fill to be stored, so all of their cost is in the round).
    Median of the rounds' per-call means.

    On SQLite the plain read never blocks, and the miss's one blocking Redis round trip
    slows the build after it too (measured: a 100 us sleep before the build adds 95 us to
    it, a 100 us spin nothing; an idle core's caches). On PostgreSQL both sides block on
    the database's round trips, as an HMS does."""
    from hms_tasks.cache.core import backend, get_or_build
    from hms_tasks.cache.registry import get_kind
    from hms_tasks.demo.api import patient_summary

    ids = _patient_ids(1000)
    be = backend()
    client = be.client()
    made = [be.make_key(get_kind("patient").key(i)) for i in ids]
    for i in ids[:50]:  # connections, scripts and statements warm
        get_or_build("patient", i)
        patient_summary(i)
    ours: list[float] = []
    base: list[float] = []

    def plain() -> None:
        t0 = time.perf_counter()
        for i in ids:
            patient_summary(i)
        base.append((time.perf_counter() - t0) / len(ids))

    def misses() -> None:
        client.unlink(*made)
        t0 = time.perf_counter()
        for i in ids:
            get_or_build("patient", i)
        while client.exists(*made) != len(made):  # they were misses, and are all stored
            pass
        ours.append((time.perf_counter() - t0) / len(ids))

    for r in range(6):
        for step in ((plain, misses) if r % 2 else (misses, plain)):
            step()
    o, b = statistics.median(ours) * 1e6, statistics.median(base) * 1e6
    return [_row(f"miss path ({label}): get_or_build miss vs the plain read of the same rows"
                 " (median of 6 alternating rounds of 1,000)", o, b, "us/call", "<= 1.15x",
                 o / b, o / b <= 1.15)]


def _naive_warm(ids: list[int]) -> None:
    """Per-patient ORM fetch with related lookups, one cache.set each."""
    from django.core.cache import caches

    from hms_tasks.demo.models import Patient

    cache = caches["default"]
    for pid in ids:
        p = Patient.objects.get(id=pid)
        payload = {
            "id": p.id, "updated_at": p.updated_at.isoformat(),
            "patient": {"mrn": p.mrn, "given_name": p.given_name, "family_name": p.family_name,
                        "birth_date": p.birth_date.isoformat(), "notes": p.notes},
            "encounters": [{"id": e.id, "status": e.status, "department": e.department.code,
                            "practitioner": e.practitioner.family_name}
                           for e in p.encounters.all()],
            "appointments": [{"id": a.id, "status": a.status, "department": a.department.code,
                              "practitioner": a.practitioner.family_name}
                             for a in p.appointments.all()],
        }
        cache.set(f"naive:{pid}", payload, 3600)


def part_warm() -> list[dict[str, Any]]:
    from hms_tasks.cache.core import count_queries, warm

    ids = _patient_ids(20_000)
    t0 = time.perf_counter()
    done = [warm("patient", ids[i:i + 10_000]) for i in range(0, len(ids), 10_000)]
    ours = len(ids) / (time.perf_counter() - t0)
    written = sum(d["written"] for d in done)
    assert written == len(ids), done
    ours_q = sum(d["queries"] for d in done) / (len(ids) / 1000)
    naive_ids = ids[:1000]
    with count_queries() as q:
        t0 = time.perf_counter()
        _naive_warm(naive_ids)
        naive = len(naive_ids) / (time.perf_counter() - t0)
    naive_q = q[0] / (len(naive_ids) / 1000)
    return [
        _row("warming: patient details/s, one process (20,000 vs naive 1,000)", ours, naive,
             "patients/s", ">= 20,000 and >= 8x", ours / naive, ours >= 20_000 and
             ours / naive >= 8),
        _row("warming: queries per 1,000 patients", ours_q, naive_q, "queries", "<= 5",
             naive_q / ours_q, ours_q <= 5),
    ]


def _write_path(label: str) -> list[dict[str, Any]]:
    """A transaction that saves one Patient and commits, with hms-tasks' hooks vs without."""
    from django.db import transaction
    from django.db.models.signals import post_delete, post_init, post_save

    from hms_tasks.cache import changes
    from hms_tasks.cache.registry import tracked_models
    from hms_tasks.demo.models import Patient

    if not Patient.objects.exists():
        from hms_tasks.demo.seed import seed

        seed(patients=100, force=True)
    pid = Patient.objects.order_by("id").values_list("id", flat=True)[0]

    def installed(on: bool) -> None:
        for model, tracked in tracked_models().items():
            uid = f"hms_tasks.cache:{model._meta.label}"
            if on:
                changes.connect(tracked)
            else:
                for sig, suffix in ((post_save, "save"), (post_delete, "delete"),
                                    (post_init, "init")):
                    sig.disconnect(sender=model, dispatch_uid=f"{uid}:{suffix}")

    def round_(n: int) -> float:
        # The courier thread's work during the round (sending fan-out tasks; it shares the
        # process and the GIL) is in the timing.
        assert changes.flush(30)
        t0 = time.perf_counter()
        for i in range(n):
            with transaction.atomic():
                p = Patient.objects.get(id=pid)
                p.allergies = f"r{i}"
                p.save()
        return (time.perf_counter() - t0) / n

    # Many short rounds, alternating which side goes first (A B B A ...): this machine's
    # speed drifts by tens of percent within a minute, and a drift must hit both sides alike.
    n, rounds = 250, 24
    round_(50)
    ours: list[float] = []
    base: list[float] = []
    for r in range(rounds):
        for on in ((False, True) if r % 2 == 0 else (True, False)):
            installed(on)
            (ours if on else base).append(round_(n))
    o, b = statistics.median(ours) * 1e6, statistics.median(base) * 1e6
    return [_row(f"write path ({label}): save one Patient + commit, with vs without hms-tasks "
                 f"(median of {rounds} alternating rounds of {n})",
                 o, b, "us/txn", "<= 1.15x", o / b, o / b <= 1.15)]


def part_write_sqlite() -> list[dict[str, Any]]:
    return _write_path("SQLite")


def part_write_postgres() -> list[dict[str, Any]]:
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return _write_path("PostgreSQL")


def _populate(tags: list[str], keys_per_tag: int) -> None:
    """Cached keys filed under ``tags`` (raw writes: setting up is not what is measured)."""
    from hms_tasks.cache.core import backend

    be = backend()
    c = be.client()
    pipe = c.pipeline(transaction=False)
    for n, tag in enumerate(tags):
        keys = [be.make_key(f"bench:{tag}:{k}") for k in range(keys_per_tag)]
        for key in keys:
            pipe.set(key, b"x", ex=3600)
        pipe.sadd(be.index_prefix + tag, *keys)
        if n % 200 == 199:
            pipe.execute()
    pipe.execute()


def part_fanout() -> list[dict[str, Any]]:
    from hms_tasks.cache import names
    from hms_tasks.cache.changes import _keys
    from hms_tasks.cache.core import backend
    from hms_tasks.celery import app

    be = backend()
    c = be.client()
    rows = []
    # Invalidation of tags, in-process: Lua throughput.
    tags = [f"department:{i}" for i in range(1, 1001)]
    _populate(tags, 500)
    t0 = time.perf_counter()
    unlinked = sum(be.invalidate_tags(tags[i:i + 100])[0] for i in range(0, len(tags), 100))
    keys_s = unlinked / (time.perf_counter() - t0)
    assert unlinked == 500_000, unlinked
    rows.append(_row("tag invalidation: keys unlinked per second (1,000 tags x 500 keys)",
                     keys_s, None, "keys/s", ">= 500,000", None, keys_s >= 500_000))
    with _worker("bench-fanout@localhost"):
        # A backlog of 100,000 changes as recorders leave it: entries of up to 100 tags.
        n = 100_000
        tags = [f"patient:{i}" for i in range(1, n + 1)]
        _populate(tags, 1)
        log, flag = _keys()
        for i in range(0, n, 100):
            c.rpush(log, json.dumps(tags[i:i + 100]))
        c.set(flag, "1", ex=30)
        t0 = time.perf_counter()
        app.send_task(names.CACHE_FANOUT_CHANGES)
        wait_until(lambda: c.llen(log) == 0 and not c.exists(flag), 600, "the backlog to drain")
        ours = n / (time.perf_counter() - t0)
        # One Celery task per change.
        m = 3000
        tags = [f"practitioner:{i}" for i in range(1, m + 1)]
        _populate(tags, 1)
        with app.producer_or_acquire() as producer:
            for tag in tags:
                app.send_task(names.CACHE_INVALIDATE_TAGS, kwargs={"tags": [tag]},
                              producer=producer, queue="hms.cache.bench")
        t0 = time.perf_counter()
        app.control.add_consumer("hms.cache.bench", destination=["bench-fanout@localhost"],
                                 reply=True, timeout=10)
        wait_until(lambda: _queue_idle("hms.cache.bench"), 600, "the per-change tasks")
        base = m / (time.perf_counter() - t0)
    rows.append(_row("fan-out: backlog of changes drained per second (100,000 vs 3,000 "
                     "one-task-per-change)", ours, base, "changes/s", ">= 20,000 and >= 15x",
                     ours / base, ours >= 20_000 and ours / base >= 15))
    return rows


def part_latency() -> list[dict[str, Any]]:
    """Commit to keys gone at 1,000 changes per second: p50 and p99."""
    from django.db import transaction

    from hms_tasks.cache import changes
    from hms_tasks.cache.core import backend, warm
    from hms_tasks.cache.registry import get_kind
    from hms_tasks.demo.models import Patient

    be = backend()
    c = be.client()
    ids = _patient_ids(5000)
    warm("patient", ids[:5000])
    # The summary's key carries the day (patient:<id>:<date>): the registry makes it.
    kind = get_kind("patient")
    keys = {be.make_key(kind.key(i)): i for i in ids}
    committed: dict[int, float] = {}
    with _worker("bench-latency@localhost"):
        # Warm-up, not counted: a few changes through the whole path first, so the figure is
        # the steady state and not one-time start-up work (the worker's first task, this
        # process's first flush and its connections), which delayed the first ~250 changes
        # by up to 250 ms.
        spare = _patient_ids(5100)[5000:]
        warm("patient", spare)
        for pid in spare:
            with transaction.atomic():
                Patient.objects.filter(id=pid).update(notes="warm-up")
        assert changes.flush(30)
        wait_until(lambda: not any(c.exists(be.make_key(kind.key(i))) for i in spare), 60,
                   "the warm-up changes to land")
        c.config_set("notify-keyspace-events", "Eg")
        # The watcher is a process of its own: a thread here would notice deletions only when
        # the writer loop lets go of the GIL, adding its own delay to the figure. Both processes
        # read the same CLOCK_MONOTONIC.
        watcher = subprocess.Popen(
            [sys.executable, "-c", _WATCH, os.environ["REDIS_URL"], str(len(ids)),
             be.make_key("patient:")], stdout=subprocess.PIPE, text=True)
        assert watcher.stdout is not None
        assert watcher.stdout.readline().strip() == "ready"
        rate = 1000.0
        start = time.monotonic() + 0.2
        for n, pid in enumerate(ids):
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            with transaction.atomic():
                Patient.objects.filter(id=pid).update(notes=f"n{n}")
            committed[pid] = time.monotonic()
        achieved = len(ids) / (time.monotonic() - start)
        assert changes.flush(30)
        out, _ = watcher.communicate(timeout=60)
    gone: dict[int, float] = {}
    for line in out.splitlines():
        key, at = line.rsplit(" ", 1)
        gone.setdefault(keys[key], float(at))
    assert len(gone) == len(ids), f"{len(gone)} of {len(ids)} keys went"
    if os.environ.get("BENCH_DUMP"):
        with open(os.environ["BENCH_DUMP"], "w") as f:
            for n, p in enumerate(ids):
                f.write(f"{n} {committed[p]:.6f} {(gone[p] - committed[p]) * 1000:.3f}\n")
    latencies = sorted((gone[p] - committed[p]) * 1000 for p in ids)
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    return [
        _row(f"commit -> keys gone at {achieved:,.0f} changes/s: p50", p50, None, "ms", "-",
             None, None),
        _row(f"commit -> keys gone at {achieved:,.0f} changes/s: p99", p99, None, "ms",
             "<= 50", None, p99 <= 50),
    ]


_WATCH = r"""
import sys, time, redis
client = redis.Redis.from_url(sys.argv[1])
pubsub = client.pubsub()
pubsub.subscribe("__keyevent@0__:del")
want, prefix, seen = int(sys.argv[2]), sys.argv[3].encode(), []
print("ready", flush=True)
for msg in pubsub.listen():
    if msg["type"] == "message" and msg["data"].startswith(prefix):
        # Kept in memory until the end: writing to the pipe as we go would block once the
        # parent (busy writing) leaves it full, and delay the very timestamps we take.
        seen.append((msg["data"], time.monotonic()))
        if len(seen) >= want:
            break
sys.stdout.write("".join(f"{k.decode()} {t}\n" for k, t in seen))
"""


class _Zipf:
    def __init__(self, n: int, s: float, rng: random.Random) -> None:
        self.cum = list(itertools.accumulate(1 / (k ** s) for k in range(1, n + 1)))
        self.rng = rng

    def rank(self) -> int:
        return bisect.bisect(self.cum, self.rng.random() * self.cum[-1])


@contextmanager
def _api_server() -> Iterator[int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "hms_tasks.demo.wsgi:application", "-b",
         f"127.0.0.1:{port}", "-w", "2", "--log-level", "warning"],
        env=dict(os.environ), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        except OSError:
            return False

    try:
        wait_until(up, 60, "the API")
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def part_hitrate() -> list[dict[str, Any]]:
    """Zipf-distributed reads over the demo API, 1% writes, after warm_hot."""
    from django.db import transaction

    from hms_tasks.cache import changes
    from hms_tasks.cache.stats import cache_stats
    from hms_tasks.cache.tasks import warm_hot
    from hms_tasks.demo.cache import hot_patients, hot_practitioners
    from hms_tasks.demo.models import Department, Patient

    rng = random.Random(42)
    # Reads in a hospital concentrate on patients with something happening: rank the
    # patients with appointments today or tomorrow and the inpatients first, the rest after.
    hot = hot_patients(PATIENTS)
    rest = [i for i in Patient.objects.order_by("id").values_list("id", flat=True)
            if i not in set(hot)]
    rng.shuffle(hot)
    rng.shuffle(rest)
    ranked = hot + rest
    practitioners = hot_practitioners(10_000)
    departments = list(Department.objects.values_list("id", flat=True))
    zipf_p = _Zipf(len(ranked), ZIPF_S, rng)
    zipf_pr = _Zipf(len(practitioners), ZIPF_S, rng)
    writes: dict[int, list[tuple[float, str]]] = {}
    lock = threading.Lock()
    stale: list[int] = []
    reads = [0]

    def plan(n: int) -> list[tuple[str, int]]:
        ops = []
        for _ in range(n):
            r = rng.random()
            if r < 0.01:
                ops.append(("write", ranked[zipf_p.rank() - 1]))
            elif r < 0.70:
                ops.append(("patient", ranked[zipf_p.rank() - 1]))
            elif r < 0.90:
                ops.append(("schedule", practitioners[zipf_pr.rank() - 1]))
            else:
                ops.append(("census", rng.choice(departments)))
        return ops

    def client(port: int, ops: list[tuple[str, int]], check: bool) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for kind, ident in ops:
            if kind == "write":
                with transaction.atomic():
                    p = Patient.objects.get(id=ident)
                    p.allergies = f"w{time.monotonic_ns()}"
                    p.save()
                with lock:
                    writes.setdefault(ident, []).append(
                        (time.monotonic(), p.updated_at.isoformat()))
                continue
            path = {"patient": f"/api/patients/{ident}/",
                    "schedule": f"/api/practitioners/{ident}/appointments/today/",
                    "census": f"/api/departments/{ident}/census/"}[kind]
            sent = time.monotonic()
            conn.request("GET", path)
            body = json.loads(conn.getresponse().read())
            with lock:
                reads[0] += 1
            if check and kind == "patient":
                # Stale: older than a version committed more than the invalidation latency
                # target (50 ms) before this read was sent.
                with lock:
                    known = [u for t, u in writes.get(ident, []) if t < sent - 0.05]
                if known and body["updated_at"] < max(known):
                    stale.append(ident)

    def totals() -> tuple[int, int]:
        kinds = cache_stats(window_minutes=60)["kinds"]
        return (sum(k["hits"] for k in kinds.values()),
                sum(k["misses"] for k in kinds.values()))

    with _worker("bench-hitrate@localhost"), _api_server() as port:
        threads = [threading.Thread(target=client, args=(port, plan(2500), False))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        warm_hot.run(limit=50_000)  # in-process; its patient chunks go to the worker
        wait_until(lambda: _queue_idle("hms.cache"), 600, "warm_hot's chunks")
        assert changes.flush(30)
        hits0, misses0 = totals()
        reads[0] = 0
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(port, plan(10_000), True))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        hits1, misses1 = totals()
    hits, misses = hits1 - hits0, misses1 - misses0
    rate = hits / (hits + misses)
    return [
        _row(f"hit rate: {reads[0]:,} Zipf({ZIPF_S}) API reads, 1% writes, after warm_hot "
             f"({reads[0] / elapsed:,.0f} reads/s)", rate * 100, None, "%", ">= 95", None,
             rate >= 0.95),
        _row("stale reads detected in that run", len(stale), None, "reads", "0", None,
             not stale),
    ]


_STALE_READER = r"""
import json, random, sys, time
import django
django.setup()
from hms_tasks.cache.core import get_or_build
ids, until = json.loads(sys.argv[1]), float(sys.argv[2])
rng = random.Random(sys.argv[3])
reads = []
print("ready", flush=True)
while time.monotonic() < until:
    pid = rng.choice(ids)
    sent = time.monotonic()
    payload = get_or_build("patient", pid)
    reads.append((pid, sent, payload["patient"]["allergies"]))
sys.stdout.write(json.dumps(reads) + "\n")
"""


def _stale_round(ids: list[int], seconds: float, rate: float) -> tuple[int, int, int, float]:
    """A writer (this process) at ``rate`` commits/s and two reader processes reading the
    same patients through the cache for ``seconds``. Returns (reads that started after a
    commit returned, of those the stale ones, commits, the largest time from such a commit to
    a stale read's start, ms)."""
    from django.db import transaction

    from hms_tasks.cache import changes
    from hms_tasks.demo.models import Patient

    Patient.objects.filter(id__in=ids).update(allergies="v-1")
    assert changes.flush(30)
    start = time.monotonic() + 1.0
    until = start + seconds
    readers = [subprocess.Popen([sys.executable, "-c", _STALE_READER, json.dumps(ids),
                                 str(until), str(n)], stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ)) for n in range(2)]
    for r in readers:
        assert r.stdout is not None
        assert r.stdout.readline().strip() == "ready"
    commits: dict[int, list[tuple[float, int]]] = {i: [] for i in ids}
    rng = random.Random(7)
    n = 0
    while (now := time.monotonic()) < until:
        delay = start + n / rate - now
        if delay > 0:
            time.sleep(delay)
        pid = rng.choice(ids)
        with transaction.atomic():
            Patient.objects.filter(id=pid).update(allergies=f"v{n}")
        commits[pid].append((time.monotonic(), n))  # the commit has returned
        n += 1
    after = stale = 0
    worst = 0.0
    for r in readers:
        out, _ = r.communicate(timeout=120)
        for pid, sent, seen in json.loads(out.strip().splitlines()[-1]):
            done = [(t, v) for t, v in commits[pid] if t < sent]
            if not done:
                continue
            after += 1
            version = int(seen[1:])
            if version < done[-1][1]:
                stale += 1
                missed = next(t for t, v in done if v > version)
                worst = max(worst, (sent - missed) * 1000)
    assert changes.flush(30)
    return after, stale, n, worst


def part_stale() -> list[dict[str, Any]]:
    """Read after commit: reads that start after a commit returned and still get the summary
    from before it, counted across processes; against a naive write path (the change log
    and the worker's task only: what this project did before) in the same run."""
    from unittest import mock

    from django.core.management import call_command

    from hms_tasks.cache import changes
    from hms_tasks.cache.core import backend
    from hms_tasks.demo.models import Patient

    call_command("migrate", verbosity=0)
    if Patient.objects.count() < 50:
        from hms_tasks.demo.seed import seed

        seed(patients=200, force=True)
    ids = _patient_ids(50)
    append = backend().client().register_script(
        "redis.call('RPUSH', KEYS[1], ARGV[1]) "
        "if redis.call('SET', KEYS[2], '1', 'NX', 'EX', 30) then return 1 end return 0")

    def naive(tags: Any, *, timeout: float | None = None) -> bool:
        return bool(append(keys=list(changes._keys()), args=[json.dumps(sorted(tags))]) == 1)

    seconds, rate = 10.0, 200.0
    with _worker("bench-stale@localhost"):
        after, stale, commits, worst = _stale_round(ids, seconds, rate)
        with mock.patch.object(changes, "record_changes", naive), \
                mock.patch.object(changes, "_record_at_commit", naive):
            b_after, b_stale, _, b_worst = _stale_round(ids, seconds, rate)
    return [
        _row(f"read after commit: stale reads among {after:,} started after a commit returned "
             f"(writer {commits / seconds:,.0f} commits/s + 2 reader processes, 50 patients; "
             f"worst {worst:.1f} ms after the commit; baseline: invalidation by the task "
             f"only, {b_after:,} reads, worst {b_worst:.1f} ms)",
             stale, b_stale, "reads", "0", None, stale == 0),
    ]


PART_FUNCS: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "read": part_read,
    "miss": part_miss,
    "miss-postgres": part_miss_postgres,
    "warm": part_warm,
    "write-sqlite": part_write_sqlite,
    "write-postgres": part_write_postgres,
    "fanout": part_fanout,
    "latency": part_latency,
    "hitrate": part_hitrate,
    "stale": part_stale,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=PARTS, required=True)
    args = parser.parse_args()
    import django

    django.setup()
    print(json.dumps(PART_FUNCS[args.part]()))


if __name__ == "__main__":
    main()

