"""Connection pool health: each process's psycopg pool, published, gathered and kept as series.

Django 5.1+ pools PostgreSQL connections itself when ``DATABASES[...]["OPTIONS"]["pool"]`` is
set (a ``psycopg_pool.ConnectionPool`` per process and alias, reached as
``connections[alias].pool``). A pool lives inside its process, so:

* every process that does database work publishes its pool's figures (``get_stats()``) at most
  every :data:`PUBLISH_EVERY` seconds, after a Celery task (``task_postrun``) or a Django
  request (``request_finished``), with :func:`publish`; a Redis outage drops the figures,
  never the request;
* the metrics sample of a worker node (``hms.metrics.collect_node``) and ``hms.queries.db_health``
  gather them (:func:`node_points`, :func:`processes`) and write, per node, what changed since
  the previous gathering.

Series (labels ``node``; processes outside a Celery worker are under ``none@<host>``)::

    db.pool.size, db.pool.available, db.pool.max    connections: open, idle in the pool, cap
    db.pool.waiting                                  requests waiting for a connection now
    db.pool.used_percent                             (size - available) / max x 100
    db.pool.requests_per_s, db.pool.errors_per_s     since the previous gathering
    db.pool.wait_ms_mean                             mean wait of a request (0 if not queued)
    db.pool.wait_p95_ms                              the p95 wait, estimated (below)

psycopg_pool counts totals, not a distribution: requests, requests that had to queue, and the
milliseconds they waited in all. A request that did not queue got a connection at once. So
when at most 5 % of the interval's requests queued, the p95 wait is 0; otherwise it is taken as
the mean wait of a queued request. That is an estimate (a queued request's p95 lies above its
mean when waits vary), good for "the pool makes requests wait", which is what the alert says.

Layout (``<p>`` is ``HMS_TASKS_REDIS_PREFIX``)::

    <p>:queries:pool        HASH  "<node>|<pid>" -> JSON PoolFigures (published)
    <p>:queries:pool:prev   HASH  "<node>|<pid>" -> "at requests queued wait_ms errors"

Both expire a day after the last write; figures older than ``HMS_TASKS_DB_POOL_STALE_SECONDS``
are left out and removed when read.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any, TypedDict, cast

from hms_tasks import nodes, store
from hms_tasks.metrics import store as ts
from hms_tasks.queries import settings as queries_settings

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

__all__ = [
    "FIGURES_VERSION",
    "PUBLISH_EVERY",
    "PoolFigures",
    "connect_signals",
    "figures",
    "node_points",
    "processes",
    "publish",
    "summarize",
]

logger = logging.getLogger(__name__)

FIGURES_VERSION = 1
PUBLISH_EVERY = 10.0
KEY_TTL = 86400
#: Share of an interval's requests that may queue with the p95 wait still 0.
P95_QUEUED_SHARE = 0.05
_COUNTERS = ("requests_num", "requests_queued", "requests_wait_ms", "requests_errors",
             "connections_errors", "connections_lost", "returns_bad")


class PoolFigures(TypedDict):
    v: int
    node: str
    pid: int
    alias: str
    at: float
    #: Measures now.
    pool_min: int
    pool_max: int
    pool_size: int
    pool_available: int
    requests_waiting: int
    #: Counters since the pool was created.
    requests_num: int
    requests_queued: int
    requests_wait_ms: int
    requests_errors: int
    connections_errors: int
    connections_lost: int
    returns_bad: int


def figures(alias: str | None = None, *, now: float | None = None) -> PoolFigures | None:
    """This process's pool figures for ``alias``; None when the alias has no pool (pooling
    off, or not PostgreSQL)."""
    from django.db import connections

    alias = alias or queries_settings.get().db_alias
    conn = connections[alias]
    if conn.vendor != "postgresql":
        return None
    # Django's public handle on its psycopg_pool.ConnectionPool (5.1+; not in django-stubs).
    pool = cast("ConnectionPool[Any] | None", getattr(conn, "pool", None))
    if pool is None:
        return None
    stats: dict[str, int] = pool.get_stats()  # counters absent until they first count
    doc: dict[str, Any] = {
        "v": FIGURES_VERSION, "node": nodes.current(), "pid": os.getpid(), "alias": alias,
        "at": time.time() if now is None else now,
    }
    for name in ("pool_min", "pool_max", "pool_size", "pool_available", "requests_waiting",
                 *_COUNTERS):
        doc[name] = int(stats.get(name, 0))
    return cast(PoolFigures, doc)


def _field(doc: PoolFigures) -> str:
    return f"{doc['node']}|{doc['pid']}"


def _key(*parts: str) -> str:
    return store.key("queries", "pool", *parts)


_last_publish = 0.0


def publish(*, force: bool = False, now: float | None = None) -> PoolFigures | None:
    """Store this process's pool figures (at most every :data:`PUBLISH_EVERY` seconds unless
    ``force``); returns them, or None when nothing was due or there is no pool."""
    global _last_publish
    now = time.time() if now is None else now
    if not force and now - _last_publish < PUBLISH_EVERY:
        return None
    _last_publish = now
    doc = figures(now=now)
    if doc is None:
        return None
    pipe = store.client().pipeline(transaction=True)
    pipe.hset(_key(), _field(doc), json.dumps(doc, separators=(",", ":")))
    pipe.expire(_key(), KEY_TTL)
    pipe.execute()
    return doc


def _after_work(**_: Any) -> None:
    try:
        publish()
    except Exception:
        # Telemetry: a Redis or database hiccup must never fail the task or request.
        logger.debug("pool figures not published", exc_info=True)


def connect_signals() -> None:
    """Publish after every Celery task and Django request (rate-limited); idempotent.
    Called when the queries tasks load; a web process calls it from its app's ``ready()``."""
    from celery.signals import task_postrun
    from django.core.signals import request_finished

    task_postrun.connect(_after_work, dispatch_uid="hms_tasks.queries.pool.task")
    request_finished.connect(_after_work, dispatch_uid="hms_tasks.queries.pool.request")


