"""Typed access to the ``HMS_TASKS_*`` Django settings, with defaults and validation.

Every setting has one default here and one name (``HMS_TASKS_<FIELD>``). Values are read lazily
on first use and cached; the cache is dropped on Django's ``setting_changed`` signal (connected in
``HmsTasksConfig.ready``) so ``override_settings`` works in tests. A wrong value raises
:class:`~hms_tasks.errors.ConfigurationError` naming the setting.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from hms_tasks.errors import ConfigurationError

__all__ = ["DEFAULT_REDIS_URL", "HmsSettings", "get", "home", "reset"]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def home() -> Path:
    """Directory for local state (SQLite file, private Redis, beat state): ``$HMS_TASKS_HOME``.

    Defaults to ``.hms-tasks/`` in the current directory, which is the repository root for
    ``make run`` and ``make test``.
    """
    return Path(os.environ.get("HMS_TASKS_HOME") or Path.cwd() / ".hms-tasks").resolve()


@dataclass(frozen=True, kw_only=True)
class HmsSettings:
    """The ``HMS_TASKS_*`` settings: attribute ``foo_bar`` is setting ``HMS_TASKS_FOO_BAR``."""

    #: Redis for run reports and hms-tasks state (defaults to ``$REDIS_URL``).
    redis_url: str = dataclasses.field(
        default_factory=lambda: os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    )
    #: Prefix of every Redis key hms-tasks writes (not Celery's own keys).
    redis_prefix: str = "hms"
    #: Run reports kept per task in the capped history list.
    report_history: int = 100
    #: Module (dotted path) whose ``BEAT_SCHEDULE`` dict is the periodic schedule.
    beat_schedule: str = "beat_schedule"
    #: A message redelivered more often than this (its worker died each time) is dropped
    #: with outcome ``poisoned`` instead of killing workers forever.
    max_redeliveries: int = 3
    #: Seconds after which an unacknowledged message goes back to its queue. Must exceed
    #: every task's hard time limit and every countdown (checked at start-up).
    visibility_timeout: int = 3600


_NAME_RE = re.compile(r"^[a-z][a-z0-9_.-]*$")


def _validate(s: HmsSettings) -> HmsSettings:
    if not s.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigurationError(
            "HMS_TASKS_REDIS_URL (or REDIS_URL) must be a redis://, rediss:// or unix:// URL"
        )
    if not _NAME_RE.match(s.redis_prefix):
        raise ConfigurationError(
            "HMS_TASKS_REDIS_PREFIX must be lower-case letters, digits, '_', '-' or '.'"
        )
    for name, low, high in (
        ("report_history", 1, 100_000),
        ("max_redeliveries", 0, 100),
        ("visibility_timeout", 60, 7 * 86400),
    ):
        value = getattr(s, name)
        if type(value) is not int or not low <= value <= high:
            raise ConfigurationError(
                f"HMS_TASKS_{name.upper()} must be an integer from {low} to {high}"
            )
    return s


@cache
def get() -> HmsSettings:
    """Return the validated settings (cached until :func:`reset`)."""
    from django.conf import settings

    given: dict[str, Any] = {}
    for field in dataclasses.fields(HmsSettings):
        name = f"HMS_TASKS_{field.name.upper()}"
        if hasattr(settings, name):
            given[field.name] = getattr(settings, name)
    return _validate(HmsSettings(**given))


def reset(**_: Any) -> None:
    """Drop cached settings; connected to ``setting_changed``."""
    get.cache_clear()
