"""Settings of the health capability: ``HMS_TASKS_SERVICES`` and ``HMS_TASKS_BREAKER_FAIL_OPEN``.

``HMS_TASKS_SERVICES`` maps a service name to its entry::

    HMS_TASKS_SERVICES = {
        "ehr": {
            "instances": ["https://10.0.4.11:8443", "https://10.0.4.12:8443"],
            "check": {"type": "http", "path": "/healthz", "json_field": "status",
                      "json_value": "ok"},
            "timeout": 2.0, "retries": 1, "max_connections": 10, "degraded_ms": 1000,
            "breaker": {"failure_threshold": 5, "failure_window": 90, "reset_timeout": 30,
                        "half_open_max_calls": 1, "sweep_failure_weight": 2},
        },
    }

Fields left out take :data:`SERVICE_DEFAULTS` and :data:`BREAKER_DEFAULTS`. The library's default
is no service at all: a HMS names the services it wants watched (the demo names its API, its
Redis and its database). An entry of ``None`` is ignored.

Every problem is reported with the entry and field it is in
(``HMS_TASKS_SERVICES['ehr']['timeout']: must be a number of seconds above 0 and at most 10``)
and never quotes a value: an instance URL can carry a password.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    model_validator,
)

from hms_tasks import allowlist, conf

__all__ = [
    "BREAKER_DEFAULTS",
    "SERVICE_DEFAULTS",
    "SWEEP_BUDGET",
    "Address",
    "BreakerSpec",
    "CheckSpec",
    "CheckType",
    "HealthSettings",
    "ServiceEntry",
    "get",
]

CheckType = Literal["http", "tcp", "redis", "database"]
CHECK_TYPES: tuple[str, ...] = ("database", "http", "redis", "tcp")

SERVICE_DEFAULTS: dict[str, Any] = {
    "timeout": 2.0, "retries": 1, "max_connections": 10, "degraded_ms": 1000.0,
}
BREAKER_DEFAULTS: dict[str, Any] = {
    "failure_threshold": 5, "failure_window": 90.0, "reset_timeout": 30.0,
    "half_open_max_calls": 1, "sweep_failure_weight": 2,
}
#: Seconds one sweep may spend on one service (instances / max_connections x timeout).
SWEEP_BUDGET = 20.0

_SERVICE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
_JSON_FIELD_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_]{1,40}$")
_SCHEMES = {"http": ("http", "https"), "tcp": ("tcp",), "redis": ("redis", "rediss")}
_PORTS = {"http": 80, "https": 443, "redis": 6379, "rediss": 6379}
_CHECK_FIELDS = {"http": ("type", "path", "expect_status", "json_field", "json_value"),
                 "tcp": ("type",), "redis": ("type",), "database": ("type",)}


# -- value checks with messages that say what is allowed (and never quote the value) ----------


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(low: int, high: int) -> PlainValidator:
    def check(value: Any) -> int:
        if type(value) is not int or not low <= value <= high:
            raise ValueError(f"must be an integer from {low} to {high}")
        return value

    return PlainValidator(check)


def _above_zero(high: float, unit: str) -> PlainValidator:
    def check(value: Any) -> float:
        if not _number(value) or not 0 < value <= high:
            raise ValueError(f"must be a number of {unit} above 0 and at most {high:g}")
        return float(value)

    return PlainValidator(check)


def _known_fields(allowed: tuple[str, ...], value: Any, what: str) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"must be a dict ({what})")
    unknown = [k for k in value if k not in allowed]
    if unknown:
        # Field names are configuration, but show only names that look like one.
        shown = ", ".join(sorted(k if isinstance(k, str) and _PLAIN_NAME.match(k) else "…"
                                 for k in unknown))
        raise ValueError(f"unknown field {shown}; allowed: {', '.join(allowed)}")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    what: ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _only_known(cls, value: Any) -> Any:
        _known_fields(tuple(cls.model_fields), value, cls.what)
        return value


# -- breaker policy ----------------------------------------------------------------------------


class BreakerSpec(_Model):
    """When a breaker opens and how it recovers (an entry's ``breaker``)."""

    what: ClassVar[str] = "of breaker policy fields"
    #: Failures within ``failure_window`` seconds that open the breaker.
    failure_threshold: Annotated[int, _integer(1, 10_000)] = BREAKER_DEFAULTS["failure_threshold"]
    failure_window: Annotated[float, _above_zero(86_400, "seconds")] = (
        BREAKER_DEFAULTS["failure_window"])
    #: Seconds an open breaker waits before it admits trial calls (half-open).
    reset_timeout: Annotated[float, _above_zero(3600, "seconds")] = (
        BREAKER_DEFAULTS["reset_timeout"])
    #: Trial calls admitted at once while half-open, across every process.
    half_open_max_calls: Annotated[int, _integer(1, 1000)] = (
        BREAKER_DEFAULTS["half_open_max_calls"])
    #: How many failures a sweep's "down" verdict counts for (0: sweeps do not feed it).
    sweep_failure_weight: Annotated[int, _integer(0, 10_000)] = (
        BREAKER_DEFAULTS["sweep_failure_weight"])


# -- check -------------------------------------------------------------------------------------


def _check_shape(value: Any) -> Any:
    if not isinstance(value, dict) or value.get("type", "http") not in CHECK_TYPES:
        raise ValueError(f"must be a dict whose type is one of {', '.join(CHECK_TYPES)}")
    kind = value.get("type", "http")
    extra = [k for k in value if k not in _CHECK_FIELDS[kind]]
    if extra:
        article = "an" if kind == "http" else "a"
        raise ValueError(f"{article} {kind} check takes only {', '.join(_CHECK_FIELDS[kind])}")
    return value


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or value.startswith("//") or any(
            c in value for c in "\\#?@ \t\r\n") or len(value) > 2000:
        raise ValueError("must be an absolute path like /healthz (no query, no '@')")
    return allowlist.normalise_path(value)


def _statuses(value: Any) -> tuple[int, ...]:
    codes = [value] if type(value) is int else value
    if not isinstance(codes, (list, tuple)) or not codes or not all(
            type(c) is int and 100 <= c <= 599 for c in codes):
        raise ValueError("must be an HTTP status or a list of them (100-599)")
    return tuple(codes)


def _json_field(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not _JSON_FIELD_RE.match(value)):
        raise ValueError("must be a dotted field name like status or db.ok")
    return value


def _json_scalar(value: Any) -> str | int | float | bool | None:
    if value is not None and not isinstance(value, (str, int, float, bool)):
        raise ValueError("must be a JSON scalar (string, number, bool, null)")
    return value


class CheckSpec(_Model):
    """How an instance is checked: an HTTP GET of ``path`` (status in ``expect_status`` and,
    with ``json_field``, that field of the JSON body truthy or equal to ``json_value``), a TCP
    connect, a Redis ``PING`` or a database ``SELECT 1``."""

    type: CheckType = "http"
    path: Annotated[str, PlainValidator(_path)] = "/healthz"
    expect_status: Annotated[tuple[int, ...], PlainValidator(_statuses)] = (200,)
    json_field: Annotated[str | None, PlainValidator(_json_field)] = None
    json_value: Annotated[str | int | float | bool | None, PlainValidator(_json_scalar)] = None

    @model_validator(mode="before")
    @classmethod
    def _only_known(cls, value: Any) -> Any:
        return _check_shape(value)

    @model_validator(mode="after")
    def _value_needs_field(self) -> CheckSpec:
        if self.has_json_value and self.json_field is None:
            raise ValueError("json_value needs json_field")
        return self

    @property
    def has_json_value(self) -> bool:
        """Whether ``json_value`` was given (``None`` is a value to compare with, too)."""
        return "json_value" in self.model_fields_set


# -- instances ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """One instance of a service, parsed from its URL (or a database alias)."""

    #: The configured URL: it may carry a Redis password, so it is never shown (not in repr).
    url: str = field(repr=False)
    scheme: str
    host: str
    port: int
    #: Base path of an HTTP instance without the trailing slash ("" for the root).
    path: str
    #: ``host:port/base-path`` (IPv6 hosts in brackets) or a database alias: stable, unique
    #: within the service, safe to show (no credentials).
    id: str


def _instances(value: Any, info: ValidationInfo) -> Any:
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 1000:
        raise ValueError("must be a list of 1 to 1000 base URLs (database aliases for a"
                         " database check)")
    if "check" not in info.data:
        return ()  # the check is wrong (reported): nothing to parse the instances against
    return tuple(value)


def _distinct(value: tuple[Address, ...]) -> tuple[Address, ...]:
    ids = [a.id for a in value]
    if len(set(ids)) != len(ids):
        raise ValueError("lists the same instance (host, port and path) twice")
    return value


def _address(value: Any, info: ValidationInfo) -> Address:
    kind: str = info.data["check"].type
    if kind == "database":
        from django.conf import settings

        if not isinstance(value, str) or value not in settings.DATABASES:
            raise ValueError("a database check's instances are aliases in DATABASES")
        return Address(url=value, scheme="database", host=value, port=0, path="", id=value)
    if not isinstance(value, str) or len(value) > 2000:
        raise ValueError("must be a URL string")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError("is not a valid URL (bad host or port)") from None
    if parts.scheme not in _SCHEMES[kind]:
        article = "an" if kind == "http" else "a"
        schemes = " or ".join(s + "://" for s in _SCHEMES[kind])
        raise ValueError(f"{article} {kind} check takes {schemes} URLs")
    if kind == "http" and "@" in parts.netloc:
        raise ValueError("must not carry credentials")
    host = allowlist.normalise_host(parts.hostname or "")
    # urlsplit drops tabs and newlines silently, and servers read a '\\' as a '/'.
    if any(c <= " " or c == "\x7f" or c == "\\" for c in value):
        raise ValueError("has a space, control character or '\\'")
    if parts.fragment or (parts.query and kind != "redis"):
        raise ValueError("must have no query or fragment")
    if kind == "tcp" and (port is None or parts.path not in ("", "/")):
        raise ValueError("a tcp:// URL needs a port and no path")
    if port is None:
        port = _PORTS[parts.scheme]
    if not 1 <= port <= 65535:
        raise ValueError("has a port outside 1-65535")
    path = allowlist.normalise_path(parts.path).rstrip("/") if kind == "http" else ""
    shown = f"[{host}]" if ":" in host else host
    return Address(url=value, scheme=parts.scheme, host=host, port=port, path=path,
                   id=f"{shown}:{port}{path}")


Instances = Annotated[
    tuple[Annotated[Address, PlainValidator(_address)], ...],
    BeforeValidator(_instances), AfterValidator(_distinct),
]


# -- a service entry ---------------------------------------------------------------------------


class ServiceEntry(_Model):
    """One service of ``HMS_TASKS_SERVICES``, complete (defaults filled in) and parsed."""

    what: ClassVar[str] = "of service fields, or None"
    # Before ``instances``: they are parsed by the check's type.
    check: CheckSpec = Field(default_factory=CheckSpec)
    instances: Instances
    #: Seconds one instance's check may take in total, retries included.
    timeout: Annotated[float, _above_zero(10, "seconds")] = SERVICE_DEFAULTS["timeout"]
    #: Further attempts after a failed one, within ``timeout``.
    retries: Annotated[int, _integer(0, 5)] = SERVICE_DEFAULTS["retries"]
    #: Connections a sweep opens to this service at once.
    max_connections: Annotated[int, _integer(1, 1000)] = SERVICE_DEFAULTS["max_connections"]
    #: An answer slower than this (milliseconds) makes the instance ``degraded``.
    degraded_ms: Annotated[float, _above_zero(60_000, "milliseconds")] = (
        SERVICE_DEFAULTS["degraded_ms"])
    breaker: BreakerSpec = Field(default_factory=BreakerSpec)

    @model_validator(mode="after")
    def _within_budget(self) -> ServiceEntry:
        if math.ceil(len(self.instances) / self.max_connections) * self.timeout > SWEEP_BUDGET:
            raise ValueError(
                f"instances / max_connections x timeout exceeds the sweep's budget of"
                f" {SWEEP_BUDGET:g} s; raise max_connections or lower timeout")
        return self


def _service_name(value: Any) -> str:
    if not isinstance(value, str) or not _SERVICE_RE.match(value):
        raise ValueError("service names are 1 to 40 lower-case letters, digits, '_' or '-',"
                         " starting with a letter")
    return value


def _services(value: Any) -> Any:
    if not isinstance(value, dict):
        raise ValueError("must be a dict of service names to entries")
    return value


def _fail_open(value: Any) -> bool:
    if type(value) is not bool:
        raise ValueError("must be True or False")
    return value


class HealthSettings(conf.Settings):
    """The ``HMS_TASKS_*`` settings of the health capability."""

    #: The services hms-tasks watches, and the allowlist of every health check: service name
    #: to entry. None by default: a HMS names its own.
    services: Annotated[
        dict[Annotated[str, PlainValidator(_service_name)], ServiceEntry],
        BeforeValidator(_services),
    ] = Field(default_factory=dict)
    #: When the breakers' Redis is unreachable: True lets guarded calls through (fail open),
    #: False refuses them with ServiceUnavailable (fail closed).
    breaker_fail_open: Annotated[bool, PlainValidator(_fail_open)] = True

    @classmethod
    def merge(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Entries of ``None`` are left out (settings written when the library shipped default
        services used them to drop one)."""
        out = dict(given)
        services = out.get("services")
        if isinstance(services, dict):
            out["services"] = {k: v for k, v in services.items() if v is not None}
        return out


get = conf.section(HealthSettings)
