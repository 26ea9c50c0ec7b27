"""hms.metrics.collect with real worker processes: two nodes report a sample each through their
direct queues, a third that stopped is reported missing; and the node sample itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from hms_tasks import names, nodes, reports
from hms_tasks.metrics import collect
from hms_tasks.metrics import names as metrics_names
from hms_tasks.metrics import store as ts
from tests.helpers import RedisServer, stop, wait_for

REPO = Path(__file__).resolve().parent.parent


def _start(name: str, redis_server: RedisServer, home: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "REDIS_URL": redis_server.url, "HMS_TASKS_HOME": str(home)}
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "hms_tasks", "worker", "--pool", "solo",
         "-Q", names.CAPABILITY_QUEUES["metrics"], "-n", f"{name}@localhost",
         "--without-mingle", "--without-gossip", "--loglevel", "WARNING"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


@pytest.fixture
def three_workers(redis_server: RedisServer,
                  tmp_path: Path) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    procs = {n: _start(n, redis_server, tmp_path) for n in ("alpha", "beta", "gamma")}
    try:
        yield {f"{n}@localhost": p for n, p in procs.items()}
    finally:
        for p in procs.values():
            stop(p)


def _sweep(celery_app: Any) -> dict[str, Any]:
    result = celery_app.send_task(metrics_names.METRICS_COLLECT)
    summary: dict[str, Any] = result.get(timeout=60)
    wait_for(lambda: (s := collect.sweep_status(summary["sweep"])) and s["complete"],
             timeout=60, what="every live node to report")
    return summary


def test_collect_samples_every_node_and_reports_a_stopped_one_missing(
        three_workers: dict[str, subprocess.Popen[bytes]], celery_app: Any) -> None:
    everyone = sorted(three_workers)

    def all_answer() -> bool:
        try:
            return sorted(nodes.live(timeout=0.5)) == everyone
        except redis.ConnectionError:  # a broker connection an earlier test's restart closed
            return False

    wait_for(all_answer, timeout=90, what="three workers to answer a ping")
    first = _sweep(celery_app)
    assert first["nodes"] == everyone
    assert first["missing"] == []

    three_workers["gamma@localhost"].send_signal(signal.SIGTERM)
    three_workers["gamma@localhost"].wait(timeout=30)

    second = _sweep(celery_app)
    assert second["nodes"] == ["alpha@localhost", "beta@localhost"]
    assert second["missing"] == ["gamma@localhost"]
    status = collect.sweep_status(second["sweep"])
    assert status is not None
    assert status["reported"] == ["alpha@localhost", "beta@localhost"]
    assert status["missing"] == ["gamma@localhost"]
    assert status["services_node"] in ("alpha@localhost", "beta@localhost")
    for node in ("alpha@localhost", "beta@localhost"):
        sample = status["samples"][node]
        # A solo worker is its own pool: its main process runs the tasks.
        assert sample["main"]["pid"] == three_workers[node].pid
        assert sample["main"]["rss"] > 0
        assert sample["main"]["threads"] >= 1
        assert sample["main"]["open_files"] > 0
        assert sample["main"]["tasks"] is not None
        assert sample["main"]["tasks"] >= 1
        assert 0 <= sample["cpu_percent"] <= 100
        assert ts.latest()[f"host.memory.percent{{node={node}}}"].value == \
            sample["memory_percent"]
        assert ts.latest()[f"node.up{{node={node}}}"].value == 1.0
    assert ts.latest()["node.up{node=gamma@localhost}"].value == 0.0
    # The shared services were sampled once, by the elected node.
    latest = ts.latest()
    assert "redis.used_memory_bytes" in latest
    assert "celery.queue.depth{queue=hms.metrics}" in latest
    report = reports.latest(metrics_names.METRICS_COLLECT)
    assert report is not None
    assert report["summary"]["missing"] == ["gamma@localhost"]


def test_node_sample_outside_a_worker() -> None:
    summary, points = collect.node_sample("solo@test")
    assert summary["main"]["pid"] == os.getpid()
    assert summary["children"] == []
    names_ = {ts.parse_series(sid)[0] for sid, _, _ in points}
    assert {"host.cpu.percent", "host.memory.percent", "host.disk.percent", "host.load1",
            "host.net.bytes_sent", "worker.rss_bytes", "worker.open_files"} <= names_
    assert all(ts.labels_of(sid) == {"node": "solo@test"} for sid, _, _ in points)
    ts.write(points)  # every point is one the store accepts


@pytest.mark.django_db
def test_services_sample_reads_redis_celery_and_the_database() -> None:
    import time

    doc, points = collect.services_sample(now=time.time(), nodes_expected=[])
    assert doc["redis"]["used_memory"] > 0
    assert doc["redis"]["clients"] >= 1
    assert set(doc["celery"]["queues"]) == set(names.ALL_QUEUES)
    from django.db import connection

    if connection.vendor == "postgresql":
        assert doc["database"]["connections"] >= 1
        assert any(sid == "db.connections" for sid, _, _ in points)
    else:
        assert doc["database"] == {"vendor": connection.vendor, "connections": None}
    ts.write(points)
