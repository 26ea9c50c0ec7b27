"""Metric tasks, on the ``hms.metrics`` queue (and the nodes' direct queues). The work is in
plain functions (:mod:`~hms_tasks.metrics.host`, :mod:`~hms_tasks.metrics.collect`,
:mod:`~hms_tasks.metrics.store`, :mod:`~hms_tasks.metrics.alerts`); these only adapt them.

How the capability splits its work: ``collect`` (any worker, every minute) pings the nodes and
publishes ``collect_node`` to each live node's direct queue; every node samples itself into the
time-series store and one of them the shared services. Nothing waits on a subtask, so a solo
worker never deadlocks on its own sweep. ``rollup`` folds raw points into the 1-minute and
1-hour aggregates, prunes what retention dropped and turns the API's request timings into
series; ``evaluate_alerts`` runs the alert rules over the newest points and hands each
notification to ``deliver_webhook``, which retries with backoff.
"""

from __future__ import annotations

from typing import Annotated, Any

import redis
from pydantic import Field

from hms_tasks import store
from hms_tasks.base import Capability
from hms_tasks.errors import InvalidArguments, TransientError
from hms_tasks.metrics import alerts, collect, host, names, settings, timings
from hms_tasks.metrics import store as ts

__all__ = [
    "collect_host",
    "collect_node",
    "collect_sweep",
    "deliver_webhook",
    "evaluate_alerts",
    "metrics",
    "rollup",
]

metrics = Capability(name="metrics", soft_time_limit=20, time_limit=30,
                     autoretry_for=(redis.ConnectionError, redis.TimeoutError))

_EVENT_FIELDS = set(alerts.Transition.__annotations__)
#: The rollup's single-flight lock (``<p>:lock:metrics:rollup``) and its TTL, above the task's
#: hard time limit (30 s) so it never lapses under a running rollup; if a worker dies holding
#: it, the next run after the TTL proceeds.
ROLLUP_LOCK = "metrics:rollup"
ROLLUP_LOCK_TTL = 50


@metrics.task(names.METRICS_COLLECT_HOST)
def collect_host() -> dict[str, Any]:
    """Snapshot the node this worker runs on (psutil): CPU per core and total, memory, swap,
    disk usage and I/O, network counters, load average, and the worker process's RSS, threads
    and open files.

    When: every minute from beat (``metrics-collect-host``), or ad hoc. Takes about 0.1 s the
    first time in a process, a few ms after. Idempotent (a read-only sample; a re-run just
    takes a newer one). Writes: its run report, whose summary is the sample
    (``<prefix>:report:hms.metrics.collect_host:*``). Returns the sample: counts and
    percentages of the machine, nothing about patients.
    """
    return dict(host.snapshot())


@metrics.task(names.METRICS_COLLECT)
def collect_sweep() -> dict[str, Any]:
    """Start a metrics sweep of every node: ping the workers, record the known nodes that did
    not answer as missing (``node.up`` 0), publish ``collect_node`` to each live node's direct
    queue, and close the previous sweep (its nodes that never reported count as missing).

    When: every minute from beat (``metrics-collect``). About the ping timeout
    (``HMS_TASKS_METRICS_PING_TIMEOUT``, 1 s). Idempotent: a re-run starts another sweep, which
    only adds samples. Retries Redis connection errors. Writes ``<p>:metrics:sweep:*``,
    ``<p>:nodes`` and ``node.up`` series. Returns the sweep id, the live nodes and the missing
    ones (node names, no data).
    """
    return collect.start_sweep()


@metrics.task(names.METRICS_COLLECT_NODE)
def collect_node(sweep: Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9]+$",
                                             description="a sweep id")] | None = None
                 ) -> dict[str, Any]:
    """Sample the node that runs it: host (CPU, memory, swap, disk, network, load) and worker
    processes (RSS, threads, open files and tasks run per pool child); the first node of a
    sweep also samples Redis, the Celery queues and the database.

    When: published by ``collect`` to each node's direct queue (``<node>.dq2``), or ad hoc
    (then it samples the shared services too). A few ms, plus up to 1 s when it samples the
    services (``inspect`` replies). Idempotent: another sample of the same moment. Retries
    Redis connection errors. Writes the node's series, ``<p>:metrics:sweep:<id>`` and
    ``<p>:nodes``. Returns counts and whether this report completed the sweep.
    """
    if sweep is not None and (len(sweep) > 64 or not sweep.isalnum()):
        raise InvalidArguments(names.METRICS_COLLECT_NODE, ["sweep: expected a sweep id"])
    return collect.collect_node(sweep)


