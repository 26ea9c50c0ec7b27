"""The sweep (every registered service, single-flight) and the check of one service.

Single flight: a sweep runs only while it holds ``<p>:health:sweep:lock`` (``SET NX PX``
with a random token, released by a compare-and-delete script, expiring after the task's hard
time limit if its worker died); a sweep that finds the lock taken returns a summary saying it
skipped, so a slow sweep never overlaps the next one.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from functools import cache
from typing import Any

from redis.commands.core import Script

from hms_tasks import conf, store
from hms_tasks.health import checks, history, keys, lua, registry
from hms_tasks.health.breaker import Transition
from hms_tasks.health.checks import ServiceResult

__all__ = ["LOCK_MS", "check_service", "summarize", "sweep"]

#: Lifetime of the sweep lock: the sweep task's hard time limit.
LOCK_MS = 30_000
#: Service names listed in a summary's ``down_services`` at most.
MAX_LISTED = 50


@cache
def _unlock_script(url: str) -> Script:
    return store.client().register_script(lua.UNLOCK)


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
    client = store.client()
    token = secrets.token_hex(16)
    if not client.set(keys.sweep_lock(), token, nx=True, px=LOCK_MS):
        return {"skipped": True, "reason": "another sweep is running"}
    try:
        results, seconds = checks.run(list(registry.services().values()))
        transitions = history.record(results, source="sweep")
    finally:
        _unlock_script(conf.get().redis_url)(keys=[keys.sweep_lock()], args=[token])
    return summarize(results, transitions, checks_s=seconds, started=started)


def check_service(name: str) -> dict[str, Any]:
    """Check every instance of one registered service now (no lock: it is one service)."""
    started = time.perf_counter()
    results, seconds = checks.run([registry.get(name)])
    transitions = history.record(results, source="check")
    return summarize(results, transitions, checks_s=seconds, started=started)
