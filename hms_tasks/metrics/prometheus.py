"""The metrics store in Prometheus text format, for Prometheus and Grafana to scrape.

Every current series (newest point no older than ``HMS_TASKS_METRICS_STALE_SECONDS``) becomes a
gauge named ``hms_`` plus its name with dots as underscores (``host.cpu.percent{node=w1@h}`` is
``hms_host_cpu_percent{node="w1@h"}``), with its newest value; alerts that are pending or firing
appear as ``hms_alert{rule,series,severity,state} 1``. Served by ``hms-tasks exporter`` (its own
HTTP server, loopback by default) and by :func:`metrics_view`, a Django view an HMS can mount
(the demo serves it at ``/metrics``).
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
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from hms_tasks import store
from hms_tasks.metrics import alerts, settings
from hms_tasks.metrics import store as ts

__all__ = ["CONTENT_TYPE_LATEST", "ExporterServer", "metric_name", "metrics_view", "render"]

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(series_name: str) -> str:
    return "hms_" + _UNSAFE.sub("_", series_name)


class StoreCollector(Collector):
    """A prometheus_client collector reading the store at scrape time."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = time.time()
        stale = settings.get().metrics_stale_seconds
        rows: dict[str, list[tuple[dict[str, str], float]]] = {}
        for sid, point in ts.latest(now=now, max_age=stale).items():
            name, pairs = ts.parse_series(sid)
            rows.setdefault(name, []).append((dict(pairs), point.value))
        for name in sorted(rows):
            keys = sorted({k for labels, _ in rows[name] for k in labels})
            family = GaugeMetricFamily(metric_name(name), f"hms-tasks series {name}",
                                       labels=keys)
            for labels, value in rows[name]:
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