@metrics.task(names.METRICS_ROLLUP)
def rollup() -> dict[str, Any]:
    """Turn the API's completed minutes of request timings into series (requests, errors,
    error rate, mean and p95 duration), fold new raw points into the 1-minute and 1-hour
    aggregates, and delete every block whose retention ended.

    When: every minute from beat (``metrics-rollup``). Milliseconds per thousand series. One
    at a time (a lock): a second concurrent run returns at once. Idempotent: each raw byte is
    folded once (the fold offset moves atomically with the fold). Retries Redis connection
    errors. Writes ``<p>:ts:*`` (and holds ``<p>:lock:metrics:rollup``). Returns counts.
    """
    # Owner-checked: a run that outlived the lock's TTL cannot free the next run's lock.
    with store.single_flight(ROLLUP_LOCK, ttl=ROLLUP_LOCK_TTL) as mine:
        if not mine:
            return {"skipped": True}
        api_points = timings.convert()
        if api_points:
            ts.write(api_points)
        summary: dict[str, Any] = dict(ts.rollup())
        summary["api_points"] = len(api_points)
        return summary


@metrics.task(names.METRICS_EVALUATE_ALERTS)
def evaluate_alerts() -> dict[str, Any]:
    """Evaluate the alert rules (``HMS_TASKS_ALERT_RULES``) against the newest point of every
    series; persist state changes (pending, firing, resolved); log every transition and hand
    each firing or resolved one to ``deliver_webhook`` for every configured webhook.

    When: every minute from beat (``metrics-evaluate-alerts``). Milliseconds (1,000 series in
    well under 100 ms, benchmarked). Idempotent: re-evaluating the same points changes nothing.
    Retries Redis connection errors. Writes ``<p>:alerts:state`` and ``<p>:alerts:events``.
    Returns counts (rules, series, pending, firing, transitions, webhooks queued).
    """
    counts, notify = alerts.evaluate_and_store()
    hooks = sorted(settings.get().alert_webhooks)
    for event in notify:
        for hook in hooks:
            deliver_webhook.apply_async(kwargs={"webhook": hook, "event": dict(event)},
                                        ignore_result=True)
    return {**counts, "webhooks_queued": len(notify) * len(hooks)}


# Retries wait 2, 4, 8, 16, 32 and 64 s (less with jitter): a countdown plus the 30 s hard
# limit must stay below the visibility timeout (checked at start-up), hence the cap of 100 s.
@metrics.task(names.METRICS_DELIVER_WEBHOOK, autoretry_for=(TransientError,), max_retries=6,
              retry_backoff=2, retry_backoff_max=100)
def deliver_webhook(webhook: str, event: dict[str, Any]) -> dict[str, Any]:
    """POST one alert notification (``event``: a transition of ``<p>:alerts:events``) as JSON
    to the webhook named ``webhook`` in ``HMS_TASKS_ALERT_WEBHOOKS``.

    When: queued by ``evaluate_alerts``. One request of at most ``HMS_TASKS_WEBHOOK_TIMEOUT``
    seconds; redirects are never followed. A URL the allowlist does not allow is refused
    before any network traffic. Retries connection errors, timeouts, 408, 429 and 5xx with
    exponential backoff (up to 6 times, 2 to 64 s apart); 4xx and redirects fail at
    once. At-least-once: a receiver may see a notification twice (``id`` and ``at`` identify
    it). Writes nothing. Returns the HTTP status.
    """
    unknown = set(event) - _EVENT_FIELDS
    if unknown:
        raise InvalidArguments(names.METRICS_DELIVER_WEBHOOK,
                               ["event: only alert transition fields are sent"])
    url = alerts.webhook_url(webhook)
    status = alerts.deliver(url, {"v": 1, "source": "hms-tasks", "alert": event})
    return {"webhook": webhook, "status": status, "rule": event.get("rule"),
            "state": event.get("new")}
