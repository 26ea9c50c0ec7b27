"""Metrics: per-node samples of the hosts, the worker processes and the shared services; a
bounded time-series store in Redis; the API's own request timings; alert rules with hysteresis
and webhooks; and Prometheus exposition. The manual is docs/metrics.md.

The public API is :data:`__all__`, imported on first use (so ``hms_tasks.metrics.names``,
which beat schedules and clients import, stays import-light)::

    from hms_tasks.metrics import write, series_id
    write([(series_id("hms.beds.free", {"ward": "icu"}), time.time(), 4.0)])

Modules: :mod:`~hms_tasks.metrics.store` (the store), :mod:`~hms_tasks.metrics.collect` and
:mod:`~hms_tasks.metrics.host` (samples and sweeps), :mod:`~hms_tasks.metrics.timings` and
:mod:`~hms_tasks.metrics.middleware` (request timings), :mod:`~hms_tasks.metrics.alerts`,
:mod:`~hms_tasks.metrics.prometheus`, :mod:`~hms_tasks.metrics.settings`,
:mod:`~hms_tasks.metrics.names`, :mod:`~hms_tasks.metrics.tasks`, :mod:`~hms_tasks.metrics.cli`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hms_tasks.capabilities import lazy_exports as _lazy_exports

if TYPE_CHECKING:
    from hms_tasks.metrics.alerts import Rule, events, rules, states
    from hms_tasks.metrics.collect import sweep_status
    from hms_tasks.metrics.middleware import TimingMiddleware
    from hms_tasks.metrics.prometheus import ExporterServer, metrics_view, render
    from hms_tasks.metrics.settings import MetricsSettings
    from hms_tasks.metrics.settings import get as get_settings
    from hms_tasks.metrics.store import latest, query, series_id, write

__all__ = [
    "ExporterServer",
    "MetricsSettings",
    "Rule",
    "TimingMiddleware",
    "events",
    "get_settings",
    "latest",
    "metrics_view",
    "query",
    "render",
    "rules",
    "series_id",
    "states",
    "sweep_status",
    "write",
]

#: Public name -> (module, attribute).
_EXPORTS: dict[str, tuple[str, str]] = {
    "ExporterServer": ("prometheus", "ExporterServer"),
    "MetricsSettings": ("settings", "MetricsSettings"),
    "Rule": ("alerts", "Rule"),
    "TimingMiddleware": ("middleware", "TimingMiddleware"),
    "events": ("alerts", "events"),
    "latest": ("store", "latest"),
    "metrics_view": ("prometheus", "metrics_view"),
    "query": ("store", "query"),
    "render": ("prometheus", "render"),
    "rules": ("alerts", "rules"),
    "series_id": ("store", "series_id"),
    "get_settings": ("settings", "get"),
    "states": ("alerts", "states"),
    "sweep_status": ("collect", "sweep_status"),
    "write": ("store", "write"),
}


__getattr__ = _lazy_exports(__name__, _EXPORTS)
