"""The service registry (``HMS_TASKS_SERVICES``) as typed, immutable objects, and the allowlist.

:mod:`hms_tasks.health.settings` validates the setting at start-up (errors name the entry and
field) and completes every entry with defaults; this module only wraps the result. The
registry is the allowlist of everything the health capability touches: a sweep, a check, a
breaker, ``pick`` and ``lease`` take a registered service name, and :func:`require_allowed`
refuses any URL whose host and port are not an instance of a registered service.

Instance ids (``host:port`` plus the base path, or a database alias) are stable across
restarts and name the instance's breaker, history and in-flight counts in Redis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from hms_tasks import allowlist
from hms_tasks.errors import UnknownService
from hms_tasks.health import settings as health_settings

__all__ = [
    "BreakerPolicy",
    "Check",
    "CheckType",
    "Instance",
    "Service",
    "get",
    "require_allowed",
    "services",
]

CheckType = Literal["http", "tcp", "redis", "database"]


@dataclass(frozen=True)
class Check:
    """How an instance is checked: an HTTP GET of ``path`` (status in ``expect_status`` and,
    with ``json_field``, that field of the JSON body truthy or equal to ``json_value``), a TCP
    connect, a Redis ``PING`` or a database ``SELECT 1``."""

    type: CheckType
    path: str = ""
    expect_status: tuple[int, ...] = (200,)
    json_field: str | None = None
    has_json_value: bool = False
    json_value: Any = None


@dataclass(frozen=True)
class BreakerPolicy:
    """When a breaker opens and how it recovers (``HMS_TASKS_SERVICES[...]['breaker']``)."""

    #: Failures within ``failure_window`` seconds that open the breaker.
    failure_threshold: int
    failure_window: float
    #: Seconds an open breaker waits before it admits trial calls (half-open).
    reset_timeout: float
    #: Trial calls admitted at once while half-open, across every process.
    half_open_max_calls: int
    #: How many failures a sweep's "down" verdict counts for (0: sweeps do not feed it).
    sweep_failure_weight: int


@dataclass(frozen=True)
class Instance:
    service: str
    #: ``host:port/base-path`` (IPv6 hosts in brackets) or a database alias: stable, unique
    #: within the service, safe to show (no credentials).
    id: str
    #: The configured URL. It may carry a Redis password: never log it, show ``id`` (it is
    #: left out of the repr).
    url: str = field(repr=False)
    scheme: str
    host: str
    port: int
    #: Base path of an HTTP instance without the trailing slash ("" for the root).
    path: str

    @property
    def base_url(self) -> str:
        """``scheme://host:port/base-path`` without credentials (HTTP and TCP instances)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


@dataclass(frozen=True)
class Service:
    name: str
    instances: tuple[Instance, ...]
    check: Check
    #: Seconds one instance's check may take in total, retries included.
    timeout: float
    #: Further attempts after a failed one, within ``timeout``.
    retries: int
    #: Connections a sweep opens to this service at once.
    max_connections: int
    #: An answer slower than this (milliseconds) makes the instance ``degraded``.
    degraded_ms: float
    breaker: BreakerPolicy

    def instance(self, instance_id: str) -> Instance:
        """The instance with this id; :class:`UnknownService` if the service has none."""
        for i in self.instances:
            if i.id == instance_id:
                return i
        raise UnknownService(f"service {self.name!r} has no such instance; instances:"
                             f" {', '.join(i.id for i in self.instances)}")


@dataclass(frozen=True)
class _Registry:
    settings: health_settings.HealthSettings
    services: dict[str, Service]
    #: (host, port) of every instance of every service: the allowlist.
    targets: frozenset[tuple[str, int]]


_current: _Registry | None = None


def _build(settings: health_settings.HealthSettings) -> _Registry:
    out: dict[str, Service] = {}
    for name, e in settings.services.items():
        c = e.check
        check = Check(type=c.type, path=c.path if c.type == "http" else "",
                      expect_status=c.expect_status, json_field=c.json_field,
                      has_json_value=c.has_json_value, json_value=c.json_value)
        instances = tuple(
            Instance(service=name, id=a.id, url=a.url, scheme=a.scheme, host=a.host,
                     port=a.port, path=a.path)
            for a in e.instances
        )
        out[name] = Service(
            name=name, instances=instances, check=check, timeout=e.timeout,
            retries=e.retries, max_connections=e.max_connections, degraded_ms=e.degraded_ms,
            breaker=BreakerPolicy(**e.breaker.model_dump()),
        )
    targets = frozenset(
        (i.host, i.port) for s in out.values() for i in s.instances if i.scheme != "database"
    )
    return _Registry(settings=settings, services=out, targets=targets)


def _registry() -> _Registry:
    global _current
    settings = health_settings.get()
    current = _current
    if current is None or current.settings is not settings:
        current = _current = _build(settings)
    return current


def services() -> dict[str, Service]:
    """Every registered service by name (rebuilt when the settings change)."""
    return _registry().services


def get(name: str) -> Service:
    """The registered service ``name``; :class:`UnknownService` for any other name."""
    found = _registry().services.get(name)
    if found is None:
        raise UnknownService(
            f"unknown service {_shown(name)}; registered in HMS_TASKS_SERVICES:"
            f" {', '.join(sorted(services())) or 'none'}"
        )
    return found


def _shown(name: object) -> str:
    # A service name is configuration, but a caller could pass anything: quote names only.
    text = str(name)
    ok = len(text) <= 40 and text.replace("_", "").replace("-", "").isalnum()
    return repr(text) if ok else "(a name that is no service name)"


def require_allowed(url: str) -> tuple[str, int]:
    """``(host, port)`` of ``url`` if it is an instance of a registered service, else raise
    :class:`UnknownService` (without quoting the URL, which could carry anything)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UnknownService("refused a malformed URL: only registered instances are contacted"
                             ) from None
    try:
        host = allowlist.normalise_host(parts.hostname or "")
    except ValueError:
        raise UnknownService("refused a URL whose host is no address hms-tasks contacts: only"
                             " registered instances are contacted") from None
    if port is None:
        port = {"http": 80, "https": 443, "redis": 6379, "rediss": 6379}.get(parts.scheme, 0)
    if (host, port) not in _registry().targets:
        raise UnknownService(
            "refused a URL whose host and port are no instance of a service in"
            " HMS_TASKS_SERVICES (the allowlist of health checks)"
        )
    return host, port
