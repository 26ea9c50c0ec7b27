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

from cryptography.fernet import Fernet

from hms_tasks.errors import ConfigurationError

__all__ = ["DEFAULT_REDIS_URL", "HmsSettings", "get", "home", "reset"]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: Cache TTLs of the product brief; HMS_TASKS_CACHE_TTL overrides kinds one by one.
DEFAULT_TTL = {"patient": 3600, "encounter": 1800, "schedule": 900, "census": 300, "default": 600}


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

    # -- cache --------------------------------------------------------------------------------
    #: Alias in ``CACHES`` of the tag-aware cache (a ``TaggedRedisCache``).
    cache_alias: str = "hms"
    #: Seconds a cached payload lives, per kind (kinds not listed: ``default``).
    cache_ttl: dict[str, int] = dataclasses.field(default_factory=lambda: dict(DEFAULT_TTL))
    #: Fernet keys (urlsafe base64, 32 bytes) encrypting cached values; first one encrypts,
    #: all decrypt. Empty: values are stored in the clear.
    cache_encryption_keys: tuple[str, ...] = ()
    #: How long a read that missed waits for another process already building the same key
    #: before it reads the database itself (milliseconds).
    cache_wait_ms: int = 100
    #: Lease of a key's builder (milliseconds); a fill after it expired is refused.
    cache_lease_ms: int = 5000
    #: A key read this often recently (reads decay by half at every ``warm_hot``) is hot:
    #: re-warmed right after an invalidation.
    cache_hot_score: float = 3.0
    #: Distinct tags a process buffers while Redis or the broker is down; beyond this it
    #: invalidates the whole cache once they are back, rather than grow without bound.
    cache_max_pending_tags: int = 100_000


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
    if not isinstance(s.cache_ttl, dict) or not all(
        isinstance(k, str) and type(v) is int and 1 <= v <= 30 * 86400
        for k, v in s.cache_ttl.items()
    ):
        raise ConfigurationError(
            "HMS_TASKS_CACHE_TTL must map kind names to whole seconds from 1 to 2592000"
        )
    keys = s.cache_encryption_keys
    if isinstance(keys, str) or not all(isinstance(k, str) for k in keys):
        raise ConfigurationError("HMS_TASKS_CACHE_ENCRYPTION_KEYS must be a list of Fernet keys")
    for i, k in enumerate(keys):
        try:
            Fernet(k)
        except (ValueError, TypeError):
            # Never quote the key: it is a secret.
            raise ConfigurationError(
                f"HMS_TASKS_CACHE_ENCRYPTION_KEYS[{i}] is not a Fernet key (32 url-safe"
                " base64-encoded bytes; make one with Fernet.generate_key())"
            ) from None
    for name, low, high in (
        ("cache_wait_ms", 0, 10_000),
        ("cache_lease_ms", 100, 600_000),
        ("cache_max_pending_tags", 100, 10_000_000),
    ):
        value = getattr(s, name)
        if type(value) is not int or not low <= value <= high:
            raise ConfigurationError(
                f"HMS_TASKS_{name.upper()} must be an integer from {low} to {high}"
            )
    if not isinstance(s.cache_hot_score, (int, float)) or s.cache_hot_score <= 0:
        raise ConfigurationError("HMS_TASKS_CACHE_HOT_SCORE must be a positive number")
    return s


@cache
def get() -> HmsSettings:
    """Return the validated settings (cached until :func:`reset`)."""
    from django.conf import settings

    given: dict[str, Any] = {}
    for field in dataclasses.fields(HmsSettings):
        name = f"HMS_TASKS_{field.name.upper()}"
        if hasattr(settings, name):
            value = getattr(settings, name)
            if field.name == "cache_encryption_keys" and isinstance(value, list):
                value = tuple(value)
            if field.name == "cache_ttl" and isinstance(value, dict):
                value = {**DEFAULT_TTL, **value}
            given[field.name] = value
    return _validate(HmsSettings(**given))


def reset(**_: Any) -> None:
    """Drop cached settings; connected to ``setting_changed``."""
    get.cache_clear()
