"""Metric tasks. Work happens in plain functions (:mod:`hms_tasks.metrics.host`); the tasks here
only adapt them to Celery. Each task runs on the ``hms.metrics`` queue."""

from __future__ import annotations

from typing import Any

from hms_tasks import names
from hms_tasks.base import Capability
from hms_tasks.metrics import host

__all__ = ["collect_host", "metrics"]

metrics = Capability(name="metrics", soft_time_limit=20, time_limit=30)


@metrics.task(names.METRICS_COLLECT_HOST)
def collect_host() -> dict[str, Any]:
    """Snapshot the node this worker runs on (psutil): CPU per core and total, memory, swap,
    disk usage and I/O, network counters, load average, and the worker process's RSS, threads
    and open files.

    When: every minute from beat (``metrics-collect-host``), or ad hoc. Takes about 0.1 s the
    first time in a process, a few ms after. Idempotent (a read-only sample; a re-run just
    takes a newer one). Writes: its run report, whose summary is the sample
    (``<prefix>:report:hms.metrics.collect_host:*``). Returns the sample: counts and
    percentages of the machine, nothing about patients.
    """
    return dict(host.snapshot())
