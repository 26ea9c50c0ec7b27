"""Tasks of the metrics benchmark (not shipped: workers load them with
``--include bench.metrics_tasks``)."""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

from hms_tasks.base import Capability
from hms_tasks.memory.tiers import current_rss
from hms_tasks.metrics import collect

bench = Capability(name="bench", soft_time_limit=50, time_limit=60)

_leaked: list[bytes] = []


def bare_psutil_snapshot() -> tuple[Any, ...]:
    """The psutil calls a host sample needs, and nothing else: the baseline."""
    proc = psutil.Process()
    with proc.oneshot():
        mem = proc.memory_info()
        threads = proc.num_threads()
        fds = proc.num_fds()
    return (psutil.cpu_percent(interval=None, percpu=True), psutil.virtual_memory(),
            psutil.swap_memory(), psutil.disk_usage("/"), psutil.disk_io_counters(),
            psutil.net_io_counters(), os.getloadavg(), mem, threads, fds)


@bench.task("hms.bench.sample_cost")
def sample_cost(n: int) -> dict[str, Any]:
    """CPU ms per node sample (host + every pool process + points) and per bare psutil
    snapshot, measured alternately in this pool child."""
    from hms_tasks import nodes

    node = nodes.current()
    collect.node_sample(node)  # warm up: psutil primes its CPU counters, imports settle
    bare_psutil_snapshot()
    ours = bare = 0.0
    children = 0
    for _ in range(n):
        t0 = time.process_time()
        summary, _ = collect.node_sample(node)
        t1 = time.process_time()
        bare_psutil_snapshot()
        t2 = time.process_time()
        ours += t1 - t0
        bare += t2 - t1
        children = len(summary["children"])
    return {"ours_ms": ours * 1000 / n, "bare_ms": bare * 1000 / n, "children": children}


@bench.task("hms.bench.leaky")
def leaky(leak_mb: int, garbage_mb: int) -> dict[str, Any]:
    """A task that leaks ``leak_mb`` (kept for good) and leaves ``garbage_mb`` in reference
    cycles of a few large objects (freed only by the cyclic collector)."""
    _leaked.append(os.urandom(1024) * (1024 * leak_mb))
    for _ in range(garbage_mb // 4):
        a: dict[str, Any] = {"buf": os.urandom(1024) * 4096}
        b: dict[str, Any] = {"a": a}
        a["b"] = b
    return {"pid": os.getpid(), "rss": current_rss()}
