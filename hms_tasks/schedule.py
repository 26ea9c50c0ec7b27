"""Loading and checking the periodic schedule (``beat_schedule.py``).

The schedule is a plain dict, ``BEAT_SCHEDULE``, in the module named by ``HMS_TASKS_BEAT_SCHEDULE``
(default: the top-level ``beat_schedule`` module at the repository root, shipped in the wheel as a
top-level module). Each entry is keyed by a stable kebab-case name and holds ``task``,
``schedule`` (seconds, a ``timedelta``, or a Celery ``crontab``/``schedule``), and optionally
``args``, ``kwargs`` and ``options``. Every entry gets ``options["expires"]``, 1.5x its period
unless given: a message beat published while every worker was down must not run hours late, and
never run twice as a backlog drains.
"""

from __future__ import annotations

import importlib
import re
from datetime import timedelta
from typing import Any

from celery.schedules import schedule as celery_schedule

from hms_tasks.errors import ConfigurationError

__all__ = ["load", "period_seconds", "unregistered"]

ENTRY_KEY_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_ALLOWED = {"task", "schedule", "args", "kwargs", "options", "relative"}


def period_seconds(sched: Any) -> float:
    """The period of a schedule in seconds (for crontab: the gap between its next two runs)."""
    if isinstance(sched, (int, float)):
        return float(sched)
    if isinstance(sched, timedelta):
        return sched.total_seconds()
    if isinstance(sched, celery_schedule) and type(sched) is celery_schedule:
        return float(getattr(sched, "run_every").total_seconds())  # noqa: B009  (untyped)
    if hasattr(sched, "remaining_estimate"):
        # remaining_estimate(last_run) answers "how long from *now* until the run after
        # last_run": the difference between the answers for now and for the next run is
        # the gap between two runs.
        now = sched.now()
        to_first = sched.remaining_estimate(now)
        to_second = sched.remaining_estimate(now + to_first + timedelta(seconds=1))
        return max(float((to_second - to_first).total_seconds()), 1.0)
    raise TypeError(type(sched).__name__)


def _normalize(key: str, entry: Any) -> dict[str, Any]:
    where = f"beat schedule entry {key!r}"
    if not isinstance(key, str) or not ENTRY_KEY_RE.match(key):
        raise ConfigurationError(f"{where}: keys are kebab-case, like 'cache-warm-hot'")
    if not isinstance(entry, dict):
        raise ConfigurationError(f"{where}: must be a dict with 'task' and 'schedule'")
    unknown = set(entry) - _ALLOWED
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown fields {sorted(unknown)}; allowed: {sorted(_ALLOWED)}"
        )
    if not isinstance(entry.get("task"), str) or not entry["task"]:
        raise ConfigurationError(f"{where}: 'task' must name a registered task")
    if "schedule" not in entry:
        raise ConfigurationError(f"{where}: has no 'schedule'")
    try:
        period = period_seconds(entry["schedule"])
    except TypeError:
        raise ConfigurationError(
            f"{where}: 'schedule' must be seconds, a timedelta, or a celery schedule/crontab"
        ) from None
    if period <= 0:
        raise ConfigurationError(f"{where}: 'schedule' must be a positive period")
    options = dict(entry.get("options") or {})
    expires = options.setdefault("expires", round(period * 1.5, 3))
    if not isinstance(expires, (int, float)) or expires <= 0:
        raise ConfigurationError(f"{where}: options.expires must be a positive number of seconds")
    if not isinstance(entry.get("args", ()), (list, tuple)):
        raise ConfigurationError(f"{where}: 'args' must be a list")
    if not isinstance(entry.get("kwargs", {}), dict):
        raise ConfigurationError(f"{where}: 'kwargs' must be a dict")
    return {**entry, "options": options}


def load(module: str) -> dict[str, dict[str, Any]]:
    """Import ``module`` and return its ``BEAT_SCHEDULE``, normalized and checked.

    Raises :class:`ConfigurationError` naming the module or the entry at fault.
    """
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ConfigurationError(
            f"HMS_TASKS_BEAT_SCHEDULE: cannot import module {module!r} ({exc})"
        ) from None
    raw = getattr(mod, "BEAT_SCHEDULE", None)
    if not isinstance(raw, dict):
        raise ConfigurationError(f"HMS_TASKS_BEAT_SCHEDULE: {module!r} has no BEAT_SCHEDULE dict")
    return {key: _normalize(key, entry) for key, entry in raw.items()}


def unregistered(entries: dict[str, dict[str, Any]], registered: set[str]) -> list[str]:
    """Problems for entries naming tasks that are not registered, one line each."""
    return [
        f"beat schedule entry {key!r}: task {entry['task']!r} is not registered"
        for key, entry in sorted(entries.items())
        if entry["task"] not in registered
    ]
