"""Health tasks, on the ``hms.health`` queue. The work is in plain functions
(:mod:`~hms_tasks.health.sweep`, :mod:`~hms_tasks.health.checks`,
:mod:`~hms_tasks.health.history`); these only adapt them to Celery.

How the capability splits its work: ``sweep`` checks every instance of every registered
service at once on one event loop, keeps the results as history and feeds the breakers;
``check_service`` does the same for one service on demand. HMS processes never wait for
either: their guards read the breakers' state from Redis (:mod:`~hms_tasks.health.breaker`).
"""

from __future__ import annotations

from typing import Annotated, Any

import redis

from hms_tasks.base import Capability
from hms_tasks.errors import InvalidArguments
from hms_tasks.health import names, registry
from hms_tasks.health import sweep as sweeping
from hms_tasks.params import known

__all__ = ["check_service", "health", "sweep"]

# Soft/hard limits above the longest sweep the settings allow (a service's instances /
# max_connections x timeout is at most settings.SWEEP_BUDGET = 20 s); the lock outlives neither.
health = Capability(name="health", soft_time_limit=25, time_limit=sweeping.LOCK_S,
                    autoretry_for=(redis.ConnectionError, redis.TimeoutError), max_retries=2)


@health.task(names.HEALTH_SWEEP, autoretry_for=())
def sweep() -> dict[str, Any]:
    """Check every instance of every service in HMS_TASKS_SERVICES concurrently (HTTP, TCP,
    Redis PING or database SELECT 1), classify each up, degraded or down, keep the results as
    history and feed every service and instance circuit breaker.

    When: every 30 s from beat (``health-sweep``), or ad hoc. Takes about as long as the
    slowest check (at most its timeout, default 2 s). Single-flight: a sweep that finds
    another one running returns ``{"skipped": true, ...}`` at once. Idempotent (a check reads;
    a re-run adds one more sample). Not retried: the next sweep is 30 s away. Contacts only
    registered instances and never follows redirects. Writes ``<p>:health:history:*``,
    ``<p>:health:latest:*``, the breakers (``<p>:health:breaker:*``, ``<p>:health:events``)
    and the lock ``<p>:lock:health.sweep``. Returns counts: services and instances up,
    degraded and down, breakers opened and closed, the down services' names, durations.
    """
    return sweeping.sweep()


@health.task(names.HEALTH_CHECK_SERVICE)
def check_service(name: Annotated[str, known(registry.services, "service")]) -> dict[str, Any]:
    """Check every instance of one registered service now, like a sweep does.

    When: on demand (an operator, or HMS code that wants a fresh verdict). Takes at most the
    service's timeout. Idempotent (a check reads). Retries Redis connection errors. Refuses a
    name that HMS_TASKS_SERVICES does not list (InvalidArguments, nothing contacted). Writes
    and returns what a sweep does, for one service.
    """
    if name not in registry.services():
        raise InvalidArguments(names.HEALTH_CHECK_SERVICE, [
            "name: unknown service (allowed: " + ", ".join(sorted(registry.services())) + ")"])
    return sweeping.check_service(name)
