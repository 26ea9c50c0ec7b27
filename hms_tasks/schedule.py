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
from datetime import date, datetime, timedelta
from typing import Any

from celery.schedules import crontab
from celery.schedules import schedule as celery_schedule

from hms_tasks.errors import ConfigurationError

__all__ = ["load", "period_seconds", "unregistered"]

ENTRY_KEY_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_ALLOWED = {"task", "schedule", "args", "kwargs", "options", "relative"}


def period_seconds(sched: Any) -> float:
    """The period of a schedule in seconds; for a crontab, the shortest gap between its runs."""
    if isinstance(sched, (int, float)) and not isinstance(sched, bool):
        return float(sched)
    if isinstance(sched, timedelta):
        return sched.total_seconds()
    if isinstance(sched, crontab):
        return _crontab_gap(sched)
    if type(sched) is celery_schedule:
        return float(getattr(sched, "run_every").total_seconds())  # noqa: B009  (untyped)
    raise TypeError(type(sched).__name__)


def _crontab_gap(sched: Any) -> float:
    # Walk a fixed stretch of calendar (a year and a bit, enough for monthly schedules and
    # February) and take the shortest gap between the first thousand runs. Celery's own
    # remaining_estimate() would ask the app for its time zone, that is for the very
    # configuration this function helps to build.
    # (The crontab's expanded fields are sets of ints, untyped in celery-types.)
    day = date(2026, 1, 1)
    previous: datetime | None = None
    shortest: float | None = None
    runs = 0
    for _ in range(400):
        if (day.month in sched.month_of_year and day.day in sched.day_of_month
                and (day.weekday() + 1) % 7 in sched.day_of_week):
            for hour in sorted(sched.hour):
                for minute in sorted(sched.minute):
                    t = datetime(day.year, day.month, day.day, hour, minute)  # noqa: DTZ001
                    if previous is not None:
                        gap = (t - previous).total_seconds()
                        shortest = gap if shortest is None else min(shortest, gap)
                    previous = t
                    runs += 1
            if runs >= 1000:
                break
        day += timedelta(days=1)
    if shortest is None:
        raise TypeError("a crontab that does not run twice within a year")
    return shortest


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
