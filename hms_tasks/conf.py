"""The ``HMS_TASKS_*`` Django settings: one validated section per capability, plus the core's.

A section is a pydantic model (:class:`Settings`) whose field ``foo_bar`` is the Django setting
``HMS_TASKS_FOO_BAR``; :func:`section` turns it into a cached accessor. Values are read lazily on
first use; every cache is dropped on Django's ``setting_changed`` signal (connected in
``HmsTasksConfig.ready``) so ``override_settings`` works in tests. A wrong value raises
:class:`~hms_tasks.errors.ConfigurationError` naming the setting and field, never the value.
The core's own settings are :class:`CoreSettings` (:func:`get`); each capability declares its
section in ``hms_tasks/<capability>/settings.py``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hms_tasks.errors import ConfigurationError
from hms_tasks.validation import location, problems

__all__ = [
    "DEFAULT_REDIS_URL", "DEMO_SETTINGS", "SETTINGS_DEFAULTED_ENV", "CoreSettings", "Settings",
    "check_all",
    "default_settings_module", "get", "home", "reset", "section",
]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: What ``celery -A hms_tasks`` and ``hms-tasks`` load when DJANGO_SETTINGS_MODULE is unset (a
#: module name only: the library never imports the demo itself).
DEMO_SETTINGS = "hms_tasks.demo.settings"


#: Set to DEMO_SETTINGS when the core fell back to them; the demo settings then log one
#: WARNING in every process that loads them (children inherit the mark and fall back alike).
SETTINGS_DEFAULTED_ENV = "HMS_TASKS_SETTINGS_DEFAULTED"


def default_settings_module() -> None:
    """Fall back to the demo HMS's settings when ``DJANGO_SETTINGS_MODULE`` is unset, marked so
    that each process says so: a real HMS that forgot the variable must not run on a demo
    SQLite file without a word."""
    if not os.environ.get("DJANGO_SETTINGS_MODULE"):
        os.environ["DJANGO_SETTINGS_MODULE"] = DEMO_SETTINGS
        os.environ[SETTINGS_DEFAULTED_ENV] = DEMO_SETTINGS


def home() -> Path:
    """Directory for local state (SQLite file, private Redis, beat state): ``$HMS_TASKS_HOME``.

    Defaults to ``.hms-tasks/`` in the current directory, which is the repository root for
    ``make run`` and ``make test``.
    """
    return Path(os.environ.get("HMS_TASKS_HOME") or Path.cwd() / ".hms-tasks").resolve()


class Settings(BaseModel):
    """Base of a settings section: field ``foo_bar`` is the Django setting ``HMS_TASKS_FOO_BAR``.

    A capability declares its settings once, with defaults and constraints, in its
    ``settings.py``::

        class CacheSettings(conf.Settings):
            cache_wait_ms: Annotated[int, Field(ge=0, le=10_000)] = 100

        get = conf.section(CacheSettings)

    Values are strict (``"5"`` is not an int) and unknown fields are refused. A dict setting
    that merges with its default per key names that field in ``merged`` (one level) or
    overrides :meth:`merge` for anything deeper.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    #: Fields whose given dict is laid over the default dict key by key.
    merged: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def merge(cls, given: dict[str, Any]) -> dict[str, Any]:
        """The given Django settings (field name to value) with partial dicts completed."""
        out = dict(given)
        for name in cls.merged:
            if isinstance(out.get(name), dict):
                default = cls.model_fields[name].get_default(call_default_factory=True)
                out[name] = {**default, **out[name]}
        return out


S = TypeVar("S", bound=Settings)
_SECTIONS: list[Callable[[], Settings]] = []


def setting_name(loc: tuple[Any, ...]) -> str:
    """``('cache_ttl', 'patient')`` -> ``HMS_TASKS_CACHE_TTL['patient']``."""
    if not loc:
        return "HMS_TASKS"
    return f"HMS_TASKS_{str(loc[0]).upper()}{location(loc[1:])}"


def section(cls: type[S]) -> Callable[[], S]:
    """The cached, validated accessor of one settings section (dropped by :func:`reset`)."""

    @cache
    def get_section() -> S:
        from django.conf import settings

        given = {
            name: getattr(settings, f"HMS_TASKS_{name.upper()}")
            for name in cls.model_fields
            if hasattr(settings, f"HMS_TASKS_{name.upper()}")
        }
        try:
            return cls.model_validate(cls.merge(given))
        except ValidationError as exc:
            raise ConfigurationError("; ".join(problems(exc, name=setting_name))) from None

    _SECTIONS.append(get_section)
    return get_section


