"""A one-entry schedule for the beat fault tests: a slot every second (expires after 1.5 s)."""

from __future__ import annotations

from typing import Any

PERIOD = 1.0

BEAT_SCHEDULE: dict[str, dict[str, Any]] = {
    "fault-tick": {
        "task": "hms.test.echo",
        "schedule": PERIOD,
        "kwargs": {"count": 1, "ids": []},
    },
}
