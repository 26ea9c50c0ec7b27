"""Settings of the metrics capability (``HMS_TASKS_METRICS_*``, alert rules, webhooks).

Read them with :data:`get` (``get().metrics_stale_seconds``); they are validated on first use
and by the start-up check, with errors naming the setting and field
(``HMS_TASKS_ALERT_RULES['cpu_high']['threshold']: must be a number from 0 to 100 (a
percentage)``) and never quoting a value: a webhook URL often carries a token.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hms_tasks import conf
from hms_tasks.allowlist import parse_url, url_allowed

__all__ = [
    "DEFAULT_ALERT_RULES",
    "DEFAULT_METRICS_RETENTION",
    "AlertRule",
    "MetricsSettings",
    "Retention",
    "get",
]

#: Seconds the metrics store keeps raw points and 1-minute and 1-hour aggregates.
DEFAULT_METRICS_RETENTION: dict[str, int] = {"raw": 86400, "1m": 30 * 86400, "1h": 30 * 86400}
#: Alert rules of the product brief (CPU 80 %, memory 85 %, API p95 2,000 ms, API error rate
#: 5 %) plus queue backlog, Redis evictions, a node that stopped answering, and the database's
#: connections (server saturation, sessions idle in a transaction, pool wait).
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
    # A message was dead-lettered in the last hour (malformed, unknown task, wrong content
    # type): someone publishes what no worker can run. Resolves 15 minutes after the hour is
    # clean again.
    "deadletter": {"series": "celery.deadletter_recent", "op": ">", "threshold": 0,
                   "clear": 0, "for": 0, "clear_for": 900, "severity": "warning"},
    # A query probe ran more statements or milliseconds than its budget (1 when over, written
    # by hms.queries.audit per probe): fires at once, resolves with the next audit in budget.
    "queries_over_budget": {"series": "queries.over_budget", "op": ">", "threshold": 0,
                            "clear": 0, "for": 0, "clear_for": 0, "severity": "warning"},
    # A query probe got worse than its previous audit (more statements, N+1 patterns or
    # duplicates): fires at once, resolves with the next audit that does not regress.
    "queries_regression": {"series": "queries.regressed", "op": ">", "threshold": 0,
                           "clear": 0, "for": 0, "clear_for": 0, "severity": "warning"},
    # A static asset grew past its budget or by more than the tolerance since the previous
    # analysis (1, else 0; written by hms.assets.analyze): fires at once, resolves with the
    # next analysis within budget.
    "assets_over_budget": {"series": "assets.over_budget", "op": ">", "threshold": 0,
                           "clear": 0, "for": 0, "clear_for": 0, "severity": "warning"},
    # The database server's connections (all databases) above 80 % of max_connections: the
    # next pool to grow, or the next process to start, may be refused.
    "db_connections_saturated": {"series": "db.connections_used_percent", "op": ">",
                                 "threshold": 80, "clear": 70, "for": 120, "clear_for": 300,
                                 "severity": "critical"},
    # A session idle in a transaction past HMS_TASKS_DB_IDLE_IN_TRANSACTION_SECONDS holds
    # its locks, its snapshot (vacuum waits) and a pooled connection.
    "db_idle_in_transaction": {"series": "db.idle_in_transaction", "op": ">", "threshold": 0,
                               "clear": 0, "for": 60, "clear_for": 120, "severity": "warning"},
    # Requests wait for a pooled connection (p95 estimated from psycopg_pool's counters,
    # docs/queries.md): the pool is too small for the node's concurrency.
    "db_pool_wait_p95": {"series": "db.pool.wait_p95_ms", "op": ">", "threshold": 100,
                         "clear": 20, "for": 300, "clear_for": 300, "severity": "warning"},
    # Sentinel promoted a new Redis master in the last hour (recorded by the first process
    # that connected to it: hms_tasks.store.failovers): fires at once, resolves an hour on.
    "redis_failover": {"series": "redis.failovers_recent", "op": ">", "threshold": 0,
                       "clear": 0, "for": 0, "clear_for": 0, "severity": "warning"},
}

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_SERIES_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")
#: Upper bound of a threshold of a series that is not a percentage.
_NO_LIMIT = 1e15


def _between(low: float, high: float, what: str) -> AfterValidator:
    """A bound check whose message names the allowed range (pydantic's names only one side)."""

    def check(value: Any) -> Any:
        if not low <= value <= high:
            raise ValueError(f"must be {what} from {low:g} to {high:g}")
        return value

    return AfterValidator(check)


def _name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError("names are lower-case letters, digits and '_' (up to 64)")
    return value


def _series(value: str) -> str:
    if len(value) > 128 or not _SERIES_RE.match(value):
        raise ValueError("must name a series like host.cpu.percent")
    return value


def percent_series(name: str) -> bool:
    """Whether series ``name`` is a percentage (its thresholds lie in 0-100)."""
    return name.endswith("percent") or name.endswith("error_rate")


Name = Annotated[str, AfterValidator(_name)]
Seconds = Annotated[int, _between(0, 86400, "whole seconds")]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class Retention(_Model):
    """Seconds the store keeps raw points and each aggregate (``raw``, ``1m``, ``1h``)."""

    raw: Annotated[int, _between(3600, 7 * 86400, "whole seconds")]
    one_minute: Annotated[int, Field(alias="1m"), _between(3600, 90 * 86400, "whole seconds")]
    one_hour: Annotated[int, Field(alias="1h"), _between(86400, 400 * 86400, "whole seconds")]

    @model_validator(mode="after")
    def _raw_within_aggregates(self) -> Retention:
        if self.raw > min(self.one_minute, self.one_hour):
            raise ValueError("'raw' must not exceed the '1m' and '1h' retentions")
        return self

    def as_dict(self) -> dict[str, int]:
        """``{"raw": ..., "1m": ..., "1h": ...}``: seconds by resolution."""
        return {"raw": self.raw, "1m": self.one_minute, "1h": self.one_hour}

    @property
    def longest(self) -> int:
        return max(self.raw, self.one_minute, self.one_hour)


class AlertRule(_Model):
    """One alert rule; after validation it is complete (``clear`` and ``clear_for`` filled)."""

    series: Annotated[str, AfterValidator(_series)]
    op: Literal[">", "<"] = ">"
    threshold: float
    #: Defaults to the threshold (no hysteresis).
    clear: float | None = None
    for_s: Annotated[Seconds, Field(alias="for")] = 0
    #: Defaults to ``for``.
    clear_for: Seconds | None = None
    labels: dict[str, str] | None = None
    severity: Literal["warning", "critical"] = "warning"

    @field_validator("threshold", "clear")
    @classmethod
    def _in_range(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None:
            return value
        series = info.data.get("series")
        high = 100.0 if series and percent_series(series) else _NO_LIMIT
        unit = " (a percentage)" if high == 100 else ""
        if not 0 <= value <= high:
            raise ValueError(f"must be a number from 0 to {high:g}{unit}")
        threshold = info.data.get("threshold")
        op = info.data.get("op")
        if info.field_name == "clear" and threshold is not None and op is not None and (
                (op == ">" and value > threshold) or (op == "<" and value < threshold)):
            side = "at or below" if op == ">" else "at or above"
            raise ValueError(f"must be {side} the threshold (it is the hysteresis)")
        return value

    @model_validator(mode="after")
    def _complete(self) -> AlertRule:
        return self.model_copy(update={
            "threshold": float(self.threshold),
            "clear": float(self.threshold if self.clear is None else self.clear),
            "clear_for": self.for_s if self.clear_for is None else self.clear_for,
            "labels": dict(self.labels or {}),
        })


def _allowlist_entry(value: str) -> str:
    parse_url(value)  # ValueError naming what is wrong, never quoting the URL
    return value


def _webhook_url(value: str, info: ValidationInfo) -> str:
    parse_url(value)
    allowlist = info.data.get("webhook_allowlist")
    # Without a valid allowlist its own error is reported already.
    if allowlist is not None and not url_allowed(value, allowlist):
        raise ValueError("not allowed by HMS_TASKS_WEBHOOK_ALLOWLIST (add its URL or a prefix"
                         " of it there)")
    return value


class MetricsSettings(conf.Settings):
    """The metrics store, the sweeps' node registry, alert rules and webhooks."""

    merged: ClassVar[tuple[str, ...]] = ("metrics_retention",)

    #: Seconds the metrics store keeps each kind of point: ``raw``, ``1m`` and ``1h``
    #: aggregates (min, max, mean, count). Merged with DEFAULT_METRICS_RETENTION.
    metrics_retention: Retention = Field(
        default_factory=lambda: dict(DEFAULT_METRICS_RETENTION), validate_default=True)
    #: A series whose newest point is older than this many seconds is not current: the
    #: Prometheus exporter leaves it out and alert rules see no value for it.
    metrics_stale_seconds: Annotated[int, _between(10, 86400, "whole seconds")] = 600
    #: Seconds a sweep (hms.metrics.collect, hms.memory.sweep) waits for nodes to answer.
    metrics_ping_timeout: Annotated[float, _between(0.1, 30.0, "a number of seconds")] = 1.0
    #: A node not seen for this many seconds is dropped from the registry of known nodes
    #: (until then a sweep reports it missing).
    metrics_forget_node_after: Annotated[
        int, _between(60, 365 * 86400, "whole seconds")] = 7 * 86400
    #: Alert rules (see DEFAULT_ALERT_RULES), merged per rule and per field.
    alert_rules: dict[Name, AlertRule] = Field(
        default_factory=lambda: copy.deepcopy(DEFAULT_ALERT_RULES), validate_default=True)
    #: URLs webhooks may be sent to: exact URLs, or prefixes at a path boundary. (Declared
    #: before the webhooks: their check reads it.)
    webhook_allowlist: Annotated[
        Sequence[Annotated[str, AfterValidator(_allowlist_entry)]], AfterValidator(tuple),
    ] = ()
    #: Webhooks alert notifications are posted to: name -> URL. Every URL must be allowed by
    #: HMS_TASKS_WEBHOOK_ALLOWLIST (checked at start-up and again before each request).
    alert_webhooks: dict[Name, Annotated[str, AfterValidator(_webhook_url)]] = Field(
        default_factory=dict)
    #: Seconds one webhook request may take.
    webhook_timeout: Annotated[float, _between(0.1, 60.0, "a number of seconds")] = 5.0

    @classmethod
    def merge(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Retention per key; alert rules per rule and field (``None`` drops a rule, and a
        new ``threshold`` without a ``clear`` drops the default ``clear``: it is derived
        again from the new threshold)."""
        out = super().merge(given)
        rules = out.get("alert_rules")
        if isinstance(rules, dict):
            merged: dict[Any, Any] = copy.deepcopy(DEFAULT_ALERT_RULES)
            for name, rule in rules.items():
                if rule is None:
                    merged.pop(name, None)
                elif isinstance(rule, dict) and isinstance(merged.get(name), dict):
                    base = dict(merged[name])
                    if "threshold" in rule and "clear" not in rule:
                        base.pop("clear", None)
                    merged[name] = {**base, **rule}
                else:
                    merged[name] = rule
            out["alert_rules"] = merged
        return out


get = conf.section(MetricsSettings)
