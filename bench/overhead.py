"""Per-task overhead of the hms task base (argument check + run report in Redis) against a bare
Celery task: one solo worker drains N queued no-ops of each kind, alternating, same run.

Throughput = N / (time from the worker starting to consume a queue until that queue and the
worker's unacked set are empty). Target: hms throughput at least 0.85 of bare Celery.
"""

from __future__ import annotations

import os
import statistics
import time

import redis

from bench.common import Row, django_on, private_redis, wait_until, worker_process

N = int(os.environ.get("BENCH_OVERHEAD_N", "2000"))
ROUNDS = int(os.environ.get("BENCH_OVERHEAD_ROUNDS", "3"))
NODE = "bench-overhead@localhost"


def _drain(app: object, client: redis.Redis, task_name: str, queue: str) -> float:
    """Queue N messages for ``task_name`` on ``queue``, let the worker consume it, time it."""
    from hms_tasks.celery import app as celery_app

    with celery_app.producer_or_acquire() as producer:
        for _ in range(N):
            celery_app.send_task(task_name, queue=queue, producer=producer)
    assert client.llen(queue) == N
    t0 = time.perf_counter()
    celery_app.control.add_consumer(queue, destination=[NODE], reply=True, timeout=10)
    wait_until(lambda: client.llen(queue) == 0 and client.hlen("unacked") == 0, 300,
               f"{queue} to drain")
    elapsed = time.perf_counter() - t0
    celery_app.control.cancel_consumer(queue, destination=[NODE], reply=True, timeout=10)
    return N / elapsed


def run() -> list[Row]:
    with private_redis() as url:
        app = django_on(url)
        client = redis.Redis.from_url(url)
        with worker_process(redis_url=url, include="bench.overhead_tasks",
                            queues="bench.idle", node=NODE):
            wait_until(lambda: bool(app.control.ping(destination=[NODE], timeout=0.5)), 60,
                       "the worker to answer ping")
            bare: list[float] = []
            ours: list[float] = []
            _drain(app, client, "bench.bare_noop", "bench.warmup")  # imports, connections
            for _ in range(ROUNDS):
                bare.append(_drain(app, client, "bench.bare_noop", "bench.bare"))
                ours.append(_drain(app, client, "hms.bench.noop", "bench.hms"))
        reports = client.llen("hms:report:hms.bench.noop:history")
    assert reports > 0, "the hms no-op wrote no run reports"
    b, o = statistics.median(bare), statistics.median(ours)
    return [Row(what=f"no-op throughput, 1 solo worker ({N} tasks x {ROUNDS}, median)",
                ours=o, baseline=b, unit="tasks/s", target=">= 0.85", ratio=o / b,
                ok=o / b >= 0.85)]
