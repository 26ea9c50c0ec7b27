"""Telemetry and memory benchmarks, each against a baseline in the same run:

* one node sample's CPU cost, in a real prefork pool child, against a bare psutil snapshot
  (target: at most 5 ms);
* store writes per second with pipelining (target: at least 50,000), against a naive store
  (a pipelined ZADD of "ts:value" per point into a sorted set per series);
* bytes per raw point and per rolled-up point, and the memory of 100 series over a simulated
  30 days (a point a minute each, rolled up every simulated hour), against the naive store;
* evaluating the alert rules over 1,000 series (target: at most 100 ms);
* GC: peak RSS of a prefork worker running a leaking workload, with the memory tiers
  (a 256 MiB budget) against the same worker without them.
"""

from __future__ import annotations

import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from bench.common import REPO, Row, django_on, private_redis, stop, wait_until

SAMPLES = int(os.environ.get("BENCH_METRICS_SAMPLES", "300"))
SERIES = 100
DAYS = 30
BUDGET_MB = 256
LEAK_TASKS = int(os.environ.get("BENCH_METRICS_LEAK_TASKS", "40"))


@contextmanager
def prefork_worker(*, url: str, node: str, queue: str, concurrency: int,
                   settings: str = "") -> Iterator[subprocess.Popen[bytes]]:
    home = Path(tempfile.mkdtemp(prefix="hms-bench-home-"))
    (home / "bench_settings.py").write_text(
        "from hms_tasks.demo.settings import *  # noqa\n" + settings)
    env = {**os.environ, "REDIS_URL": url, "HMS_TASKS_HOME": str(home),
           "PYTHONPATH": f"{home}{os.pathsep}{REPO}", "DJANGO_SETTINGS_MODULE": "bench_settings"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "hms_tasks", "worker", "--pool", "prefork",
         "--concurrency", str(concurrency), "--include", "bench.metrics_tasks", "-Q", queue,
         "-n", node, "--without-gossip", "--without-mingle", "--loglevel", "WARNING"],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        stop(proc)


def _sample_cost(url: str) -> list[Row]:
    from hms_tasks.celery import app

    node = "bench-sample@localhost"
    with prefork_worker(url=url, node=node, queue="bench.sample", concurrency=2):
        wait_until(lambda: bool(app.control.ping(destination=[node], timeout=0.5)), 60,
                   "the worker to answer ping")
        got = app.send_task("hms.bench.sample_cost", kwargs={"n": SAMPLES},
                            queue="bench.sample").get(timeout=120)
    ours, bare = got["ours_ms"], got["bare_ms"]
    return [Row(what=f"node sample, CPU per sample (prefork child, {got['children']} pool"
                     f" children, {SAMPLES} samples)",
                ours=ours, baseline=bare, unit="ms", target="<= 5 ms", ratio=ours / bare,
                ok=ours <= 5.0)]


def _naive_write(client: redis.Redis, points: list[tuple[str, float, float]]) -> None:
    pipe = client.pipeline(transaction=False)
    for sid, t, v in points:
        pipe.zadd(f"naive:{sid}", {f"{t}:{v}": t})
    pipe.execute()


def _write_throughput(client: redis.Redis) -> list[Row]:
    from hms_tasks.metrics import store as ts

    series = [ts.series_id("host.cpu.percent", {"node": f"n{i}@h"}) for i in range(SERIES)]
    now = time.time()
    rows: list[Row] = []
    for per_call, label in ((1, "one node sample per call: 100 points"),
                            (50, "50 samples per call: 5,000 points")):
        rounds = 200 // per_call * 10
        batches = [[(sid, now - 3600 + (r * per_call + k) * 0.01, float(k))
                    for k in range(per_call) for sid in series] for r in range(rounds)]
        total = sum(len(b) for b in batches)
        ours_t: list[float] = []
        naive_t: list[float] = []
        for _ in range(3):
            client.flushdb()
            t0 = time.perf_counter()
            for b in batches:
                ts.write(b, now=now)
            ours_t.append(time.perf_counter() - t0)
            client.flushdb()
            t0 = time.perf_counter()
            for b in batches:
                _naive_write(client, b)
            naive_t.append(time.perf_counter() - t0)
        ours = total / statistics.median(ours_t)
        naive = total / statistics.median(naive_t)
        rows.append(Row(what=f"store writes/s, {label} (median of 3)", ours=ours,
                        baseline=naive, unit="points/s", target=">= 50,000",
                        ratio=ours / naive, ok=ours >= 50_000))
    client.flushdb()
    return rows


