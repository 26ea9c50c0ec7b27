"""The periodic schedule of hms-tasks, loaded by celery beat through ``HMS_TASKS_BEAT_SCHEDULE``.

Keys are stable kebab-case names (they are contracts: beat keeps state under them). Each entry
says its cadence and why. ``options["expires"]`` defaults to 1.5x the period, so a message that
waited out a worker outage is dropped rather than run late; set it explicitly to differ.
"""

from __future__ import annotations

from typing import Any

BEAT_SCHEDULE: dict[str, dict[str, Any]] = {
    # Every minute: one host snapshot per run; the raw input of the metrics store and alerts.
    "metrics-collect-host": {
        "task": "hms.metrics.collect_host",
        "schedule": 60.0,
    },
}
