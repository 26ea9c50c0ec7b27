"""Typed access to the ``HMS_TASKS_*`` Django settings, with defaults and validation.

Every setting has one default here and one name (``HMS_TASKS_<FIELD>``). Values are read lazily
on first use and cached; the cache is dropped on Django's ``setting_changed`` signal (connected in
``HmsTasksConfig.ready``) so ``override_settings`` works in tests. A wrong value raises
:class:`~hms_tasks.errors.ConfigurationError` naming the setting.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

from cryptography.fernet import Fernet
from pydantic import BaseModel, ConfigDict, ValidationError

from hms_tasks.allowlist import parse_url, url_allowed
from hms_tasks.errors import ConfigurationError
from hms_tasks.validation import location, problems

__all__ = [
    "DEFAULT_REDIS_URL", "HmsSettings", "Settings", "check_all", "get", "home", "reset", "section",
]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: Cache TTLs of the product brief; HMS_TASKS_CACHE_TTL overrides kinds one by one.
DEFAULT_TTL = {"patient": 3600, "encounter": 1800, "schedule": 900, "census": 300, "default": 600}
#: The eight services of the product brief, at loopback placeholders (ports 8101-8108) that a
#: deployment overrides: HMS_TASKS_SERVICES merges with these per service and per field, and
#: ``None`` drops a default service. Fields left out take SERVICE_DEFAULTS / BREAKER_DEFAULTS.
DEFAULT_SERVICES: dict[str, dict[str, Any]] = {
    name: {"instances": [f"http://127.0.0.1:{8101 + i}"],
           "check": {"type": "http", "path": "/healthz"}}
    for i, name in enumerate(("patient", "ehr", "appointment", "billing", "pharmacy",
                              "laboratory", "imaging", "notification"))
}
SERVICE_DEFAULTS: dict[str, Any] = {
    "timeout": 2.0, "retries": 1, "max_connections": 10, "degraded_ms": 1000.0,
}
BREAKER_DEFAULTS: dict[str, Any] = {
    "failure_threshold": 5, "failure_window": 90.0, "reset_timeout": 30.0,
    "half_open_max_calls": 1, "sweep_failure_weight": 2,
}
#: Seconds one sweep may spend on one service (instances / max_connections x timeout).
SWEEP_BUDGET = 20.0
#: Seconds the metrics store keeps raw points and 1-minute and 1-hour aggregates.
DEFAULT_METRICS_RETENTION = {"raw": 86400, "1m": 30 * 86400, "1h": 30 * 86400}
#: Alert rules of the product brief (CPU 80 %, memory 85 %, API p95 2,000 ms, API error rate
#: 5 %) plus queue backlog, Redis evictions and a node that stopped answering.
#: HMS_TASKS_ALERT_RULES merges with these per rule and per field; ``None`` drops a rule.
#: ``clear`` is the hysteresis: a firing alert resolves only once the value is back at or past
#: it (and stayed there ``clear_for`` seconds); ``for`` is how long a breach must last to fire.
DEFAULT_ALERT_RULES: dict[str, dict[str, Any]] = {
    "cpu_high": {"series": "host.cpu.percent", "op": ">", "threshold": 80, "clear": 70,
                 "for": 300, "clear_for": 300, "severity": "warning"},
    "memory_high": {"series": "host.memory.percent", "op": ">", "threshold": 85, "clear": 80,
                    "for": 300, "clear_for": 300, "severity": "warning"},
    "api_p95_slow": {"series": "api.duration_p95_ms", "op": ">", "threshold": 2000,
                     "clear": 1500, "for": 300, "clear_for": 300, "severity": "critical"},
    "api_error_rate": {"series": "api.error_rate", "op": ">", "threshold": 5, "clear": 2,
                       "for": 300, "clear_for": 300, "severity": "critical"},
    "queue_backlog": {"series": "celery.queue.depth", "op": ">", "threshold": 1000,
                      "clear": 200, "for": 600, "clear_for": 300, "severity": "warning"},
    "redis_evictions": {"series": "redis.evictions_per_s", "op": ">", "threshold": 0,
                        "clear": 0, "for": 0, "clear_for": 900, "severity": "warning"},
    "node_down": {"series": "node.up", "op": "<", "threshold": 1, "clear": 1, "for": 120,
                  "clear_for": 0, "severity": "critical"},
    # A load test ran slower than the previous run of the same test (1 on a regression, 0
    # otherwise, written by hms.loadtest.merge): fires at once, resolves with the next run
    # that does not regress.
    "loadtest_regression": {"series": "loadtest.regression", "op": ">", "threshold": 0,
                            "clear": 0, "for": 0, "clear_for": 0, "severity": "warning"},
}
#: Memory tiers of a worker's pool child, in percent of its budget (HMS_TASKS_MEMORY_BUDGET_MB).
DEFAULT_MEMORY_TIERS = {"warning": 80, "critical": 90, "emergency": 95}
#: Bounds of the load-test settings: the shard task's hard time limit is derived from them and
#: must stay below the visibility timeout (a start-up check).
LOADTEST_MAX_DURATION_CAP = 1800
LOADTEST_MAX_GRACE = 60
LOADTEST_MAX_START_DELAY = 30


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
    #: Seconds after which an unacknowledged message goes back to its queue: a task whose
    #: worker was SIGKILLed runs again within this plus the 10 s restore sweep. Must exceed
    #: every acks_late task's hard time limit (checked at start-up) and, with it, every
    #: countdown (checked when published).
    visibility_timeout: int = 150

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

    # -- health -------------------------------------------------------------------------------
    #: The services hms-tasks watches, and the allowlist of every health check: service name
    #: to entry (instances, check, timeout, retries, max_connections, degraded_ms, breaker).
    #: After validation every entry is complete and its instances parsed (see _services).
    services: dict[str, dict[str, Any]] = dataclasses.field(
        default_factory=lambda: copy.deepcopy(DEFAULT_SERVICES)
    )
    #: When the breakers' Redis is unreachable: True lets guarded calls through (fail open),
    #: False refuses them with ServiceUnavailable (fail closed).
    breaker_fail_open: bool = True

    # -- metrics and alerts -------------------------------------------------------------------
    #: Seconds the metrics store keeps each kind of point: ``raw``, ``1m`` and ``1h``
    #: aggregates (min, max, mean, count). Merged with DEFAULT_METRICS_RETENTION.
    metrics_retention: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_METRICS_RETENTION)
    )
    #: A series whose newest point is older than this many seconds is not current: the
    #: Prometheus exporter leaves it out and alert rules see no value for it.
    metrics_stale_seconds: int = 600
    #: Seconds a sweep (hms.metrics.collect, hms.memory.sweep) waits for nodes to answer.
    metrics_ping_timeout: float = 1.0
    #: A node not seen for this many seconds is dropped from the registry of known nodes
    #: (until then a sweep reports it missing).
    metrics_forget_node_after: int = 7 * 86400
    #: Alert rules (see DEFAULT_ALERT_RULES); after validation every rule is complete.
    alert_rules: dict[str, dict[str, Any]] = dataclasses.field(
        default_factory=lambda: copy.deepcopy(DEFAULT_ALERT_RULES)
    )
    #: Webhooks alert notifications are posted to: name -> URL. Every URL must be allowed by
    #: HMS_TASKS_WEBHOOK_ALLOWLIST (checked at start-up and again before each request).
    alert_webhooks: dict[str, str] = dataclasses.field(default_factory=dict)
    #: URLs webhooks may be sent to: exact URLs, or prefixes at a path boundary.
    webhook_allowlist: tuple[str, ...] = ()
    #: Seconds one webhook request may take.
    webhook_timeout: float = 5.0

    # -- memory -------------------------------------------------------------------------------
    #: Memory budget of one worker pool child in MiB; 0 turns the GC tiers off. Celery's
    #: ``worker_max_memory_per_child`` defaults to its emergency tier, so billiard replaces a
    #: child after the task that took it past. (A CELERY_WORKER_MAX_MEMORY_PER_CHILD that is
    #: set explicitly wins, and the budget is derived from it.)
    memory_budget_mb: int = 1024
    #: Tiers in percent of the budget: ``warning`` (collect the young generations),
    #: ``critical`` (full collection, process-local state cleared, heap trimmed),
    #: ``emergency`` (the child is replaced after its current task).
    memory_tiers: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_MEMORY_TIERS)
    )
    #: Seconds before the same tier's action repeats in the same process (escalations act
    #: at once).
    memory_cooldown: int = 30

    # -- load tests ---------------------------------------------------------------------------
    #: The only targets load tests may hit: target id -> base URL (http or https). Tests name
    #: ids; a URL where an id is expected is refused.
    loadtest_targets: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Named test definitions (see hms_tasks.loadtest.spec), run by name from the CLI, Flower
    #: or beat: test name -> definition (its "name" is the key).
    loadtest_tests: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    #: The test the nightly beat entry (loadtest-nightly) runs; None: the entry does nothing.
    loadtest_nightly: str | None = None
    #: Limits of every test: users over all shards, seconds of load, shards.
    loadtest_max_users: int = 1000
    loadtest_max_duration: int = LOADTEST_MAX_DURATION_CAP
    loadtest_max_shards: int = 16
    #: Seconds from dispatch to the common start instant of a run's shards.
    loadtest_start_delay: float = 5.0
    #: Seconds past a run's end after which its shards are stopped whatever happens, and its
    #: results merged with whatever shards reported.
    loadtest_grace: int = 15
    #: A run whose p95 rose, or whose requests per second fell, by more than this fraction
    #: against the previous run of the same test is flagged as a regression.
    loadtest_regression_tolerance: float = 0.2
    #: Directory user locustfiles must live in (scenario {"locustfile": path}).
    loadtest_scenarios_dir: str = dataclasses.field(
        default_factory=lambda: str(home() / "loadtest-scenarios"))
    #: Directory the merge writes HTML reports to (<run id>.html).
    loadtest_reports_dir: str = dataclasses.field(
        default_factory=lambda: str(home() / "loadtest-reports"))
    #: Days runs and reports stay in Redis.
    loadtest_keep_days: int = 30
    #: Keep every request's raw response time in <reports dir>/<run id>/shard-<i>.raw (audits
    #: and tests; large).
    loadtest_keep_raw: bool = False


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
    s = _metrics_and_memory(s)
    s = _loadtest(s)
    if type(s.breaker_fail_open) is not bool:
        raise ConfigurationError("HMS_TASKS_BREAKER_FAIL_OPEN must be True or False")
    return dataclasses.replace(s, services=_services(s.services))


# -- HMS_TASKS_SERVICES ------------------------------------------------------------------------

_SERVICE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_JSON_FIELD_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_SCHEMES = {"http": ("http", "https"), "tcp": ("tcp",), "redis": ("redis", "rediss")}
_PORTS = {"http": 80, "https": 443, "redis": 6379, "rediss": 6379}
_ENTRY_FIELDS = {"instances", "check", *SERVICE_DEFAULTS, "breaker"}
_CHECK_FIELDS = {"http": {"type", "path", "expect_status", "json_field", "json_value"},
                 "tcp": {"type"}, "redis": {"type"}, "database": {"type"}}


def _merge_services(given: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = copy.deepcopy(DEFAULT_SERVICES)
    for name, entry in given.items():
        if entry is None:
            merged.pop(name, None)
        elif isinstance(entry, dict) and isinstance(merged.get(name), dict):
            merged[name] = {**merged[name], **entry}
        else:
            merged[name] = entry
    return merged


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _services(raw: Any) -> dict[str, dict[str, Any]]:
    """Validate HMS_TASKS_SERVICES; return complete entries with parsed instances.

    Errors name the entry and field (``HMS_TASKS_SERVICES['ehr'].timeout``) and never quote a
    value: an instance URL can carry a password.
    """
    if not isinstance(raw, dict):
        raise ConfigurationError("HMS_TASKS_SERVICES must be a dict of service names to entries")
    out: dict[str, dict[str, Any]] = {}
    for name, entry in raw.items():
        if not isinstance(name, str) or not _SERVICE_RE.match(name):
            raise ConfigurationError(
                "HMS_TASKS_SERVICES: service names are 1 to 40 lower-case letters, digits,"
                " '_' or '-', starting with a letter"
            )
        out[name] = _service(name, entry)
    return out


def _service(name: str, entry: Any) -> dict[str, Any]:
    where = f"HMS_TASKS_SERVICES[{name!r}]"

    def bad(field: str, why: str) -> ConfigurationError:
        return ConfigurationError(f"{where}.{field}: {why}")

    if not isinstance(entry, dict):
        raise ConfigurationError(f"{where}: must be a dict (or None to drop a default service)")
    unknown = set(entry) - _ENTRY_FIELDS
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown fields {sorted(map(str, unknown))}; allowed: {sorted(_ENTRY_FIELDS)}"
        )
    e = {**SERVICE_DEFAULTS, **entry}
    check = _check(e.get("check", {"type": "http", "path": "/healthz"}), bad)
    timeout, retries, conns, slow = e["timeout"], e["retries"], e["max_connections"], e[
        "degraded_ms"]
    if not _number(timeout) or not 0 < timeout <= 10:
        raise bad("timeout", "must be a number of seconds above 0 and at most 10")
    if type(retries) is not int or not 0 <= retries <= 5:
        raise bad("retries", "must be an integer from 0 to 5")
    if type(conns) is not int or not 1 <= conns <= 1000:
        raise bad("max_connections", "must be an integer from 1 to 1000")
    if not _number(slow) or not 0 < slow <= 60_000:
        raise bad("degraded_ms", "must be a number of milliseconds above 0 and at most 60000")
    texts = e.get("instances")
    if not isinstance(texts, list) or not 1 <= len(texts) <= 1000:
        raise bad("instances", "must be a list of 1 to 1000 base URLs")
    instances = [_instance(check["type"], t, lambda why, i=i: bad(f"instances[{i}]", why))
                 for i, t in enumerate(texts)]
    ids = [i["id"] for i in instances]
    if len(set(ids)) != len(ids):
        raise bad("instances", "lists the same instance (host, port and path) twice")
    if math.ceil(len(instances) / conns) * timeout > SWEEP_BUDGET:
        raise ConfigurationError(
            f"{where}: instances / max_connections x timeout exceeds the sweep's budget of"
            f" {SWEEP_BUDGET:g} s; raise max_connections or lower timeout"
        )
    breaker = e.get("breaker", {})
    if not isinstance(breaker, dict) or set(breaker) - set(BREAKER_DEFAULTS):
        raise bad("breaker", f"must be a dict with fields from {sorted(BREAKER_DEFAULTS)}")
    b = {**BREAKER_DEFAULTS, **breaker}
    for field, low, high in (("failure_threshold", 1, 10_000), ("half_open_max_calls", 1, 1000),
                             ("sweep_failure_weight", 0, 10_000)):
        if type(b[field]) is not int or not low <= b[field] <= high:
            raise bad(f"breaker.{field}", f"must be an integer from {low} to {high}")
    for field, high in (("failure_window", 86_400), ("reset_timeout", 3600)):
        if not _number(b[field]) or not 0 < b[field] <= high:
            raise bad(f"breaker.{field}", f"must be a number of seconds above 0 and at most {high}")
    return {"instances": instances, "check": check, "timeout": float(timeout),
            "retries": retries, "max_connections": conns, "degraded_ms": float(slow),
            "breaker": {**b, "failure_window": float(b["failure_window"]),
                        "reset_timeout": float(b["reset_timeout"])}}


def _check(check: Any, bad: Any) -> dict[str, Any]:
    if not isinstance(check, dict) or check.get("type") not in _CHECK_FIELDS:
        raise bad("check", f"must be a dict whose type is one of {sorted(_CHECK_FIELDS)}")
    kind = check["type"]
    unknown = set(check) - _CHECK_FIELDS[kind]
    if unknown:
        raise bad("check", f"a {kind} check takes only {sorted(_CHECK_FIELDS[kind])}")
    if kind != "http":
        return {"type": kind}
    path = check.get("path", "/healthz")
    if not isinstance(path, str) or not path.startswith("/") or path.startswith("//") or any(
            c in path for c in "\\#?@ \t\r\n"):
        raise bad("check.path", "must be an absolute path like /healthz (no query, no '@')")
    status = check.get("expect_status", [200])
    status = [status] if type(status) is int else status
    if not isinstance(status, list) or not status or not all(
            type(c) is int and 100 <= c <= 599 for c in status):
        raise bad("check.expect_status", "must be an HTTP status or a list of them (100-599)")
    field = check.get("json_field")
    if field is not None and (not isinstance(field, str) or not _JSON_FIELD_RE.match(field)):
        raise bad("check.json_field", "must be a dotted field name like status or db.ok")
    out: dict[str, Any] = {"type": "http", "path": path, "expect_status": status,
                           "json_field": field}
    if "json_value" in check:
        if field is None:
            raise bad("check.json_value", "needs check.json_field")
        value = check["json_value"]
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise bad("check.json_value", "must be a JSON scalar (string, number, bool, null)")
        out["json_value"] = value
    return out


def _instance(kind: str, text: Any, bad: Any) -> dict[str, Any]:
    """One instance, parsed: ``{"url", "scheme", "host", "port", "path", "id"}``."""
    if kind == "database":
        from django.conf import settings

        if not isinstance(text, str) or text not in settings.DATABASES:
            raise bad("a database check's instances are aliases in DATABASES")
        return {"url": text, "scheme": "database", "host": text, "port": 0, "path": "",
                "id": text}
    if not isinstance(text, str) or len(text) > 2000:
        raise bad("must be a URL string")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise bad("is not a valid URL (bad host or port)") from None
    if parts.scheme not in _SCHEMES[kind]:
        raise bad(f"a {kind} check takes {' or '.join(s + '://' for s in _SCHEMES[kind])} URLs")
    host = parts.hostname or ""
    if not host:
        raise bad("has no host")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if not _HOSTNAME_RE.match(host):
            raise bad("has a host that is neither an IP address nor a DNS name") from None
        host = host.lower()
    if parts.fragment or (parts.query and kind != "redis"):
        raise bad("must have no query or fragment")
    if kind == "http" and (parts.username is not None or parts.password is not None):
        raise bad("must not carry credentials")
    if kind == "tcp" and (port is None or parts.path not in ("", "/")):
        raise bad("a tcp:// URL needs a port and no path")
    if port is None:
        port = _PORTS[parts.scheme]
    if not 1 <= port <= 65535:
        raise bad("has a port outside 1-65535")
    path = parts.path.rstrip("/") if kind == "http" else ""
    shown = f"[{host}]" if ":" in host else host
    return {"url": text, "scheme": parts.scheme, "host": host, "port": port, "path": path,
            "id": f"{shown}:{port}{path}"}


# -- metrics, alerts, memory --------------------------------------------------------------------

_RULE_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_SERIES_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")
_RULE_FIELDS = {"series", "op", "threshold", "clear", "for", "clear_for", "labels", "severity"}
_RETENTION_LIMITS = {"raw": (3600, 7 * 86400), "1m": (3600, 90 * 86400),
                     "1h": (86400, 400 * 86400)}


def _merge_rules(given: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = copy.deepcopy(DEFAULT_ALERT_RULES)
    for name, rule in given.items():
        if rule is None:
            merged.pop(name, None)
        elif isinstance(rule, dict) and isinstance(merged.get(name), dict):
            base = dict(merged[name])
            if "threshold" in rule and "clear" not in rule:
                base.pop("clear", None)  # derived again from the new threshold
            merged[name] = {**base, **rule}
        else:
            merged[name] = rule
    return merged


def _percent_series(name: str) -> bool:
    return name.endswith("percent") or name.endswith("error_rate")


def _alert_rule(name: Any, rule: Any) -> dict[str, Any]:
    if not isinstance(name, str) or not _RULE_NAME_RE.match(name):
        raise ConfigurationError(
            "HMS_TASKS_ALERT_RULES: rule names are lower-case letters, digits and '_'"
        )
    where = f"HMS_TASKS_ALERT_RULES[{name!r}]"
    if not isinstance(rule, dict):
        raise ConfigurationError(f"{where}: must be a dict (or None to drop a default rule)")
    unknown = set(rule) - _RULE_FIELDS
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown fields {sorted(map(str, unknown))}; allowed: {sorted(_RULE_FIELDS)}"
        )
    series = rule.get("series")
    if not isinstance(series, str) or len(series) > 128 or not _SERIES_NAME_RE.match(series):
        raise ConfigurationError(f"{where}['series']: must name a series like host.cpu.percent")
    op = rule.get("op", ">")
    if op not in (">", "<"):
        raise ConfigurationError(f"{where}['op']: must be '>' or '<'")
    high = 100.0 if _percent_series(series) else 1e15
    unit = " (a percentage)" if high == 100 else ""
    threshold: Any = rule.get("threshold")
    if not _number(threshold) or not 0 <= threshold <= high:
        raise ConfigurationError(
            f"{where}['threshold']: must be a number from 0 to {high:g}{unit}"
        )
    clear: Any = rule.get("clear", threshold)
    if not _number(clear) or not 0 <= clear <= high:
        raise ConfigurationError(f"{where}['clear']: must be a number from 0 to {high:g}{unit}")
    if (op == ">" and clear > threshold) or (op == "<" and clear < threshold):
        side = "at or below" if op == ">" else "at or above"
        raise ConfigurationError(
            f"{where}['clear']: must be {side} the threshold (it is the hysteresis)"
        )
    for_s = rule.get("for", 0)
    if type(for_s) is not int or not 0 <= for_s <= 86400:
        raise ConfigurationError(f"{where}['for']: must be whole seconds from 0 to 86400")
    clear_for = rule.get("clear_for", for_s)
    if type(clear_for) is not int or not 0 <= clear_for <= 86400:
        raise ConfigurationError(f"{where}['clear_for']: must be whole seconds from 0 to 86400")
    labels = rule.get("labels") or {}
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ConfigurationError(f"{where}['labels']: must map label names to values")
    severity = rule.get("severity", "warning")
    if severity not in ("warning", "critical"):
        raise ConfigurationError(f"{where}['severity']: must be 'warning' or 'critical'")
    return {"series": series, "op": op, "threshold": float(threshold), "clear": float(clear),
            "for": for_s, "clear_for": clear_for, "labels": dict(labels), "severity": severity}


def _metrics_and_memory(s: HmsSettings) -> HmsSettings:
    ret = s.metrics_retention
    if not isinstance(ret, dict) or set(ret) != set(_RETENTION_LIMITS):
        raise ConfigurationError(
            "HMS_TASKS_METRICS_RETENTION must map 'raw', '1m' and '1h' to seconds"
        )
    for kind, (low, high) in _RETENTION_LIMITS.items():
        if type(ret[kind]) is not int or not low <= ret[kind] <= high:
            raise ConfigurationError(
                f"HMS_TASKS_METRICS_RETENTION[{kind!r}] must be whole seconds from {low} to {high}"
            )
    if ret["raw"] > min(ret["1m"], ret["1h"]):
        raise ConfigurationError(
            "HMS_TASKS_METRICS_RETENTION['raw'] must not exceed the '1m' and '1h' retentions"
        )
    for name, low, high in (("metrics_stale_seconds", 10, 86400),
                            ("metrics_forget_node_after", 60, 365 * 86400),
                            ("memory_cooldown", 0, 3600)):
        value = getattr(s, name)
        if type(value) is not int or not low <= value <= high:
            raise ConfigurationError(
                f"HMS_TASKS_{name.upper()} must be an integer from {low} to {high}"
            )
    for name, fmin, fmax in (("metrics_ping_timeout", 0.1, 30.0), ("webhook_timeout", 0.1, 60.0)):
        value = getattr(s, name)
        if not _number(value) or not fmin <= value <= fmax:
            raise ConfigurationError(
                f"HMS_TASKS_{name.upper()} must be a number of seconds from {fmin:g} to {fmax:g}"
            )
    if not isinstance(s.alert_rules, dict):
        raise ConfigurationError("HMS_TASKS_ALERT_RULES must be a dict of rule names to rules")
    rules = {name: _alert_rule(name, rule) for name, rule in s.alert_rules.items()}
    allow = s.webhook_allowlist
    if isinstance(allow, str) or not isinstance(allow, (list, tuple)):
        raise ConfigurationError("HMS_TASKS_WEBHOOK_ALLOWLIST must be a list of http(s) URLs")
    for i, entry in enumerate(allow):
        try:
            parse_url(entry)
        except ValueError as exc:
            raise ConfigurationError(f"HMS_TASKS_WEBHOOK_ALLOWLIST[{i}]: {exc}") from None
    hooks = s.alert_webhooks
    if not isinstance(hooks, dict):
        raise ConfigurationError("HMS_TASKS_ALERT_WEBHOOKS must map webhook names to URLs")
    for name, url in hooks.items():
        if not isinstance(name, str) or not _RULE_NAME_RE.match(name):
            raise ConfigurationError(
                "HMS_TASKS_ALERT_WEBHOOKS: names are lower-case letters, digits and '_'"
            )
        try:
            parse_url(url)
        except ValueError as exc:
            # Never quote the URL: webhook URLs often carry a token.
            raise ConfigurationError(f"HMS_TASKS_ALERT_WEBHOOKS[{name!r}]: {exc}") from None
        if not url_allowed(url, allow):
            raise ConfigurationError(
                f"HMS_TASKS_ALERT_WEBHOOKS[{name!r}] is not allowed by"
                " HMS_TASKS_WEBHOOK_ALLOWLIST (add its URL or a prefix of it there)"
            )
    budget = s.memory_budget_mb
    if type(budget) is not int or not (budget == 0 or 64 <= budget <= 1_048_576):
        raise ConfigurationError(
            "HMS_TASKS_MEMORY_BUDGET_MB must be 0 (tiers off) or an integer from 64 to 1048576"
        )
    tiers = s.memory_tiers
    if not isinstance(tiers, dict) or set(tiers) != set(DEFAULT_MEMORY_TIERS):
        raise ConfigurationError(
            "HMS_TASKS_MEMORY_TIERS must map 'warning', 'critical' and 'emergency' to percents"
        )
    for tier in DEFAULT_MEMORY_TIERS:
        if type(tiers[tier]) is not int or not 1 <= tiers[tier] <= 100:
            raise ConfigurationError(
                f"HMS_TASKS_MEMORY_TIERS[{tier!r}] must be a whole percent from 1 to 100"
            )
    if not tiers["warning"] < tiers["critical"] < tiers["emergency"]:
        raise ConfigurationError(
            "HMS_TASKS_MEMORY_TIERS must rise: warning < critical < emergency"
        )
    return dataclasses.replace(s, alert_rules=rules, webhook_allowlist=tuple(allow))


# -- load tests ----------------------------------------------------------------------------------

_TARGET_ID_RE = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
_TEST_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def _loadtest(s: HmsSettings) -> HmsSettings:
    """Shapes and bounds of the HMS_TASKS_LOADTEST_* settings (each test definition is checked
    in full by hms_tasks.loadtest.spec at start-up and before every run)."""
    targets = s.loadtest_targets
    if not isinstance(targets, dict):
        raise ConfigurationError("HMS_TASKS_LOADTEST_TARGETS must map target ids to base URLs")
    clean: dict[str, str] = {}
    for tid, url in targets.items():
        if not isinstance(tid, str) or not _TARGET_ID_RE.match(tid):
            raise ConfigurationError(
                "HMS_TASKS_LOADTEST_TARGETS: target ids are 1 to 40 lower-case letters, digits,"
                " '_' or '-', starting with a letter"
            )
        try:
            parsed = parse_url(url)
        except ValueError as exc:
            # Never quote the URL: it could carry a token.
            raise ConfigurationError(f"HMS_TASKS_LOADTEST_TARGETS[{tid!r}]: {exc}") from None
        if parsed.query:
            raise ConfigurationError(
                f"HMS_TASKS_LOADTEST_TARGETS[{tid!r}]: a base URL has no query string")
        clean[tid] = url.rstrip("/")
    for name, low, high in (("loadtest_max_users", 1, 1_000_000),
                            ("loadtest_max_duration", 1, LOADTEST_MAX_DURATION_CAP),
                            ("loadtest_max_shards", 1, 1000),
                            ("loadtest_grace", 5, LOADTEST_MAX_GRACE),
                            ("loadtest_keep_days", 1, 365)):
        value = getattr(s, name)
        if type(value) is not int or not low <= value <= high:
            raise ConfigurationError(
                f"HMS_TASKS_{name.upper()} must be an integer from {low} to {high}"
            )
    if not _number(s.loadtest_start_delay) or not 0.5 <= s.loadtest_start_delay \
            <= LOADTEST_MAX_START_DELAY:
        raise ConfigurationError(
            f"HMS_TASKS_LOADTEST_START_DELAY must be a number of seconds from 0.5 to"
            f" {LOADTEST_MAX_START_DELAY}"
        )
    tol = s.loadtest_regression_tolerance
    if not _number(tol) or not 0 < tol <= 10:
        raise ConfigurationError(
            "HMS_TASKS_LOADTEST_REGRESSION_TOLERANCE must be a fraction above 0 (0.2 is 20 %)"
            " and at most 10"
        )
    for name in ("loadtest_scenarios_dir", "loadtest_reports_dir"):
        value = getattr(s, name)
        if isinstance(value, Path):
            value = str(value)
        if not isinstance(value, str) or not value:
            raise ConfigurationError(f"HMS_TASKS_{name.upper()} must be a directory path")
    if type(s.loadtest_keep_raw) is not bool:
        raise ConfigurationError("HMS_TASKS_LOADTEST_KEEP_RAW must be True or False")
    tests = s.loadtest_tests
    if not isinstance(tests, dict) or not all(
            isinstance(k, str) and _TEST_NAME_RE.match(k) and isinstance(v, dict)
            for k, v in tests.items()):
        raise ConfigurationError(
            "HMS_TASKS_LOADTEST_TESTS must map test names (a-z 0-9 '_' '-') to definitions"
            " (dicts)"
        )
    for name, definition in tests.items():
        if "name" in definition and definition["name"] != name:
            raise ConfigurationError(
                f"HMS_TASKS_LOADTEST_TESTS[{name!r}]: its name is its key; leave 'name' out")
    nightly = s.loadtest_nightly
    if nightly is not None and (not isinstance(nightly, str) or nightly not in tests):
        raise ConfigurationError(
            "HMS_TASKS_LOADTEST_NIGHTLY must be None or the name of a test of"
            f" HMS_TASKS_LOADTEST_TESTS (defined: {sorted(tests)})"
        )
    return dataclasses.replace(
        s, loadtest_targets=clean,
        loadtest_scenarios_dir=str(s.loadtest_scenarios_dir),
        loadtest_reports_dir=str(s.loadtest_reports_dir),
        loadtest_start_delay=float(s.loadtest_start_delay),
        loadtest_regression_tolerance=float(tol),
    )


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
            if field.name == "services" and isinstance(value, dict):
                value = _merge_services(value)
            if field.name == "alert_rules" and isinstance(value, dict):
                value = _merge_rules(value)
            if field.name == "metrics_retention" and isinstance(value, dict):
                value = {**DEFAULT_METRICS_RETENTION, **value}
            if field.name == "memory_tiers" and isinstance(value, dict):
                value = {**DEFAULT_MEMORY_TIERS, **value}
            given[field.name] = value
    return _validate(HmsSettings(**given))


# -- settings sections: each capability declares its own ---------------------------------------


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
            raise ConfigurationError(
                "; ".join(problems(exc, name=setting_name))
            ) from None

    _SECTIONS.append(get_section)
    return get_section


def check_all() -> list[str]:
    """Every problem of every settings section, one line each (the start-up check)."""
    out: list[str] = []
    accessors: list[Callable[[], object]] = [get, *_SECTIONS]
    for accessor in accessors:
        try:
            accessor()
        except ConfigurationError as exc:
            out.extend(str(exc).split("; "))
    return out


def reset(**_: Any) -> None:
    """Drop cached settings of every section; connected to ``setting_changed``."""
    get.cache_clear()
    for accessor in _SECTIONS:
        accessor.cache_clear()  # type: ignore[attr-defined]
