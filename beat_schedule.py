"""The periodic schedule of hms-tasks, loaded by celery beat through ``HMS_TASKS_BEAT_SCHEDULE``.

Keys are stable kebab-case names (they are contracts: beat keeps state under them). Each entry
says its cadence and why. ``options["expires"]`` defaults to 1.5x the period, so a message that
waited out a worker outage is dropped rather than run late; set it explicitly to differ.
"""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

BEAT_SCHEDULE: dict[str, dict[str, Any]] = {
    # Every 10 minutes: keep today's and tomorrow's patients, admitted inpatients and the
    # most-read keys warm (and halve every key's heat, so "most read" means recently).
    "cache-warm-hot": {
        "task": "hms.cache.warm_hot",
        "schedule": 600.0,
        "kwargs": {"limit": 5000},
    },
    # 06:00 every day: a full hot warm before morning rounds, when the wards all read at once.
    "cache-warm-morning": {
        "task": "hms.cache.warm_hot",
        "schedule": crontab(hour=6, minute=0),
        "kwargs": {"limit": 50000},
        # A morning warm that waited past 07:00 is no longer worth running.
        "options": {"expires": 3600},
    },
    # Every minute: a safety net for the change log. Recording processes send fanout_changes
    # themselves; this drains whatever a lost task (or a broker outage) left behind.
    "cache-fanout-sweep": {
        "task": "hms.cache.fanout_changes",
        "schedule": 60.0,
    },
    # Every 5 minutes: hit rate per kind, key counts and memory, into the run report.
    "cache-stats": {
        "task": "hms.cache.stats",
        "schedule": 300.0,
    },
    # Every minute: one host snapshot per run; the raw input of the metrics store and alerts.
    "metrics-collect-host": {
        "task": "hms.metrics.collect_host",
        "schedule": 60.0,
    },
}
