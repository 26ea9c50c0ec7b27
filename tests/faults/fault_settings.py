"""Django settings of the processes the fault tests start: the demo settings, with the shortest
visibility timeout hms-tasks accepts (60 s), so a redelivery after a worker's death is quick
enough to measure 20 times in a test, and beat's lock on a short fuse.

With a 60 s visibility timeout the start-up check refuses every acks_late task whose hard time
limit is 60 s or more (cache tasks, the load-test run and merge), and every task whose retries
wait longer than its limit leaves below the timeout (the webhook's 64 s backoff): an annotation
caps those limits in these processes only. The tests run ``hms.test.*`` tasks, never those.
``FAULT_BEAT_SCHEDULE`` names the schedule module (default: the shipped one).
"""

from __future__ import annotations

import os
from typing import Any

from hms_tasks.demo.settings import *  # noqa: F403

HMS_TASKS_VISIBILITY_TIMEOUT = 60
HMS_TASKS_BEAT_SCHEDULE = os.environ.get("FAULT_BEAT_SCHEDULE", "beat_schedule")
CELERY_IMPORTS = ["tests.tasks_for_tests"]
# Beat: a lock of 8 s, polled and extended every second (production: 30 s and 5 s). 3 s was
# too tight on a loaded CI machine: a holder whose tick came 3 s late lost its lock and exited
# (by design: its supervisor restarts it), leaving the test without a publishing beat.
CELERY_REDBEAT_LOCK_TIMEOUT = 8
CELERY_BEAT_MAX_LOOP_INTERVAL = 1


class _BelowVisibilityTimeout:
    """A Celery task annotation: hard limits of acks_late tasks capped at 40 s (soft 30 s),
    which leaves the load-test merge 10 s hops to wait in (60 - 10 margin - 40), and retry
    waits capped at 10 s."""

    def annotate(self, task: Any) -> dict[str, Any] | None:
        changes: dict[str, Any] = {}
        if task.acks_late and (task.time_limit or 0) >= HMS_TASKS_VISIBILITY_TIMEOUT:
            changes.update(time_limit=40, soft_time_limit=30)
        if getattr(task, "autoretry_for", ()) and getattr(task, "retry_backoff", False):
            # What the start-up check reads (Celery's retry wrapper keeps the option the task
            # declared): these processes never run a task that retries with backoff.
            changes["retry_backoff_max"] = 10
        return changes or None

    def annotate_any(self) -> None:
        return None


CELERY_TASK_ANNOTATIONS = [_BelowVisibilityTimeout()]
