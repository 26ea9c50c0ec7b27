"""Sweeps against real HTTP servers on 127.0.0.1 (fast, slow, 500, wrong JSON, hanging,
redirecting, down) and real TCP, Redis and database checks: classification, concurrency,
history and windows, single flight, the allowlist and redirects, the tasks and the CLI."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from django.test import override_settings

from hms_tasks import names, reports, store
from hms_tasks.cli import cli
from hms_tasks.errors import InvalidArguments
from hms_tasks.health import checks, history, keys, registry, report, sweep
from hms_tasks.health import names as health_names
from hms_tasks.health import tasks as health_tasks
from tests.health_servers import ServiceServer, only
from tests.helpers import RedisServer, wait_for

TIMEOUT = 1.0
JSON_CHECK = {"type": "http", "path": "/healthz", "json_field": "status", "json_value": "ok"}


def _entry(*urls: str, **extra: Any) -> dict[str, Any]:
    return {"instances": list(urls), "timeout": TIMEOUT, "degraded_ms": 150,
            "check": JSON_CHECK, **extra}


@pytest.fixture
def servers() -> Iterator[dict[str, ServiceServer]]:
    made = {mode: ServiceServer(mode, delay=0.3) for mode in
            ("fast", "slow", "error", "bad_json", "hang", "redirect")}
    made["hang2"] = ServiceServer("hang")
    made["hang3"] = ServiceServer("hang")
    made["down"] = ServiceServer("fast")
    made["down"].stop()
    made["outside"] = ServiceServer("fast", host="127.0.0.2")  # no instance of any service
    made["redirect"].redirect_to = made["outside"].url + "/healthz"
    try:
        yield made
    finally:
        for s in made.values():
            s.stop()


def _registry(s: dict[str, ServiceServer]) -> dict[str, Any]:
    return only(
        fast=_entry(s["fast"].url), slow=_entry(s["slow"].url), error=_entry(s["error"].url),
        bad_json=_entry(s["bad_json"].url), hang=_entry(s["hang"].url),
        hang_b=_entry(s["hang2"].url, retries=3), hang_c=_entry(s["hang3"].url),
        redirect=_entry(s["redirect"].url), down=_entry(s["down"].url),
        mixed=_entry(s["fast"].url, s["error"].url),
    )


def test_sweep_classifies_every_kind_of_answer_concurrently(
        servers: dict[str, ServiceServer]) -> None:
    with override_settings(HMS_TASKS_SERVICES=_registry(servers)):
        started = time.perf_counter()
        summary = sweep.sweep()
        elapsed = time.perf_counter() - started
        by_name = {r["service"]: r for r in report.status()}
    expect = {
        "fast": ("up", None), "slow": ("degraded", None), "error": ("down", "status"),
        "bad_json": ("down", "body"), "hang": ("down", "timeout"),
        "hang_b": ("down", "timeout"), "hang_c": ("down", "timeout"),
        "redirect": ("down", "redirect"), "down": ("down", "refused"),
    }
    for name, (status, error) in expect.items():
        got = by_name[name]
        assert (got["status"], got["instances"][0]["error"]) == (status, error), name
    mixed = by_name["mixed"]
    assert mixed["status"] == "degraded"
    assert [i["status"] for i in mixed["instances"]] == ["up", "down"]
    assert summary | {"duration_ms": 0, "checks_ms": 0, "slowest_ms": 0} == {
        "skipped": False, "services": 10, "up": 1, "degraded": 2, "down": 7, "instances": 11,
        "instances_up": 2, "instances_degraded": 1, "instances_down": 8,
        "breakers_opened": 0, "breakers_closed": 0,
        "down_services": ["bad_json", "down", "error", "hang", "hang_b", "hang_c", "redirect"],
        "duration_ms": 0, "checks_ms": 0, "slowest_ms": 0,
    }
    # Three hanging services (one with 3 retries) and a slow one, checked at once: the sweep
    # costs about one timeout, not their sum (3 s and more), and a hang costs no more than
    # its timeout, retries included.
    assert TIMEOUT <= elapsed < 2 * TIMEOUT
    assert summary["slowest_ms"] < TIMEOUT * 1000 + 100
    # The 500 was retried once (retries default to 1); the redirect was not followed.
    assert servers["error"].requests == 2 + 2  # its own service and "mixed"
    assert servers["outside"].connections == 0


def test_results_are_kept_as_history_with_windows(servers: dict[str, ServiceServer]) -> None:
    with override_settings(HMS_TASKS_SERVICES=only(
            a=_entry(servers["fast"].url, servers["slow"].url), b=_entry(servers["down"].url))):
        sweep.sweep()
        servers["fast"].mode = "error"
        servers["slow"].mode = "error"
        sweep.sweep()
        a, b = report.status()
        samples = history.samples("a", since=time.time() - 60)
        instance_samples = history.samples(f"a@127.0.0.1:{servers['fast'].port}",
                                           since=time.time() - 60)
    assert [s["status"] for s in samples] == ["degraded", "down"]
    assert [s["status"] for s in instance_samples] == ["up", "down"]
    assert all(s["v"] == 1 for s in samples)
    for label in ("5m", "1h", "24h"):
        assert a["windows"][label]["samples"] == 2
        assert a["windows"][label]["availability"] == 0.5
        assert b["windows"][label]["availability"] == 0.0
        assert b["windows"][label]["p95_ms"] is None
    p50 = a["windows"]["1h"]["p50_ms"]
    assert p50 is not None
    assert p50 >= 100
    assert a["status"] == "down"
    assert a["checked_at"] is not None
    assert a["checked_at"] > time.time() - 60
    assert store.client().ttl(keys.history("a")) > 86_400
    assert store.client().ttl(keys.latest("a")) > 0


def test_windows_of_samples() -> None:
    now = 100_000.0
    samples: list[history.Sample] = [
        {"v": 1, "at": now - 10, "status": "up", "latency_ms": 10.0, "error": None},
        {"v": 1, "at": now - 20, "status": "up", "latency_ms": 30.0, "error": None},
        {"v": 1, "at": now - 30, "status": "degraded", "latency_ms": 900.0, "error": None},
        {"v": 1, "at": now - 400, "status": "down", "latency_ms": None, "error": "timeout"},
        {"v": 1, "at": now - 7200, "status": "down", "latency_ms": None, "error": "refused"},
    ]
    w = history.windows(samples, now=now)
    assert w["5m"] == {"samples": 3, "availability": 1.0, "p50_ms": 30.0, "p95_ms": 900.0,
                       "p99_ms": 900.0}
    assert w["1h"]["samples"] == 4
    assert w["1h"]["availability"] == 0.75
    assert w["24h"]["availability"] == 0.6


def test_a_sweep_while_one_runs_is_skipped(servers: dict[str, ServiceServer]) -> None:
    with override_settings(HMS_TASKS_SERVICES=only(slow=_entry(servers["hang"].url))):
        first: dict[str, Any] = {}
        runner = threading.Thread(target=lambda: first.update(sweep.sweep()))
        runner.start()
        wait_for(lambda: store.client().exists(keys.sweep_lock()), what="the sweep's lock")
        second = sweep.sweep()
        runner.join(timeout=30)
        assert second == {"skipped": True, "reason": "another sweep is running"}
        assert first["skipped"] is False
        assert first["down"] == 1
        assert not store.client().exists(keys.sweep_lock())  # released by its owner
        assert servers["hang"].requests == 1


def test_a_lock_held_by_another_token_is_not_released(servers: dict[str, ServiceServer]) -> None:
    with override_settings(HMS_TASKS_SERVICES=only(a=_entry(servers["fast"].url))):
        store.client().set(keys.sweep_lock(), "someone-else", px=5000)
        assert sweep.sweep()["skipped"] is True
        assert store.client().get(keys.sweep_lock()) == "someone-else"


def test_a_redirect_to_a_host_outside_the_registry_is_not_followed(
        servers: dict[str, ServiceServer]) -> None:
    # Even when the 302 is the expected answer, nothing follows it.
    entry = _entry(servers["redirect"].url, check={"type": "http", "path": "/healthz",
                                                   "expect_status": [302]})
    with override_settings(HMS_TASKS_SERVICES=only(r=entry, bad=_entry(servers["redirect"].url))):
        summary = sweep.sweep()
    assert summary["up"] == 1
    assert summary["down"] == 1
    assert servers["redirect"].requests == 3  # "r" once; "bad" twice (one retry)
    assert servers["outside"].connections == 0


def test_an_unregistered_target_is_refused_before_any_connection(
        servers: dict[str, ServiceServer]) -> None:
    outside = servers["outside"]
    with override_settings(HMS_TASKS_SERVICES=only(a=_entry(servers["fast"].url))):
        # A Service built by hand, around the registry: the checks still refuse it.
        registered = registry.get("a")
        rogue = registry.Service(
            name="a", check=registered.check, timeout=1.0, retries=2, max_connections=1,
            degraded_ms=100.0, breaker=registered.breaker,
            instances=(registry.Instance(service="a", id="x", url=outside.url + "/",
                                         scheme="http", host=outside.host, port=outside.port,
                                         path=""),),
        )
        results, _ = checks.run([rogue])
    assert results[0].status == "down"
    assert results[0].instances[0].error == "refused_target"
    assert results[0].instances[0].attempts == 1
    assert outside.connections == 0


@pytest.mark.django_db(transaction=True)
def test_tcp_redis_and_database_checks(redis_server: RedisServer,
                                       servers: dict[str, ServiceServer]) -> None:
    with override_settings(HMS_TASKS_SERVICES=only(
        tcp={"instances": [f"tcp://127.0.0.1:{servers['fast'].port}"], "check": {"type": "tcp"}},
        tcp_down={"instances": [f"tcp://127.0.0.1:{servers['down'].port}"],
                  "check": {"type": "tcp"}, "retries": 0},
        cache={"instances": [redis_server.url], "check": {"type": "redis"}},
        cache_down={"instances": [f"redis://127.0.0.1:{servers['down'].port}/0"],
                    "check": {"type": "redis"}, "retries": 0},
        db={"instances": ["default"], "check": {"type": "database"}},
    )):
        sweep.sweep()
        got = {r["service"]: (r["status"], r["instances"][0]["error"]) for r in report.status()}
    assert got == {"tcp": ("up", None), "tcp_down": ("down", "refused"), "cache": ("up", None),
                   "cache_down": ("down", "refused"), "db": ("up", None)}


def test_tasks_run_on_a_worker_and_refuse_unknown_services(
        worker: Any, servers: dict[str, ServiceServer]) -> None:
    with override_settings(HMS_TASKS_SERVICES=only(a=_entry(servers["fast"].url),
                                                   b=_entry(servers["error"].url))):
        summary = health_tasks.sweep.delay().get(timeout=30)
        assert (summary["up"], summary["down"]) == (1, 1)
        assert reports.latest(health_names.HEALTH_SWEEP)["summary"] == summary  # type: ignore[index]
        one = health_tasks.check_service.delay("a").get(timeout=30)
        assert (one["services"], one["up"]) == (1, 1)
        before = servers["fast"].requests + servers["error"].requests
        with pytest.raises(InvalidArguments) as info:
            health_tasks.check_service.delay("radiology").get(timeout=30)
        assert "name: unknown service (allowed: a, b)" in str(info.value)
        assert reports.latest(health_names.HEALTH_CHECK_SERVICE)["outcome"] == "rejected"  # type: ignore[index]
        assert servers["fast"].requests + servers["error"].requests == before
    assert names.queue_for(health_names.HEALTH_SWEEP) == "hms.health"


def test_cli_health_prints_state_breaker_latency_and_availability(
        servers: dict[str, ServiceServer]) -> None:
    with override_settings(HMS_TASKS_SERVICES=only(a=_entry(servers["fast"].url),
                                                   b=_entry(servers["error"].url))):
        runner = CliRunner()
        before = runner.invoke(cli, ["health"])
        assert before.exit_code == 0
        assert "unknown" in before.output
        swept = runner.invoke(cli, ["health", "--sweep"])
        assert swept.exit_code == 1  # a service is down
        lines = swept.output.splitlines()
        assert lines[0].split()[:4] == ["SERVICE", "STATUS", "BREAKER", "INSTANCES"]
        row_a = next(line for line in lines if line.startswith("a "))
        assert row_a.split()[:4] == ["a", "up", "closed", "1/1"]
        assert "100.0%" in row_a
        as_json = runner.invoke(cli, ["health", "--json"])
        assert as_json.exit_code == 1
        doc = json.loads(as_json.output)
        assert [(d["service"], d["status"], d["breaker"]) for d in doc] == [
            ("a", "up", "closed"), ("b", "down", "closed")]
        assert doc[1]["instances"][0]["error"] == "status"
        assert doc[0]["windows"]["5m"]["availability"] == 1.0
        bad = runner.invoke(cli, ["health", "--service", "radiology"])
        assert bad.exit_code == 2
        assert "unknown service 'radiology'" in bad.output
