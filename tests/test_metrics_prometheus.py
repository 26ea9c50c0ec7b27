"""Both Prometheus exporters (`hms-tasks exporter` over HTTP, `/metrics` of the demo API) on
every series the collectors write: `promtool check metrics` finds nothing, names carry full base
units (seconds, bytes, `_total` on counters), and cumulative counters are counters."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import pytest
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from hms_tasks.metrics import alerts, collect, prometheus
from hms_tasks.metrics import store as ts
from hms_tasks.metrics.prometheus import ExporterServer

# The suffixes promtool calls abbreviated units (client_golang's promlint), as name parts.
ABBREVIATED = {"s", "ms", "us", "ns", "sec", "b", "kb", "mb", "gb", "tb", "pb", "m", "h", "d"}
NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")


@pytest.fixture
def every_series() -> float:
    """What a sweep writes (a node sample, Redis), the API timings and a load test's series."""
    now = time.time()
    _, points = collect.node_sample("w1@db-1")
    _, more = collect.redis_sample(now=now)
    ts.write(points + more + [
        ("node.up{node=w1@db-1}", now, 1.0),
        ("api.requests", now, 120.0), ("api.errors", now, 3.0), ("api.error_rate", now, 2.5),
        ("api.duration_mean_ms", now, 42.0), ("api.duration_p95_ms", now, 2500.0),
        ("loadtest.rps{test=smoke}", now, 800.0), ("loadtest.p95_ms{test=smoke}", now, 95.0),
        ("loadtest.regression{test=smoke}", now, 0.0),
        ("celery.queue.depth{queue=hms.cache}", now, 2.0),
    ], now=now)
    alerts.evaluate_and_store(now=now)  # api_p95_slow goes pending: hms_alert has a sample
    return now


@pytest.fixture
def exporter() -> Iterator[ExporterServer]:
    server = ExporterServer("127.0.0.1", 0)
    server.start_in_thread()
    yield server
    server.shutdown()
    server.server_close()


def _scrape(server: ExporterServer) -> str:
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def _demo_api() -> str:
    response = Client().get("/metrics")
    assert response.status_code == 200
    return str(response.content.decode())


def test_names_carry_base_units_and_counters_are_counters(
        every_series: float, exporter: ExporterServer) -> None:
    for body in (_scrape(exporter), _demo_api()):
        families = {f.name: f for f in text_string_to_metric_families(body)}
        for name, family in families.items():
            assert NAME_RE.match(name), name
            assert not ABBREVIATED & set(name.split("_")[1:]), name
            assert family.documentation, name
            # prometheus_client drops the _total of a counter's family name.
            assert family.type in ("gauge", "counter"), name
        for counter in ("hms_host_net_sent_bytes", "hms_host_net_received_bytes",
                        "hms_host_disk_read_bytes", "hms_host_disk_written_bytes",
                        "hms_redis_evicted_keys"):
            if counter.startswith("hms_host_disk") and counter not in families:
                continue  # a host without disk I/O counters (some containers)
            assert families[counter].type == "counter", counter
            assert [s.name for s in families[counter].samples] == [f"{counter}_total"]
        # Milliseconds in the store, seconds on the page.
        p95 = families["hms_api_duration_p95_seconds"].samples[0].value
        assert p95 == pytest.approx(2.5)
        assert families["hms_loadtest_p95_seconds"].samples[0].value == pytest.approx(0.095)
        assert "hms_redis_ops_per_second" in families
        assert "hms_redis_evictions_per_second" in families
        assert families["hms_host_cpu_percent"].type == "gauge"
        assert "api_p95_slow" in [s.labels["rule"] for s in families["hms_alert"].samples]


def test_exposition_names() -> None:
    e = prometheus.exposition
    assert e("api.duration_p95_ms") == ("hms_api_duration_p95_seconds", "gauge", 0.001)
    assert e("redis.ops_per_s") == ("hms_redis_ops_per_second", "gauge", 1.0)
    assert e("host.net.bytes_sent") == ("hms_host_net_sent_bytes", "counter", 1.0)
    assert prometheus.metric_name("host.net.bytes_sent") == "hms_host_net_sent_bytes_total"
    assert prometheus.metric_name("host.cpu.percent") == "hms_host_cpu_percent"


PROMTOOL = shutil.which("promtool")


# CI installs promtool (`make test` does): there the test must run, never skip.
@pytest.mark.skipif(PROMTOOL is None and not os.environ.get("CI"),
                    reason="promtool is not installed (`make test` installs it: apt-get install"
                    " prometheus)")
def test_promtool_finds_nothing_on_either_exporter(every_series: float,
                                                   exporter: ExporterServer) -> None:
    assert PROMTOOL is not None
    for body in (_scrape(exporter), _demo_api()):
        assert "hms_api_duration_p95_seconds" in body
        check = subprocess.run([PROMTOOL, "check", "metrics"], input=body, text=True,
                               capture_output=True, timeout=60, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout.strip() == "", check.stdout