_PREFIX_RE = re.compile(r"^[a-z][a-z0-9_.-]*$")
_MASTER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(
            c.isspace() or c in "/@;," for c in host):
        raise ValueError("must be host:port")
    return value


class CoreSettings(Settings):
    """The core's settings: Redis, run reports, the schedule, redelivery."""

    #: Redis for run reports and hms-tasks state (defaults to ``$REDIS_URL``).
    redis_url: str = Field(
        default_factory=lambda: os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL)
    #: Prefix of every Redis key hms-tasks writes (not Celery's own keys).
    redis_prefix: Annotated[str, Field(pattern=_PREFIX_RE.pattern, max_length=64)] = "hms"
    #: Run reports kept per task in the capped history list.
    report_history: Annotated[int, Field(ge=1, le=100_000)] = 100
    #: Module (dotted path) whose ``BEAT_SCHEDULE`` dict is the periodic schedule.
    beat_schedule: str = "beat_schedule"
    #: A message redelivered more often than this (its worker died each time) is dropped
    #: with outcome ``poisoned`` instead of killing workers forever.
    max_redeliveries: Annotated[int, Field(ge=0, le=100)] = 3
    #: Seconds after which an unacknowledged message goes back to its queue: a task whose
    #: worker was SIGKILLed runs again within this plus the 10 s restore sweep. Must exceed
    #: every acks_late task's hard time limit with its longest retry wait; countdowns beyond
    #: it less the task's limit are refused when published (start-up checks, HmsCelery).
    visibility_timeout: Annotated[int, Field(ge=60, le=7 * 86400)] = 150
    #: Redis Sentinels (``host:port`` each) that name the master of HMS_TASKS_REDIS_URL: set,
    #: every Redis client (broker, results, beat, the cache, hms-tasks state) asks them for
    #: the master and follows a failover; the URL's host and port are then not used, its
    #: scheme (``rediss://``: TLS), user, password, database and ``ssl_*`` query are.
    redis_sentinels: Annotated[
        Sequence[Annotated[str, AfterValidator(_host_port)]], AfterValidator(tuple),
    ] = ()
    #: The name the sentinels monitor the master under (required with the sentinels).
    redis_sentinel_master: Annotated[str, Field(pattern=_MASTER_RE.pattern)] | None = None
    #: ACL user and password of the sentinels themselves (``requirepass``/``user`` in
    #: sentinel.conf); the master's are those of HMS_TASKS_REDIS_URL.
    redis_sentinel_username: str | None = None
    redis_sentinel_password: str | None = None
    #: Talk to the sentinels over TLS, verified like the master (the URL's ``ssl_*`` query).
    redis_sentinel_tls: bool = False
    #: Seconds each task message published over Sentinel is kept with the master that took
    #: it, to be published again if a failover discards it (:mod:`hms_tasks.outbox`); longer
    #: than a publish retries through a switch (about 35 s). 0 turns the outbox off.
    publish_outbox_seconds: Annotated[float, Field(ge=0, le=3600)] = 60.0

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @model_validator(mode="after")
    def _sentinel_master(self) -> CoreSettings:
        if self.redis_sentinels and self.redis_sentinel_master is None:
            raise ValueError(
                "HMS_TASKS_REDIS_SENTINEL_MASTER must be set when HMS_TASKS_REDIS_SENTINELS is")
        if self.redis_sentinels and self.redis_url.startswith("unix://"):
            raise ValueError("HMS_TASKS_REDIS_URL must be redis:// or rediss:// with sentinels")
        return self


get = section(CoreSettings)


def check_all() -> list[str]:
    """Every problem of every settings section, one line each (the start-up check)."""
    out: list[str] = []
    for accessor in _SECTIONS:
        try:
            accessor()
        except ConfigurationError as exc:
            out.extend(str(exc).split("; "))
    return out


def reset(**_: Any) -> None:
    """Drop cached settings of every section; connected to ``setting_changed``."""
    for accessor in _SECTIONS:
        accessor.cache_clear()  # type: ignore[attr-defined]