def processes(*, node: str | None = None, now: float | None = None) -> list[PoolFigures]:
    """Published figures that are current (of ``node``'s processes only, if given), this
    process's own read fresh; stale ones are removed."""
    now = time.time() if now is None else now
    stale = queries_settings.get().db_pool_stale_seconds
    client = store.client()
    raw = cast("dict[str, str]", client.hgetall(_key()))
    out: dict[str, PoolFigures] = {}
    gone: list[str] = []
    for fld, text in raw.items():
        doc = cast(PoolFigures, json.loads(text))
        if now - doc["at"] > stale:
            gone.append(fld)
        elif node is None or doc["node"] == node:
            out[fld] = doc
    mine = figures(now=now)
    if mine is not None and (node is None or mine["node"] == node):
        out[_field(mine)] = mine
    if gone:
        pipe = client.pipeline(transaction=False)
        pipe.hdel(_key(), *gone)
        pipe.hdel(_key("prev"), *gone)
        pipe.execute()
    return sorted(out.values(), key=lambda d: (d["node"], d["pid"]))


def summarize(docs: list[PoolFigures], prev: dict[str, str] | None = None) -> dict[str, float]:
    """One node's figures from its processes': sums of the measures, and rates and waits over
    the interval since ``prev`` (field -> "at requests queued wait_ms errors"; a process
    without one counts from its start, as does one whose counters went back)."""
    prev = prev or {}
    size = sum(d["pool_size"] for d in docs)
    available = sum(d["pool_available"] for d in docs)
    cap = sum(d["pool_max"] for d in docs)
    out: dict[str, float] = {
        "processes": float(len(docs)), "size": float(size), "available": float(available),
        "max": float(cap), "waiting": float(sum(d["requests_waiting"] for d in docs)),
        "used_percent": round(100.0 * (size - available) / cap, 3) if cap else 0.0,
    }
    requests = queued = wait_ms = errors = 0
    seconds = 0.0
    for d in docs:
        now_counts = (d["requests_num"], d["requests_queued"], d["requests_wait_ms"],
                      d["requests_errors"] + d["connections_errors"])
        before = prev.get(_field(d))
        base: tuple[float, int, int, int, int] = (d["at"], 0, 0, 0, 0)
        if before is not None:
            at0, *counts = before.split()
            parsed = (float(at0), *(int(c) for c in counts))
            if all(n >= b for n, b in zip(now_counts, parsed[1:], strict=True)):
                base = cast("tuple[float, int, int, int, int]", parsed)
        requests += now_counts[0] - base[1]
        queued += now_counts[1] - base[2]
        wait_ms += now_counts[2] - base[3]
        errors += now_counts[3] - base[4]
        seconds = max(seconds, d["at"] - base[0])
    if seconds > 0:
        out["requests_per_s"] = round(requests / seconds, 4)
        out["errors_per_s"] = round(errors / seconds, 4)
    if requests:
        out["wait_ms_mean"] = round(wait_ms / requests, 3)
        out["wait_p95_ms"] = (0.0 if queued <= P95_QUEUED_SHARE * requests
                              else round(wait_ms / queued, 3))
    return out


def node_points(node: str | None = None, *,
                now: float | None = None) -> tuple[dict[str, dict[str, float]],
                                                   list[tuple[str, float, float]]]:
    """Per node (``node`` only, if given), the summary of its processes' pools and the points
    to store; remembers the counters for the next interval."""
    now = time.time() if now is None else now
    docs = processes(node=node, now=now)
    if not docs:
        return {}, []
    client = store.client()
    prev = cast("list[str | None]", client.hmget(_key("prev"), [_field(d) for d in docs]))
    prev_map = {_field(d): p for d, p in zip(docs, prev, strict=True) if p is not None}
    by_node: dict[str, list[PoolFigures]] = {}
    for d in docs:
        by_node.setdefault(d["node"], []).append(d)
    summaries: dict[str, dict[str, float]] = {}
    points: list[tuple[str, float, float]] = []
    for name, group in by_node.items():
        summary = summarize(group, prev_map)
        summaries[name] = summary
        labels = {"node": name}
        points += [(ts.series_id(f"db.pool.{k}", labels), now, v) for k, v in summary.items()
                   if k != "processes"]
    pipe = client.pipeline(transaction=True)
    pipe.hset(_key("prev"), mapping={
        _field(d): f"{d['at']!r} {d['requests_num']} {d['requests_queued']}"
                   f" {d['requests_wait_ms']} {d['requests_errors'] + d['connections_errors']}"
        for d in docs})
    pipe.expire(_key("prev"), KEY_TTL)
    pipe.execute()
    return summaries, points
