"""The metrics store in Prometheus text format, for Prometheus and Grafana to scrape.

Every current series (newest point no older than ``HMS_TASKS_METRICS_STALE_SECONDS``) becomes a
metric named by :func:`exposition`: ``hms_`` plus its name with dots as underscores
(``host.cpu.percent{node=w1@h}`` is ``hms_host_cpu_percent{node="w1@h"}``), with its newest
value, in base units as Prometheus names them (a store series in milliseconds, ``*_ms``, is
exported in seconds as ``*_seconds``; ``*_per_s`` as ``*_per_second``). Cumulative counters of
the host and of Redis (:data:`COUNTERS`) are exported as counters (``*_total``), so
``rate()`` works on them; everything else is a gauge. Alerts that are pending or firing appear
as ``hms_alert{rule,series,severity,state} 1``. ``promtool check metrics`` finds nothing to
report on the result (tested). Served by ``hms-tasks exporter`` (its own HTTP server, loopback
by default) and by :func:`metrics_view`, a Django view an HMS can mount (the demo serves it at
``/metrics``).
"""

from __future__ import annotations

import http.server
import ipaddress
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from hms_tasks import store
from hms_tasks.metrics import alerts, settings
from hms_tasks.metrics import store as ts

__all__ = [
    "CONTENT_TYPE_LATEST",
    "COUNTERS",
    "ExporterServer",
    "Exposition",
    "exposition",
    "metric_name",
    "metrics_view",
    "render",
]

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")

#: Store series that count up since a boot (of the host, or of Redis), by their Prometheus
#: name without ``_total`` (the exposition adds it). A reset shows as a drop, which
#: Prometheus' ``rate()`` and ``increase()`` handle.
COUNTERS: dict[str, str] = {
    "host.net.bytes_sent": "hms_host_net_sent_bytes",
    "host.net.bytes_recv": "hms_host_net_received_bytes",
    "host.disk.read_bytes": "hms_host_disk_read_bytes",
    "host.disk.write_bytes": "hms_host_disk_written_bytes",
    "redis.evicted_keys": "hms_redis_evicted_keys",
}
#: Abbreviated units of store names, and the base unit Prometheus names instead (with the
#: factor from the first to the second).
_UNITS: tuple[tuple[str, str, float], ...] = (
    ("_ms", "_seconds", 0.001),
    ("_per_s", "_per_second", 1.0),
)


class Exposition(NamedTuple):
    #: Metric name (for a counter, without the ``_total`` the exposition adds).
    name: str
    kind: Literal["gauge", "counter"]
    #: Factor from the store's unit to the exported one.
    scale: float


def exposition(series_name: str) -> Exposition:
    """How store series ``series_name`` is exported: Prometheus name, type and unit factor
    (``api.duration_p95_ms`` is the gauge ``hms_api_duration_p95_seconds``, times 0.001)."""
    if series_name in COUNTERS:
        return Exposition(COUNTERS[series_name], "counter", 1.0)
    name = "hms_" + _UNSAFE.sub("_", series_name)
    for short, base, scale in _UNITS:
        if name.endswith(short):
            return Exposition(name.removesuffix(short) + base, "gauge", scale)
    return Exposition(name, "gauge", 1.0)


def metric_name(series_name: str) -> str:
    """The Prometheus name of store series ``series_name`` as a scrape shows it."""
    e = exposition(series_name)
    return e.name + "_total" if e.kind == "counter" else e.name


class StoreCollector(Collector):
    """A prometheus_client collector reading the store at scrape time."""

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        now = time.time()
        stale = settings.get().metrics_stale_seconds
        rows: dict[Exposition, dict[tuple[tuple[str, str], ...], float]] = {}
        sources: dict[Exposition, str] = {}
        for sid, point in sorted(ts.latest(now=now, max_age=stale).items()):
            name, pairs = ts.parse_series(sid)
            e = exposition(name)
            sources.setdefault(e, name)
            # Two store names exported alike (x_ms and x_seconds): the first one wins.
            rows.setdefault(e, {}).setdefault(pairs, point.value * e.scale)
        for e in sorted(rows, key=lambda x: x.name):
            keys = sorted({k for pairs in rows[e] for k, _ in pairs})
            doc = f"hms-tasks series {sources[e]}"
            family = (CounterMetricFamily(e.name, doc, labels=keys) if e.kind == "counter"
                      else GaugeMetricFamily(e.name, doc, labels=keys))
            for pairs, value in rows[e].items():
                labels = dict(pairs)
                family.add_metric([labels.get(k, "") for k in keys], value)
            yield family
        family = GaugeMetricFamily("hms_alert", "hms-tasks alerts that are pending or firing",
                                   labels=["rule", "series", "severity", "state"])
        severities = {r.name: r.severity for r in alerts.rules()}
        for st in alerts.states().values():
            if st["state"] in ("pending", "firing"):
                family.add_metric([st["rule"], st["series"], severities.get(st["rule"], ""),
                                   st["state"]], 1.0)
        yield family
        up = GaugeMetricFamily("hms_exporter_scrape_timestamp_seconds",
                               "When hms-tasks rendered this page")
        up.add_metric([], now)
        yield up


_registry: CollectorRegistry | None = None


def _get_registry() -> CollectorRegistry:
    global _registry
    if _registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StoreCollector())
        _registry = registry
    return _registry


def render() -> bytes:
    """The Prometheus text exposition of the store and the alerts."""
    return generate_latest(_get_registry())


def metrics_view(request: Any) -> Any:
    """Django view serving :func:`render` (``path("metrics", metrics_view)``)."""
    from django.http import HttpResponse

    try:
        body = render()
    except Exception as exc:  # Redis down: say so, plainly, with a 503
        logger.warning("metrics exposition failed: %s", type(exc).__name__)
        return HttpResponse(f"# metrics unavailable: {type(exc).__name__}\n", status=503,
                            content_type="text/plain; charset=utf-8")
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "hms-tasks-exporter"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body, status, ctype = render(), 200, CONTENT_TYPE_LATEST
            except Exception as exc:
                body = f"# metrics unavailable: {type(exc).__name__}\n".encode()
                status, ctype = 503, "text/plain; charset=utf-8"
        elif path == "/healthz":
            try:
                store.client().ping()
                body, status = b"ok\n", 200
            except Exception:
                body, status = b"redis unavailable\n", 503
            ctype = "text/plain; charset=utf-8"
        else:
            body, status, ctype = b"not found\n", 404, "text/plain; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("exporter: " + format, *args)


class ExporterServer(http.server.ThreadingHTTPServer):
    """``/metrics`` and ``/healthz`` on ``host:port`` (an IP address; loopback by default)."""

    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", port: int = 9808) -> None:
        addr = ipaddress.ip_address(host)  # ValueError for anything but an IP literal
        if addr.version == 6:
            self.address_family = socket.AF_INET6
        super().__init__((str(addr), port), _Handler)

    def start_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="hms-exporter", daemon=True)
        thread.start()
        return thread
