"""Instance selection: round robin, least connections with in-flight leases in Redis (shared
by every process), and instances whose breaker is open skipped."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import override_settings

from hms_tasks import health, store
from hms_tasks.errors import InvalidArguments, ServiceUnavailable
from hms_tasks.health import breaker, keys
from tests.health_servers import only
from tests.helpers import wait_for

PORTS = (8301, 8302, 8303)
URLS = [f"http://127.0.0.1:{p}" for p in PORTS]
IDS = [f"127.0.0.1:{p}" for p in PORTS]


def _services() -> dict[str, Any]:
    # pick() never contacts an instance: nothing needs to listen on these ports.
    return only(patient={"instances": URLS, "breaker": {"failure_threshold": 1,
                                                        "reset_timeout": 60}})


@pytest.fixture(autouse=True)
def _patient() -> Iterator[None]:
    with override_settings(HMS_TASKS_SERVICES=_services()):
        yield


def _open(instance: str) -> None:
    breaker.breaker_for("patient", instance).record(False)
    assert breaker.state("patient", instance)["state"] == "open"


def test_round_robin_rotates_through_every_instance() -> None:
    picked = [health.pick("patient") for _ in range(9)]
    assert Counter(picked) == dict.fromkeys(URLS, 3)
    assert picked[:3] in ([URLS[0], URLS[1], URLS[2]], [URLS[1], URLS[2], URLS[0]],
                          [URLS[2], URLS[0], URLS[1]])
    assert picked[3:6] == picked[:3]


def test_instances_with_an_open_breaker_are_skipped() -> None:
    _open(IDS[1])
    picked = {health.pick("patient") for _ in range(9)}
    assert picked == {URLS[0], URLS[2]}
    least = {health.pick("patient", strategy="least_connections") for _ in range(9)}
    assert least == {URLS[0], URLS[2]}
    _open(IDS[0])
    _open(IDS[2])
    with pytest.raises(ServiceUnavailable) as info:
        health.pick("patient")
    assert info.value.service == "patient"


def test_least_connections_picks_the_idle_instance() -> None:
    with health.lease("patient") as first, health.lease("patient") as second:
        assert first.instance != second.instance
        assert first.in_flight == second.in_flight == 1
        idle = next(u for u in URLS if u not in (first.url, second.url))
        for _ in range(5):
            assert health.pick("patient", strategy="least_connections") == idle
        with health.lease("patient") as third:
            assert third.url == idle
            # All busy once: the next lease doubles up on one of them.
            with health.lease("patient") as fourth:
                assert fourth.in_flight == 2
    # Released: every instance is idle again.
    for i in IDS:
        assert store.client().zcard(keys.inflight(f"patient@{i}")) == 0


def _hold_lease(services: dict[str, Any], held: Any, release: Any, out: Any) -> None:
    import django

    django.setup()
    with override_settings(HMS_TASKS_SERVICES=services), health.lease("patient") as one, \
            health.lease("patient") as two:
        out.put([one.url, two.url])
        held.set()
        release.wait(60)
    out.put("released")


def test_in_flight_counts_are_shared_between_processes() -> None:
    ctx = multiprocessing.get_context("spawn")
    held, release, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_hold_lease, args=(_services(), held, release, out))
    proc.start()
    try:
        busy = out.get(timeout=120)
        idle = next(u for u in URLS if u not in busy)
        assert {health.pick("patient", strategy="least_connections") for _ in range(5)} == {idle}
    finally:
        release.set()
        assert out.get(timeout=60) == "released"
        proc.join(timeout=60)
    assert proc.exitcode == 0
    assert len({health.pick("patient", strategy="least_connections") for _ in range(6)}) == 3


def test_a_lease_left_behind_expires() -> None:
    lease = health.lease("patient", ttl=0.2)
    lease.__enter__()  # its holder "dies": __exit__ never runs
    busy = lease.url
    assert health.pick("patient", strategy="least_connections") != busy
    # Once the lease ran out, least connections spreads over all three again.
    wait_for(lambda: len({health.pick("patient", strategy="least_connections")
                          for _ in range(6)}) == 3, timeout=5, what="the lease to expire")


def test_async_lease() -> None:
    async def scenario() -> tuple[str, str]:
        async with health.lease("patient") as a, health.lease("patient") as b:
            return a.url, b.url

    a, b = asyncio.run(scenario())
    assert a != b
    for i in IDS:
        assert store.client().zcard(keys.inflight(f"patient@{i}")) == 0


def test_bad_strategy_is_refused() -> None:
    with pytest.raises(InvalidArguments, match="strategy: expected one of round_robin"):
        health.pick("patient", strategy="random")  # type: ignore[arg-type]


def test_redis_unreachable_picks_per_the_fail_mode() -> None:
    from tests.helpers import free_port

    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    with override_settings(HMS_TASKS_REDIS_URL=nowhere):
        assert health.pick("patient") in URLS
        with health.lease("patient") as inst:
            assert inst.url in URLS
            assert inst.in_flight == 0
    with override_settings(HMS_TASKS_REDIS_URL=nowhere, HMS_TASKS_BREAKER_FAIL_OPEN=False), \
            pytest.raises(ServiceUnavailable) as info:
        health.pick("patient", strategy="least_connections")
    assert info.value.state == "unknown"
