"""Redis key layout of the health capability (``<p>`` is ``HMS_TASKS_REDIS_PREFIX``)::

    <p>:health:breaker:<name>          HASH   breaker state (v, state, epoch, opened_at,
                                              half_open_at, trials, changed_at); 7-day TTL
                                              renewed at every change (gone = closed)
    <p>:health:breaker:<name>:fails    LIST   recent failure times (ms), capped at the
                                              threshold, TTL of the failure window
    <p>:health:events                  STREAM breaker state changes, capped near 1,000
    <p>:health:history:<name>          ZSET   JSON samples scored by time (ms), the last 24 h,
                                              at most 6,000; 25-hour TTL
    <p>:health:latest:<service>        STRING JSON of the service's last check; 24-hour TTL
    <p>:health:rr:<service>            STRING round-robin counter of ``pick``
    <p>:health:inflight:<name>         ZSET   in-flight lease tokens scored by expiry (ms);
                                              TTL of the longest lease
    <p>:lock:health.sweep              STRING single-flight lock of the running sweep
                                              (store.single_flight: a redis-py Lock token)

``<name>`` is a service (``ehr``) or one of its instances (``ehr@10.0.0.5:8080``). The sweep's
lock was ``<p>:health:sweep:lock`` before the one single-flight lock of :mod:`hms_tasks.store`
took it over: during a rolling upgrade an old and a new sweep may overlap once (harmless: a
sweep only adds samples).
"""

from __future__ import annotations

from hms_tasks import store

__all__ = [
    "breaker",
    "events",
    "fails",
    "history",
    "inflight",
    "latest",
    "name",
    "round_robin",
    "sweep_lock",
]


def name(service: str, instance: str | None = None) -> str:
    """The name of a service's breaker and history, or of one instance's."""
    return service if instance is None else f"{service}@{instance}"


def breaker(target: str) -> str:
    return store.key("health", "breaker", target)


def fails(target: str) -> str:
    return store.key("health", "breaker", target, "fails")


def events() -> str:
    return store.key("health", "events")


def history(target: str) -> str:
    return store.key("health", "history", target)


def latest(service: str) -> str:
    return store.key("health", "latest", service)


def sweep_lock() -> str:
    """The sweep's single-flight lock (held through :func:`hms_tasks.store.single_flight`)."""
    return store.key("lock", "health.sweep")


def round_robin(service: str) -> str:
    return store.key("health", "rr", service)


def inflight(target: str) -> str:
    return store.key("health", "inflight", target)
