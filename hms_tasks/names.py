"""Celery task names and queues: contracts, pinned here and snapshot-tested.

This module imports nothing heavy so that clients (the CLI, a real HMS calling ``send_task``,
beat schedules) can name tasks without importing Celery or Django. Renaming a task here breaks
in-flight messages and beat entries: add a migration note to the README first.
"""

from __future__ import annotations

from hms_tasks.capabilities import CAPABILITIES, queue

__all__ = [
    "ALL_QUEUES",
    "CACHE_FANOUT_CHANGES",
    "CACHE_INVALIDATE_TAGS",
    "CACHE_STATS",
    "CACHE_WARM_HOT",
    "CACHE_WARM_PATIENTS",
    "CAPABILITY_QUEUES",
    "DEFAULT_QUEUE",
    "HEALTH_CHECK_SERVICE",
    "HEALTH_SWEEP",
    "LOADTEST_MERGE",
    "LOADTEST_RUN",
    "LOADTEST_SHARD",
    "MEMORY_SNAPSHOT",
    "MEMORY_SWEEP",
    "MEMORY_SWEEP_NODE",
    "METRICS_COLLECT",
    "METRICS_COLLECT_HOST",
    "METRICS_COLLECT_NODE",
    "METRICS_DELIVER_WEBHOOK",
    "METRICS_EVALUATE_ALERTS",
    "METRICS_ROLLUP",
    "queue_for",
]

# One queue per capability, so a deployment can run dedicated workers per queue.
CAPABILITY_QUEUES: dict[str, str] = {cap: queue(cap) for cap in CAPABILITIES}
# Messages for a task outside every capability (for example a HMS's own task sent through this
# app) land here instead of Celery's implicit "celery" queue, which no hms worker would consume.
DEFAULT_QUEUE = "hms.default"
ALL_QUEUES: tuple[str, ...] = (*CAPABILITY_QUEUES.values(), DEFAULT_QUEUE)

# cache
CACHE_WARM_PATIENTS = "hms.cache.warm_patients"
CACHE_WARM_HOT = "hms.cache.warm_hot"
CACHE_INVALIDATE_TAGS = "hms.cache.invalidate_tags"
CACHE_FANOUT_CHANGES = "hms.cache.fanout_changes"
CACHE_STATS = "hms.cache.stats"

# metrics
METRICS_COLLECT_HOST = "hms.metrics.collect_host"
METRICS_COLLECT = "hms.metrics.collect"
METRICS_COLLECT_NODE = "hms.metrics.collect_node"
METRICS_ROLLUP = "hms.metrics.rollup"
METRICS_EVALUATE_ALERTS = "hms.metrics.evaluate_alerts"
METRICS_DELIVER_WEBHOOK = "hms.metrics.deliver_webhook"

# memory
MEMORY_SWEEP = "hms.memory.sweep"
MEMORY_SWEEP_NODE = "hms.memory.sweep_node"
MEMORY_SNAPSHOT = "hms.memory.snapshot"

# health
HEALTH_SWEEP = "hms.health.sweep"
HEALTH_CHECK_SERVICE = "hms.health.check_service"

# loadtest
LOADTEST_RUN = "hms.loadtest.run"
LOADTEST_SHARD = "hms.loadtest.shard"
LOADTEST_MERGE = "hms.loadtest.merge"


def queue_for(task_name: str) -> str:
    """The queue a task is routed to: ``hms.<capability>.<verb>`` goes to ``hms.<capability>``."""
    parts = task_name.split(".")
    if len(parts) >= 3 and parts[0] == "hms" and parts[1] in CAPABILITY_QUEUES:
        return CAPABILITY_QUEUES[parts[1]]
    return DEFAULT_QUEUE
