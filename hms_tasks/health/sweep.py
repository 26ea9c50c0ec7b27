"""The sweep (every registered service, single-flight) and the check of one service.

Single flight: a sweep runs only while it holds the lock ``<p>:lock:health.sweep``
(:func:`hms_tasks.store.single_flight`: a token per holder, released only by its holder,
expiring after the task's hard time limit if its worker died); a sweep that finds the lock
taken returns a summary saying it skipped, so a slow sweep never overlaps the next one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from hms_tasks import store
from hms_tasks.health import checks, history, registry
from hms_tasks.health.breaker import Transition
from hms_tasks.health.checks import ServiceResult

__all__ = ["LOCK_NAME", "LOCK_S", "check_service", "summarize", "sweep"]

#: The sweep's single-flight lock (``<p>:lock:health.sweep``).
LOCK_NAME = "health.sweep"
#: Lifetime of the sweep lock: the sweep task's hard time limit.
LOCK_S = 30.0
#: Service names listed in a summary's ``down_services`` at most.
MAX_LISTED = 50


def summarize(results: Sequence[ServiceResult], transitions: Sequence[Transition], *,
              checks_s: float, started: float) -> dict[str, Any]:
    """The run report of a sweep or check: counts, the down services' names, durations."""
    instances = [i for r in results for i in r.instances]
    return {
        "skipped": False,
        "services": len(results),
        "up": sum(r.status == "up" for r in results),
        "degraded": sum(r.status == "degraded" for r in results),
        "down": sum(r.status == "down" for r in results),
        "instances": len(instances),
        "instances_up": sum(i.status == "up" for i in instances),
        "instances_degraded": sum(i.status == "degraded" for i in instances),
        "instances_down": sum(i.status == "down" for i in instances),
        "breakers_opened": sum(t.new == "open" for t in transitions),
        "breakers_closed": sum(t.new == "closed" for t in transitions),
        "down_services": sorted(r.service for r in results if r.status == "down")[:MAX_LISTED],
        "slowest_ms": max((i.latency_ms for i in instances), default=0.0),
        "checks_ms": round(checks_s * 1000, 3),
        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
    }


def sweep() -> dict[str, Any]:
    """Check every instance of every registered service at once, record the results, feed
    the breakers; or skip if another sweep holds the lock."""
    started = time.perf_counter()
    with store.single_flight(LOCK_NAME, ttl=LOCK_S) as mine:
        if not mine:
            return {"skipped": True, "reason": "another sweep is running"}
        results, seconds = checks.run(list(registry.services().values()))
        transitions = history.record(results, source="sweep")
    return summarize(results, transitions, checks_s=seconds, started=started)


def check_service(name: str) -> dict[str, Any]:
    """Check every instance of one registered service now (no lock: it is one service)."""
    started = time.perf_counter()
    results, seconds = checks.run([registry.get(name)])
    transitions = history.record(results, source="check")
    return summarize(results, transitions, checks_s=seconds, started=started)