def _memory(client: redis.Redis) -> list[Row]:
    from hms_tasks.metrics import store as ts

    series = [ts.series_id("host.cpu.percent", {"node": f"n{i}@h"}) for i in range(SERIES)]
    client.flushdb()
    end = float(int(time.time() // 3600) * 3600)
    start = end - DAYS * 86400
    t0 = time.perf_counter()
    for hour in range(DAYS * 24):
        base = start + hour * 3600
        ts.write([(sid, base + m * 60 + 1, float((hour + m) % 97)) for m in range(60)
                  for sid in series], now=base + 3600)
        ts.rollup(now=base + 3600)
    elapsed = time.perf_counter() - t0
    usage = ts.memory_usage()
    raw_kept = sum(int(client.strlen(k)) for k in client.scan_iter(match="hms:ts:raw:*",
                                                                    count=1000)) // 12
    slots_1m = sum(len(ts.query(s, since=end - DAYS * 86400, resolution="1m", now=end)[1])
                   for s in series[:5]) * SERIES // 5
    slots_1h = sum(len(ts.query(s, since=end - DAYS * 86400, resolution="1h", now=end)[1])
                   for s in series[:5]) * SERIES // 5
    total = usage["raw"] + usage["1m"] + usage["1h"] + usage["index"]
    # The naive store: a day of raw points in sorted sets (it has no rollups at all).
    client.flushdb()
    for hour in range(24):
        base = end - 86400 + hour * 3600
        _naive_write(client, [(sid, base + m * 60 + 1, float((hour + m) % 97))
                              for m in range(60) for sid in series])
    naive_bytes = sum(int(client.memory_usage(k, samples=0) or 0)
                      for k in client.scan_iter(match="naive:*", count=1000))
    naive_per_point = naive_bytes / (24 * 60 * SERIES)
    raw_per_point = usage["raw"] / raw_kept
    client.flushdb()
    return [
        Row(what="bytes per raw point (a day of 1/min points, 100 series)",
            ours=raw_per_point, baseline=naive_per_point, unit="B", target="-",
            ratio=naive_per_point / raw_per_point),
        Row(what="bytes per rolled-up point, 1-minute slots", ours=usage["1m"] / slots_1m,
            baseline=None, unit="B", target="-"),
        Row(what="bytes per rolled-up point, 1-hour slots", ours=usage["1h"] / slots_1h,
            baseline=None, unit="B", target="-"),
        Row(what=f"memory, 100 series x {DAYS} simulated days, 1 point/min (raw 24 h, 1m+1h"
                 f" 30 d; naive: raw points of the same {DAYS} days in sorted sets)",
            ours=total / 2**20, baseline=naive_bytes * DAYS / 2**20, unit="MiB",
            target="bounded", ratio=naive_bytes * DAYS / total),
        Row(what=f"  ... simulated with {DAYS * 24 * 60 * SERIES:,} points and"
                 f" {DAYS * 24} rollups", ours=elapsed, baseline=None, unit="s", target="-"),
    ]


def _alerts(client: redis.Redis) -> list[Row]:
    from hms_tasks.metrics import alerts
    from hms_tasks.metrics import store as ts

    # Hundreds of alerts fire here; their log lines would drown the table.
    logging.getLogger(alerts.__name__).setLevel(logging.ERROR)

    client.flushdb()
    now = time.time()
    points = [(ts.series_id("host.cpu.percent", {"node": f"n{i}@h"}), now, float(i % 100))
              for i in range(1000)]
    ts.write(points, now=now)
    timings_ms: list[float] = []
    pure_ms: list[float] = []
    for step in range(10):
        t = now + step * 60
        t0 = time.perf_counter()
        alerts.evaluate_and_store(now=t)
        timings_ms.append((time.perf_counter() - t0) * 1000)
        values = ts.latest()
        current = alerts.states()
        t0 = time.perf_counter()
        alerts.evaluate(alerts.rules(), values, current, now=t, stale=1e9)
        pure_ms.append((time.perf_counter() - t0) * 1000)
    ours = statistics.median(timings_ms)
    firing = sum(1 for s in alerts.states().values() if s["state"] == "firing")
    client.flushdb()
    return [Row(what=f"alert evaluation, 1,000 series (with Redis reads and writes; {firing}"
                     " firing; baseline: the pure rule evaluation)",
                ours=ours, baseline=statistics.median(pure_ms), unit="ms", target="<= 100 ms",
                ok=ours <= 100)]


def _gc(url: str) -> list[Row]:
    from hms_tasks.celery import app

    peaks: dict[str, tuple[int, int]] = {}
    for label, settings in (("on", f"HMS_TASKS_MEMORY_BUDGET_MB = {BUDGET_MB}\n"),
                            ("off", "HMS_TASKS_MEMORY_BUDGET_MB = 0\n")):
        node = f"bench-gc-{label}@localhost"
        queue = f"bench.gc.{label}"
        with prefork_worker(url=url, node=node, queue=queue, concurrency=1,
                            settings=settings):
            wait_until(lambda n=node: bool(app.control.ping(destination=[n], timeout=0.5)),
                       60, "the worker to answer ping")
            rss: list[int] = []
            pids: set[int] = set()
            for _ in range(LEAK_TASKS):
                got = app.send_task("hms.bench.leaky", kwargs={"leak_mb": 6, "garbage_mb": 16},
                                    queue=queue).get(timeout=60)
                rss.append(got["rss"])
                pids.add(got["pid"])
        peaks[label] = (max(rss), len(pids) - 1)
    (on, recycled), (off, _) = peaks["on"], peaks["off"]
    return [Row(what=f"GC: peak child RSS, {LEAK_TASKS} leaking tasks (6 MiB kept + 16 MiB"
                     f" cyclic garbage each), tiers on ({BUDGET_MB} MiB budget, {recycled}"
                     " recycles) vs off",
                ours=on / 2**20, baseline=off / 2**20, unit="MiB",
                target=f"<= {BUDGET_MB} MiB", ratio=off / on, ok=on <= BUDGET_MB * 2**20)]


def run() -> list[Row]:
    with private_redis() as url:
        django_on(url)
        client = redis.Redis.from_url(url)
        rows = _sample_cost(url)
        rows += _write_throughput(client)
        rows += _memory(client)
        rows += _alerts(client)
        rows += _gc(url)
    return rows
