"""Celery queues: one per capability (``hms.<capability>``) plus ``hms.default``; contracts.

Task names live with their capability (``hms_tasks.<capability>.names``), import-light, so that
clients (a real HMS calling ``send_task``, beat schedules) name tasks without importing Celery
or Django; the registered set is snapshot-tested. Renaming a task or a queue breaks in-flight
messages and beat entries: add a migration note to ``docs/migrations.md`` first.
"""

from __future__ import annotations

from hms_tasks.capabilities import CAPABILITIES, queue

__all__ = ["ALL_QUEUES", "CAPABILITY_QUEUES", "DEFAULT_QUEUE", "queue_for"]

# One queue per capability, so a deployment can run dedicated workers per queue.
CAPABILITY_QUEUES: dict[str, str] = {cap: queue(cap) for cap in CAPABILITIES}
# Messages for a task outside every capability (for example a HMS's own task sent through this
# app) land here instead of Celery's implicit "celery" queue, which no hms worker would consume.
DEFAULT_QUEUE = "hms.default"
ALL_QUEUES: tuple[str, ...] = (*CAPABILITY_QUEUES.values(), DEFAULT_QUEUE)


def queue_for(task_name: str) -> str:
    """The queue a task is routed to: ``hms.<capability>.<verb>`` goes to ``hms.<capability>``."""
    parts = task_name.split(".")
    if len(parts) >= 3 and parts[0] == "hms" and parts[1] in CAPABILITY_QUEUES:
        return CAPABILITY_QUEUES[parts[1]]
    return DEFAULT_QUEUE
