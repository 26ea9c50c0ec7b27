"""Distributed circuit breakers against a real Redis and real HTTP servers on 127.0.0.1:
opening after the threshold, no network call while open (counted at the server, from this
process and from another), exactly N trial calls admitted in half-open under concurrency from
two processes, recovery, a state every process shares, signals, events, stale outcomes, the
async variant, and a Redis outage (fail open or closed, logged once)."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

from hms_tasks import health, store
from hms_tasks.errors import ServiceUnavailable
from hms_tasks.health import breaker, keys
from tests.health_servers import ServiceServer, only
from tests.helpers import RedisServer, free_port, wait_for

THRESHOLD = 3
#: Reset timeout of the tests that wait for half-open; the others keep a breaker open longer
#: than any test lasts.
RESET = 0.5
TRIALS = 3


def _services(url: str, **breaker_policy: Any) -> dict[str, Any]:
    policy = {"failure_threshold": THRESHOLD, "failure_window": 60, "reset_timeout": 60,
              "half_open_max_calls": TRIALS, **breaker_policy}
    return only(ehr={"instances": [url], "timeout": 1.0, "breaker": policy})


def _call(url: str) -> int:
    """A real HMS call to the service: raises on a 5xx or a connection error."""
    with urllib.request.urlopen(url + "/api/records", timeout=5) as resp:
        return int(resp.status)


@pytest.fixture
def server() -> Iterator[ServiceServer]:
    with ServiceServer("error") as s:
        yield s


@pytest.fixture
def ehr(server: ServiceServer) -> Iterator[ServiceServer]:
    with override_settings(HMS_TASKS_SERVICES=_services(server.url)):
        yield server


@pytest.fixture
def ehr_quick(server: ServiceServer) -> Iterator[ServiceServer]:
    """The service, its breaker half-open RESET seconds after it opened."""
    with override_settings(HMS_TASKS_SERVICES=_services(server.url, reset_timeout=RESET)):
        yield server


def _wait_reset() -> None:
    opened = breaker.state("ehr")["opened_at"]
    assert opened is not None
    wait_for(lambda: time.time() > opened + RESET, what="the reset timeout")


def _fail_until_open(server: ServiceServer) -> None:
    for _ in range(THRESHOLD):
        with pytest.raises(urllib.error.HTTPError), health.guard("ehr"):
            _call(server.url)


# -- child processes (spawn: a fresh interpreter that imports hms_tasks, like a web worker) ---


def _child_setup(services: dict[str, Any]) -> Any:
    import django

    django.setup()
    ctx = override_settings(HMS_TASKS_SERVICES=services)
    ctx.enable()
    return ctx


def _child_calls(services: dict[str, Any], url: str, calls: int, out: Any) -> None:
    _child_setup(services)
    refused = passed = 0
    for _ in range(calls):
        try:
            with health.guard("ehr"):
                _call(url)
            passed += 1
        except ServiceUnavailable:
            refused += 1
        except urllib.error.URLError:
            passed += 1
    out.put({"refused": refused, "passed": passed, "state": breaker.state("ehr")["state"]})


def _child_fail(services: dict[str, Any], url: str, out: Any) -> None:
    _child_setup(services)
    for _ in range(THRESHOLD):
        try:
            with health.guard("ehr"):
                _call(url)
        except urllib.error.HTTPError:
            pass
    out.put(breaker.state("ehr")["state"])


def _child_trials(services: dict[str, Any], threads: int, barrier: Any, out: Any) -> None:
    _child_setup(services)
    _wait_reset()
    b = breaker.breaker_for("ehr")
    admitted: list[int] = []
    refused: list[int] = []
    lock = threading.Lock()
    ready = threading.Barrier(threads)

    def attempt() -> None:
        ready.wait()
        try:
            ticket = b.admit()  # the guard's entry; the "call" never ends, so no slot frees up
        except ServiceUnavailable:
            with lock:
                refused.append(1)
            return
        with lock:
            admitted.append(1 if ticket.trial else 0)

    barrier.wait(timeout=60)  # both processes start their attempts together
    workers = [threading.Thread(target=attempt) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    out.put({"admitted": len(admitted), "trials": sum(admitted), "refused": len(refused)})


def _spawn(target: Any, *args: Any) -> tuple[Any, Any]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, out))
    proc.start()
    return proc, out


def _result(proc: Any, out: Any) -> Any:
    value = out.get(timeout=120)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    return value


# -- tests -----------------------------------------------------------------------------------


def test_opens_after_threshold_and_makes_no_network_call_while_open(
        ehr: ServiceServer) -> None:
    # Below the threshold the breaker stays closed and every call reaches the server.
    for _ in range(THRESHOLD - 1):
        with pytest.raises(urllib.error.HTTPError), health.guard("ehr"):
            _call(ehr.url)
    assert breaker.state("ehr")["state"] == "closed"
    assert breaker.state("ehr")["recent_failures"] == THRESHOLD - 1
    with pytest.raises(urllib.error.HTTPError), health.guard("ehr"):
        _call(ehr.url)
    assert breaker.state("ehr")["state"] == "open"
    seen = ehr.connections
    assert seen == THRESHOLD

    for _ in range(20):
        with pytest.raises(ServiceUnavailable) as info, health.guard("ehr"):
            _call(ehr.url)
    assert info.value.state == "open"
    assert info.value.retry_after is not None
    assert 0 < info.value.retry_after <= 60
    assert "ehr" in str(info.value)
    # Another process (a web worker, say) is refused too, without touching the network.
    proc, out = _spawn(_child_calls, _services(ehr.url), ehr.url, 10)
    child = _result(proc, out)
    assert child["refused"] == 10
    assert child["state"] == "open"
    assert ehr.connections == seen


def test_a_state_set_by_one_process_is_seen_by_every_other(ehr: ServiceServer) -> None:
    services = _services(ehr.url)
    proc, out = _spawn(_child_fail, services, ehr.url)
    assert _result(proc, out) == "open"
    # This process never saw a failure, and still refuses.
    with pytest.raises(ServiceUnavailable), health.guard("ehr"):
        _call(ehr.url)
    # A third process too.
    proc, out = _spawn(_child_calls, services, ehr.url, 5)
    assert _result(proc, out)["refused"] == 5
    assert ehr.connections == THRESHOLD


def test_calls_here_stop_soon_after_another_process_opens_the_breaker(
        ehr: ServiceServer) -> None:
    # This process keeps a closed breaker's state for a moment after reading it
    # (breaker.CLOSED_CACHE_S): calls keep passing while the breaker is closed...
    for _ in range(50):
        with health.guard("ehr"):
            pass
    proc, out = _spawn(_child_fail, _services(ehr.url), ehr.url)
    assert _result(proc, out) == "open"

    def refused() -> bool:
        try:
            with health.guard("ehr"):
                pass
        except ServiceUnavailable as exc:
            return exc.state == "open"
        return False

    # ...and once another process has opened it, they are refused (within the window; the
    # deadline only stops a broken build from hanging).
    wait_for(refused, timeout=10, what="the breaker another process opened to refuse here")
    for _ in range(20):
        assert refused()
    assert ehr.connections == THRESHOLD  # only the child's failing calls reached the service


def test_half_open_admits_exactly_the_configured_trials_across_two_processes(
        ehr_quick: ServiceServer) -> None:
    _fail_until_open(ehr_quick)
    services = _services(ehr_quick.url, reset_timeout=RESET)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [_spawn(_child_trials, services, 12, barrier) for _ in range(2)]
    results = [_result(p, q) for p, q in procs]
    # The children start after the reset timeout; the first admission moves the breaker to
    # half-open, atomically, in whichever process got there; the rest compete for the trials.
    assert sum(r["admitted"] for r in results) == TRIALS
    assert sum(r["trials"] for r in results) == TRIALS
    assert sum(r["refused"] for r in results) == 2 * 12 - TRIALS
    st = breaker.state("ehr")
    assert st["state"] == "half_open"
    assert st["trials"] == TRIALS


def test_closes_on_a_successful_trial_and_reopens_on_a_failed_one(
        ehr_quick: ServiceServer) -> None:
    ehr = ehr_quick
    _fail_until_open(ehr)
    _wait_reset()
    # Still failing: the trial call fails and the breaker opens again.
    with pytest.raises(urllib.error.HTTPError), health.guard("ehr"):
        _call(ehr.url)
    assert breaker.state("ehr")["state"] == "open"
    _wait_reset()
    ehr.mode = "fast"
    with health.guard("ehr"):
        assert _call(ehr.url) == 200
    assert breaker.state("ehr")["state"] == "closed"
    for _ in range(5):
        with health.guard("ehr"):
            _call(ehr.url)
    events = store.client().xrange(keys.events())
    assert [(e["from"], e["to"], e["source"]) for _, e in events] == [
        ("closed", "open", "call"), ("open", "half_open", "call"), ("half_open", "open", "call"),
        ("open", "half_open", "call"), ("half_open", "closed", "call"),
    ]
    assert all(e["breaker"] == "ehr" and e["v"] == "1" for _, e in events)


def test_state_changes_are_sent_as_a_django_signal(ehr: ServiceServer) -> None:
    received: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        received.append(kwargs)

    def broken(sender: Any, **kwargs: Any) -> None:
        raise RuntimeError("a receiver's bug must not break the guarded call")

    health.breaker_state_changed.connect(receiver)
    health.breaker_state_changed.connect(broken)
    try:
        _fail_until_open(ehr)
    finally:
        health.breaker_state_changed.disconnect(receiver)
        health.breaker_state_changed.disconnect(broken)
    assert len(received) == 1
    got = received[0]
    assert (got["service"], got["instance"], got["old"], got["new"], got["source"]) == (
        "ehr", None, "closed", "open", "call")
    assert got["epoch"] == 1


def test_an_outcome_from_before_a_state_change_is_ignored(ehr: ServiceServer) -> None:
    b = breaker.breaker_for("ehr")
    early = b.admit()  # admitted while closed; its call is slow
    _fail_until_open(ehr)
    assert b.record(True, epoch=early.epoch) is None  # a late success does not close it
    assert breaker.state("ehr")["state"] == "open"


def test_exceptions_that_say_nothing_about_the_service_do_not_count(ehr: ServiceServer) -> None:
    for _ in range(THRESHOLD + 2):
        with pytest.raises(KeyError), health.guard("ehr", ignore=(KeyError,)):
            raise KeyError("a business error")
        with pytest.raises(ValueError, match="x"), health.guard(
                "ehr", failure_on=(OSError,)):
            raise ValueError("x")
    assert breaker.state("ehr")["state"] == "closed"
    assert breaker.state("ehr")["recent_failures"] == 0


def test_failures_outside_the_window_do_not_open(server: ServiceServer) -> None:
    with override_settings(HMS_TASKS_SERVICES=_services(server.url, failure_window=0.3)):
        for _ in range(THRESHOLD - 1):
            with pytest.raises(urllib.error.HTTPError), health.guard("ehr"):
                _call(server.url)
        first = time.time()
        wait_for(lambda: time.time() > first + 0.4, what="the failure window to pass")
        with pytest.raises(urllib.error.HTTPError), health.guard("ehr"):
            _call(server.url)
        assert breaker.state("ehr")["state"] == "closed"


def test_decorator_and_async_variants(ehr: ServiceServer) -> None:
    @health.guard("ehr")
    def fetch() -> int:
        return _call(ehr.url)

    @health.guard("ehr")
    async def fetch_async() -> int:
        return await asyncio.to_thread(_call, ehr.url)

    async def scenario() -> list[str]:
        seen = []
        for _ in range(THRESHOLD):
            with pytest.raises(urllib.error.HTTPError):
                await fetch_async()
        seen.append(breaker.state("ehr")["state"])
        with pytest.raises(ServiceUnavailable):
            await fetch_async()
        with pytest.raises(ServiceUnavailable):
            async with health.guard("ehr"):
                await asyncio.to_thread(_call, ehr.url)
        return seen

    assert asyncio.run(scenario()) == ["open"]
    with pytest.raises(ServiceUnavailable):
        fetch()
    assert ehr.connections == THRESHOLD
    assert fetch.__name__ == "fetch"


def test_one_guard_object_serves_concurrent_async_blocks(ehr: ServiceServer) -> None:
    ehr.mode = "fast"
    shared = health.guard("ehr")

    async def one() -> int:
        async with shared:
            return await asyncio.to_thread(_call, ehr.url)

    async def many() -> list[int]:
        return list(await asyncio.gather(*(one() for _ in range(10))))

    assert asyncio.run(many()) == [200] * 10
    assert breaker.state("ehr")["state"] == "closed"


def test_sweeps_feed_the_breaker(server: ServiceServer) -> None:
    from hms_tasks.health import sweep

    services = _services(server.url, sweep_failure_weight=THRESHOLD, reset_timeout=RESET)
    with override_settings(HMS_TASKS_SERVICES=services):
        summary = sweep.sweep()
        assert summary["down"] == 1
        assert summary["breakers_opened"] == 2  # the service's and its instance's
        assert breaker.state("ehr")["state"] == "open"
        seen = server.connections
        with pytest.raises(ServiceUnavailable), health.guard("ehr"):
            _call(server.url)
        assert server.connections == seen
        server.mode = "fast"
        _wait_reset()
        summary = sweep.sweep()
        assert summary["up"] == 1
        assert summary["breakers_closed"] == 2
        assert breaker.state("ehr")["state"] == "closed"


def test_redis_outage_fails_open_and_is_logged_once(
        tmp_path: Path, server: ServiceServer, caplog: pytest.LogCaptureFixture,
) -> None:
    # A Redis of its own: stopping the session's would break other clients' pooled connections.
    own = RedisServer(tmp_path / "redis")
    own.start()
    server.mode = "fast"
    try:
        with override_settings(HMS_TASKS_SERVICES=_services(server.url),
                               HMS_TASKS_REDIS_URL=own.url):
            with health.guard("ehr"):
                _call(server.url)  # connections to Redis exist, then Redis goes away
            caplog.set_level(logging.INFO, logger="hms_tasks.health.breaker")
            own.stop()
            try:
                for _ in range(50):
                    with health.guard("ehr"):
                        assert _call(server.url) == 200
            finally:
                own.start()
            warnings = [r for r in caplog.records if r.name == "hms_tasks.health.breaker"]
            assert len(warnings) == 1
            assert "unreachable" in warnings[0].getMessage()
            assert "failing open" in warnings[0].getMessage()

            def enforced_again() -> bool:
                with health.guard("ehr"):
                    _call(server.url)
                return len([r for r in caplog.records
                            if "answers again" in r.getMessage()]) == 1

            wait_for(enforced_again, timeout=10, what="the guard to use Redis again")
    finally:
        own.stop()


def test_redis_unreachable_can_fail_closed(server: ServiceServer,
                                           caplog: pytest.LogCaptureFixture) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    with override_settings(HMS_TASKS_SERVICES=_services(server.url), HMS_TASKS_REDIS_URL=nowhere,
                           HMS_TASKS_BREAKER_FAIL_OPEN=False):
        caplog.set_level(logging.WARNING, logger="hms_tasks.health.breaker")
        for _ in range(20):
            with pytest.raises(ServiceUnavailable) as info, health.guard("ehr"):
                _call(server.url)
            assert info.value.state == "unknown"
        assert server.connections == 0
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 1
        assert "failing closed" in messages[0]


def test_an_operator_can_close_a_breaker(ehr: ServiceServer) -> None:
    _fail_until_open(ehr)
    t = breaker.reset("ehr")
    assert t is not None
    assert (t.old, t.new, t.source) == ("open", "closed", "reset")
    assert breaker.state("ehr")["state"] == "closed"
    assert breaker.state("ehr")["recent_failures"] == 0
    assert breaker.reset("ehr") is None  # already closed
    ehr.mode = "fast"
    with health.guard("ehr"):
        assert _call(ehr.url) == 200
