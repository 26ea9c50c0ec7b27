"""Collectors: a sample of each node (host and worker processes) and, from one node per sweep,
of the shared services (Redis, Celery queues, the database); and the sweep that gathers them.

A sweep (:func:`start_sweep`, the ``hms.metrics.collect`` task) pings the workers, compares the
answers with the registry of known nodes (:mod:`hms_tasks.nodes`), records the ones that did
not answer as missing (``node.up`` 0), and publishes ``hms.metrics.collect_node`` to each live
node's direct queue. Nothing waits on anything: each node writes its sample to the store and to
the sweep's hash, and the node that completes the set marks the sweep complete. A node that
answered the ping but never reported is *late*; :func:`sweep_status` counts it missing once
the sweep's deadline passed, and the next sweep records that for good.

Layout (``<p>`` is ``HMS_TASKS_REDIS_PREFIX``; all keys of a sweep expire after a day)::

    <p>:metrics:sweep:<id>            HASH  meta (JSON SweepMeta), node:<name> (JSON
                                            NodeSummary), services (JSON), status
    <p>:metrics:sweep:<id>:expected   SET   nodes that answered the ping
    <p>:metrics:sweep:<id>:reported   SET   nodes whose sample arrived
    <p>:metrics:sweep:<id>:services   STRING the node that claimed the shared-service sample
    <p>:metrics:sweep:latest          STRING id of the newest sweep
    <p>:metrics:prev:redis            HASH  the previous Redis INFO counters (for rates)
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, TypedDict, cast

import psutil

from hms_tasks import deadletter, nodes, store
from hms_tasks.metrics import host, names, settings
from hms_tasks.metrics import store as ts
from hms_tasks.names import ALL_QUEUES

__all__ = [
    "NodeSummary",
    "SweepMeta",
    "SweepStatus",
    "celery_sample",
    "collect_node",
    "database_sample",
    "node_sample",
    "redis_sample",
    "services_sample",
    "start_sweep",
    "sweep_status",
]

logger = logging.getLogger(__name__)

SWEEP_VERSION = 1
SWEEP_TTL = 86400
#: Seconds after the ping by which every live node should have reported.
GATHER_SECONDS = 45.0
#: kombu's Redis transport keeps messages of priority p > 0 in "<queue>\x06\x16<p>".
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
Point = tuple[str, float, float]
#: Mean execution time above which a pg_stat_statements entry counts as slow (ms).
SLOW_STATEMENT_MS = 500.0


class SweepMeta(TypedDict):
    v: int
    id: str
    started_at: float
    deadline: float
    expected: list[str]
    #: Known nodes that did not answer the ping.
    missing: list[str]


class ChildSummary(TypedDict):
    pid: int
    rss: int
    threads: int
    open_files: int
    tasks: int | None


class NodeSummary(TypedDict):
    v: int
    node: str
    taken_at: float
    cpu_percent: float
    memory_percent: float
    load1: float
    main: ChildSummary
    children: list[ChildSummary]
    points: int
    services: bool


class SweepStatus(TypedDict):
    id: str
    started_at: float
    expected: list[str]
    reported: list[str]
    missing: list[str]
    late: list[str]
    complete: bool
    services_node: str | None
    samples: dict[str, NodeSummary]


def _key(sweep_id: str, *parts: str) -> str:
    return store.key("metrics", "sweep", sweep_id, *parts)


# -- the node sample ---------------------------------------------------------------------------


def _proc(proc: psutil.Process, tasks: int | None) -> ChildSummary:
    try:
        with proc.oneshot():
            return {"pid": proc.pid, "rss": proc.memory_info().rss,
                    "threads": proc.num_threads(), "open_files": proc.num_fds(), "tasks": tasks}
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return {"pid": proc.pid, "rss": 0, "threads": 0, "open_files": 0, "tasks": tasks}


def node_sample(node: str) -> tuple[NodeSummary, list[tuple[str, float, float]]]:
    """Sample this node: the host (psutil) and the worker's processes. Returns the summary
    and the points to store. A few ms of CPU (benchmarked)."""
    sample = host.snapshot()
    now = sample["taken_at"]
    state = nodes.children_state(node)
    main_proc, children = nodes.pool_processes(known=state.keys())
    main = _proc(main_proc, state[main_proc.pid]["tasks"] if main_proc.pid in state else None)
    kids = [_proc(c, state[c.pid]["tasks"] if c.pid in state else None) for c in children]
    n = {"node": node}
    sid = ts.series_id
    load = sample["load_avg"]
    points = [
        (sid("host.cpu.percent", n), now, sample["cpu"]["percent"]),
        (sid("host.memory.percent", n), now, sample["memory"]["percent"]),
        (sid("host.memory.used_bytes", n), now, float(sample["memory"]["used"])),
        (sid("host.memory.available_bytes", n), now, float(sample["memory"]["available"])),
        (sid("host.swap.percent", n), now, sample["swap"]["percent"]),
        (sid("host.disk.percent", n), now, sample["disk"]["percent"]),
        (sid("host.disk.free_bytes", n), now, float(sample["disk"]["free"])),
        (sid("host.net.bytes_sent", n), now, float(sample["net"]["bytes_sent"])),
        (sid("host.net.bytes_recv", n), now, float(sample["net"]["bytes_recv"])),
        (sid("host.load1", n), now, load[0]),
        (sid("host.load5", n), now, load[1]),
        (sid("host.load15", n), now, load[2]),
        (sid("worker.rss_bytes", n), now, float(main["rss"])),
        (sid("worker.threads", n), now, float(main["threads"])),
        (sid("worker.open_files", n), now, float(main["open_files"])),
        (sid("worker.children", n), now, float(len(kids))),
    ]
    dio = sample["disk"]
    if dio["read_bytes"] is not None and dio["write_bytes"] is not None:
        points += [(sid("host.disk.read_bytes", n), now, float(dio["read_bytes"])),
                   (sid("host.disk.write_bytes", n), now, float(dio["write_bytes"]))]
    pool = kids or [main]
    points += [
        (sid("worker.pool_rss_max_bytes", n), now, float(max(c["rss"] for c in pool))),
        (sid("worker.pool_rss_total_bytes", n), now, float(sum(c["rss"] for c in pool))),
        (sid("worker.pool_open_files", n), now, float(sum(c["open_files"] for c in pool))),
    ]
    known_tasks = [c["tasks"] for c in pool if c["tasks"] is not None]
    if known_tasks:
        points.append((sid("worker.tasks_run", n), now, float(sum(known_tasks))))
    points += _pool_points(node, now=now)
    summary: NodeSummary = {
        "v": SWEEP_VERSION, "node": node, "taken_at": now,
        "cpu_percent": sample["cpu"]["percent"], "memory_percent": sample["memory"]["percent"],
        "load1": load[0], "main": main, "children": kids, "points": len(points),
        "services": False,
    }
    return summary, points


def _pool_points(node: str, *, now: float) -> list[Point]:
    """The node's processes' database pool figures (``db.pool.*``; none without a pool)."""
    from hms_tasks.queries import pool as db_pool

    try:
        return db_pool.node_points(node, now=now)[1]
    except Exception as exc:  # a monitoring read must not fail the node's sample
        logger.warning("pool figures failed: %s", type(exc).__name__)
        return []


# -- shared services ---------------------------------------------------------------------------


def redis_sample(*, now: float) -> tuple[dict[str, Any], list[tuple[str, float, float]]]:
    """Redis ``INFO``: ops/s, hit ratio, memory, evictions (total and per second since the
    previous sample), clients, persistence state."""
    client = store.client()
    info: dict[str, Any] = client.info()
    hits, misses = int(info.get("keyspace_hits", 0)), int(info.get("keyspace_misses", 0))
    evicted = int(info.get("evicted_keys", 0))
    prev_key = store.key("metrics", "prev", "redis")
    prev = cast("dict[str, str]", client.hgetall(prev_key))
    pipe = client.pipeline(transaction=True)
    pipe.hset(prev_key, mapping={"at": repr(now), "evicted_keys": evicted, "hits": hits,
                                 "misses": misses})
    pipe.expire(prev_key, 86400)
    pipe.execute()
    evictions_per_s = 0.0
    hit_percent = 100.0 * hits / (hits + misses) if hits + misses else None
    if prev:
        elapsed = now - float(prev["at"])
        if elapsed > 0:
            evictions_per_s = max(0.0, (evicted - int(prev["evicted_keys"])) / elapsed)
            dh, dm = hits - int(prev["hits"]), misses - int(prev["misses"])
            if dh >= 0 and dm >= 0 and dh + dm:
                hit_percent = 100.0 * dh / (dh + dm)  # over the last interval, not since boot
    doc = {
        "ops_per_s": int(info.get("instantaneous_ops_per_sec", 0)),
        "hit_percent": None if hit_percent is None else round(hit_percent, 3),
        "used_memory": int(info.get("used_memory", 0)),
        "maxmemory": int(info.get("maxmemory", 0)),
        "maxmemory_policy": str(info.get("maxmemory_policy", "")),
        "evicted_keys": evicted,
        "evictions_per_s": round(evictions_per_s, 4),
        "clients": int(info.get("connected_clients", 0)),
        "blocked_clients": int(info.get("blocked_clients", 0)),
        "rdb_changes_since_last_save": int(info.get("rdb_changes_since_last_save", 0)),
        "rdb_bgsave_in_progress": int(info.get("rdb_bgsave_in_progress", 0)),
        "rdb_last_bgsave_ok": info.get("rdb_last_bgsave_status", "ok") == "ok",
        "aof_enabled": bool(int(info.get("aof_enabled", 0))),
        "aof_last_write_ok": info.get("aof_last_write_status", "ok") == "ok",
    }
    points = [
        ("redis.ops_per_s", now, float(doc["ops_per_s"])),
        ("redis.used_memory_bytes", now, float(doc["used_memory"])),
        ("redis.maxmemory_bytes", now, float(doc["maxmemory"])),
        ("redis.evicted_keys", now, float(evicted)),
        ("redis.evictions_per_s", now, evictions_per_s),
        ("redis.clients", now, float(doc["clients"])),
        ("redis.blocked_clients", now, float(doc["blocked_clients"])),
        ("redis.rdb_changes_since_last_save", now, float(doc["rdb_changes_since_last_save"])),
        ("redis.rdb_last_bgsave_ok", now, float(doc["rdb_last_bgsave_ok"])),
        ("redis.aof_enabled", now, float(doc["aof_enabled"])),
        ("redis.aof_last_write_ok", now, float(doc["aof_last_write_ok"])),
    ]
    if hit_percent is not None:
        points.append(("redis.hit_percent", now, round(hit_percent, 3)))
    return doc, points


def celery_sample(*, now: float, nodes_expected: list[str],
                  timeout: float = 0.5) -> tuple[dict[str, Any], list[tuple[str, float, float]]]:
    """Queue depth per hms queue, unacknowledged messages, and active and reserved tasks per
    node (from the nodes that answer ``inspect`` within ``timeout``; a solo worker busy with a
    task does not)."""
    from hms_tasks.celery import app

    client = store.client()
    pipe = client.pipeline(transaction=False)
    for q in ALL_QUEUES:
        for suffix in _PRIORITY_SUFFIXES:
            pipe.llen(q + suffix)
    pipe.hlen("unacked")
    lengths = pipe.execute()
    depth = {q: sum(int(x) for x in lengths[i * 4:(i + 1) * 4])
             for i, q in enumerate(ALL_QUEUES)}
    unacked = int(lengths[-1])
    points = [(ts.series_id("celery.queue.depth", {"queue": q}), now, float(d))
              for q, d in depth.items()]
    points.append(("celery.unacked", now, float(unacked)))
    # Messages no worker could run (malformed, unknown task), acknowledged into the dead
    # letter list: the total (a counter) and the last hour's (the alert rule's series).
    points.append(("celery.deadletter_total", now, float(deadletter.total())))
    points.append(("celery.deadletter_recent", now, float(deadletter.recent())))
    # Redis failovers processes saw in the last hour (the redis_failover rule's series).
    points.append(("redis.failovers_recent", now, float(store.failovers(since=now - 3600))))
    limit = len(nodes_expected) or None
    inspect = app.control.inspect(timeout=timeout, limit=limit)
    active = inspect.active() or {}
    reserved = inspect.reserved() or {}
    per_node: dict[str, dict[str, int]] = {}
    for node, tasks in active.items():
        per_node.setdefault(node, {})["active"] = len(tasks or [])
    for node, tasks in reserved.items():
        per_node.setdefault(node, {})["reserved"] = len(tasks or [])
    for node, counts in per_node.items():
        labels = {"node": node}
        for what in ("active", "reserved"):
            if what in counts:
                points.append((ts.series_id(f"celery.{what}", labels), now, float(counts[what])))
    doc = {"queues": depth, "unacked": unacked, "tasks": per_node,
           "no_reply": sorted(set(nodes_expected) - set(per_node))}
    return doc, points


def database_sample(*, now: float) -> tuple[dict[str, Any], list[tuple[str, float, float]]]:
    """Connections in use; on PostgreSQL from ``pg_stat_activity``: by state, the use of
    ``max_connections`` (server-wide), sessions idle in a transaction longer than
    ``HMS_TASKS_DB_IDLE_IN_TRANSACTION_SECONDS``, the age of the longest running query,
    sessions waiting for a lock; and the slowest statements by mean time from
    ``pg_stat_statements`` when that extension is installed (query ids and timings only:
    statement texts can quote data). Never a query's text or a client's address."""
    from django.db import connections

    from hms_tasks.queries import settings as queries_settings

    cfg = queries_settings.get()
    connection = connections[cfg.db_alias]
    vendor = connection.vendor
    doc: dict[str, Any] = {"vendor": vendor}
    points: list[tuple[str, float, float]] = []
    if vendor != "postgresql":
        doc["connections"] = None  # SQLite has no server, hence no connections to count
        return doc, points
    idle_s = cfg.db_idle_in_transaction_seconds
    try:
        with connection.cursor() as cur:
            cur.execute(
                "SELECT coalesce(state, 'unknown'), count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() GROUP BY 1"
            )
            by_state = {str(s): int(n) for s, n in cur.fetchall()}
            cur.execute("SELECT setting::int FROM pg_settings WHERE name = 'max_connections'")
            row = cur.fetchone()
            max_conn = int(row[0]) if row else 0
            # This session (the sampler's) is left out of the ages: it is running this.
            cur.execute(
                "SELECT count(*) FILTER (WHERE backend_type = 'client backend'),"
                " count(*) FILTER (WHERE mine AND state LIKE 'idle in transaction%%'"
                "  AND state_change < now() - make_interval(secs => %s)),"
                " coalesce(extract(epoch FROM max(now() - state_change)"
                "  FILTER (WHERE mine AND state LIKE 'idle in transaction%%')), 0),"
                " coalesce(extract(epoch FROM max(now() - query_start)"
                "  FILTER (WHERE mine AND state = 'active' AND pid <> pg_backend_pid())), 0),"
                " count(*) FILTER (WHERE mine AND wait_event_type = 'Lock')"
                " FROM (SELECT *, datname = current_database() AS mine"
                "       FROM pg_stat_activity) a",
                [idle_s],
            )
            row = cur.fetchone()
            assert row is not None  # an aggregate always returns a row
            clients, idle_tx, idle_tx_age, longest, lock_waits = (
                int(row[0]), int(row[1]), float(row[2]), float(row[3]), int(row[4]))
            cur.execute("SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'")
            row = cur.fetchone()
            has_pss = bool(row and row[0])
            slow: list[dict[str, Any]] = []
            if has_pss:
                cur.execute(
                    "SELECT queryid, calls, mean_exec_time FROM pg_stat_statements"
                    " WHERE dbid = (SELECT oid FROM pg_database WHERE datname ="
                    " current_database()) ORDER BY mean_exec_time DESC LIMIT 5"
                )
                slow = [{"queryid": str(q), "calls": int(c), "mean_ms": round(float(m), 3)}
                        for q, c, m in cur.fetchall()]
    except Exception as exc:  # a monitoring read must not fail the sweep
        logger.warning("database sample failed: %s", type(exc).__name__)
        doc["error"] = type(exc).__name__
        return doc, points
    total = sum(by_state.values())
    used = round(100.0 * clients / max_conn, 3) if max_conn else 0.0
    doc.update(connections=total, by_state=by_state, max_connections=max_conn,
               server_connections=clients, connections_used_percent=used,
               idle_in_transaction=idle_tx, idle_in_transaction_seconds=idle_s,
               idle_in_transaction_max_age_s=round(idle_tx_age, 3),
               longest_query_s=round(longest, 3), lock_waits=lock_waits,
               pg_stat_statements=has_pss, slow_statements=slow)
    points.append(("db.connections", now, float(total)))
    points.append(("db.max_connections", now, float(max_conn)))
    points.append(("db.connections_used_percent", now, used))
    points.append(("db.idle_in_transaction", now, float(idle_tx)))
    points.append(("db.idle_in_transaction_max_age_s", now, round(idle_tx_age, 3)))
    points.append(("db.longest_query_s", now, round(longest, 3)))
    points.append(("db.lock_waits", now, float(lock_waits)))
    for state, n in by_state.items():
        safe = "".join(c if c.isalnum() else "_" for c in state)
        points.append((ts.series_id("db.connections_by_state", {"state": safe}), now, float(n)))
    if has_pss:
        points.append(("db.slow_statements", now,
                       float(sum(1 for s in slow if s["mean_ms"] >= SLOW_STATEMENT_MS))))
    return doc, points


def services_sample(*, now: float, nodes_expected: list[str]) -> tuple[dict[str, Any],
                                                                      list[tuple[str, float,
                                                                                 float]]]:
    """Redis, Celery and the database, each failing on its own (an error names its class)."""
    doc: dict[str, Any] = {}
    points: list[tuple[str, float, float]] = []
    samplers: list[tuple[str, Callable[[], tuple[dict[str, Any], list[Point]]]]] = [
        ("redis", lambda: redis_sample(now=now)),
        ("celery", lambda: celery_sample(now=now, nodes_expected=nodes_expected)),
        ("database", lambda: database_sample(now=now)),
    ]
    for name, fn in samplers:
        try:
            part, more = fn()
        except Exception as exc:
            logger.warning("%s sample failed: %s", name, type(exc).__name__, exc_info=True)
            part, more = {"error": type(exc).__name__}, []
        doc[name] = part
        points += more
    return doc, points


# -- sweeps ------------------------------------------------------------------------------------


def start_sweep(*, now: float | None = None) -> dict[str, Any]:
    """Ping the workers, record missing nodes, send ``collect_node`` to every live one."""
    now = time.time() if now is None else now
    s = settings.get()
    client = store.client()
    previous = client.get(store.key("metrics", "sweep", "latest"))
    previous_late: list[str] = []
    if previous:
        previous_late = _close(cast(str, previous))
    live = nodes.live(timeout=s.metrics_ping_timeout)
    known = nodes.known(now=now, forget_after=s.metrics_forget_node_after)
    missing = sorted(set(known) - set(live))
    nodes.heartbeat(live, now=now)
    sweep_id = uuid.uuid4().hex[:16]
    meta: SweepMeta = {"v": SWEEP_VERSION, "id": sweep_id, "started_at": now,
                       "deadline": now + GATHER_SECONDS, "expected": live, "missing": missing}
    pipe = client.pipeline(transaction=True)
    pipe.hset(_key(sweep_id), "meta", json.dumps(meta, separators=(",", ":")))
    if live:
        pipe.sadd(_key(sweep_id, "expected"), *live)
    for k in (_key(sweep_id), _key(sweep_id, "expected")):
        pipe.expire(k, SWEEP_TTL)
    pipe.set(store.key("metrics", "sweep", "latest"), sweep_id, ex=SWEEP_TTL)
    pipe.execute()
    ts.write([(ts.series_id("node.up", {"node": n}), now, 1.0) for n in live]
             + [(ts.series_id("node.up", {"node": n}), now, 0.0) for n in missing], now=now)
    for node in live:
        nodes.send_to(names.METRICS_COLLECT_NODE, node, kwargs={"sweep": sweep_id},
                      expires=GATHER_SECONDS)
    if missing:
        logger.warning("metrics sweep %s: %d node(s) missing: %s", sweep_id, len(missing),
                       ", ".join(missing))
    return {"sweep": sweep_id, "live": len(live), "nodes": live, "missing": missing,
            "previous_late": previous_late}


def _close(sweep_id: str) -> list[str]:
    """Record the nodes of a finished sweep that never reported as missing (``node.up`` 0)."""
    status = sweep_status(sweep_id)
    if status is None or status["complete"] or not status["late"]:
        return []
    late = status["late"]
    ts.write([(ts.series_id("node.up", {"node": n}), time.time(), 0.0) for n in late])
    store.client().hset(_key(sweep_id), "status", "closed")
    return late


def collect_node(sweep_id: str | None) -> dict[str, Any]:
    """Sample this node into the store; the first node of a sweep to get here also samples the
    shared services. Returns a summary (counts, and whether this report completed the sweep).
    """
    node = nodes.current()
    client = store.client()
    summary, points = node_sample(node)
    now = summary["taken_at"]
    services_doc: dict[str, Any] | None = None
    expected: list[str] = []
    if sweep_id is not None:
        expected = sorted(cast("set[str]", client.smembers(_key(sweep_id, "expected"))))
        claimed = client.set(_key(sweep_id, "services"), node, nx=True, ex=SWEEP_TTL)
        if claimed:
            services_doc, more = services_sample(now=now, nodes_expected=expected)
            points += more
            summary["services"] = True
    else:  # ad hoc: sample the services too
        services_doc, more = services_sample(now=now, nodes_expected=[node])
        points += more
        summary["services"] = True
    summary["points"] = len(points)
    written = ts.write(points, now=max(now, time.time()))
    nodes.heartbeat([node], now=now)
    complete = False
    if sweep_id is not None:
        pipe = client.pipeline(transaction=True)
        pipe.hset(_key(sweep_id), f"node:{node}", json.dumps(summary, separators=(",", ":")))
        if services_doc is not None:
            pipe.hset(_key(sweep_id), "services", json.dumps(services_doc, default=str,
                                                             separators=(",", ":")))
        pipe.sadd(_key(sweep_id, "reported"), node)
        pipe.expire(_key(sweep_id, "reported"), SWEEP_TTL)
        pipe.sdiff([_key(sweep_id, "expected"), _key(sweep_id, "reported")])
        outstanding = pipe.execute()[-1]
        if expected and not outstanding:
            # The MULTI above makes exactly one reporter see the set complete: it writes the
            # sweep's status.
            client.hset(_key(sweep_id), "status", "complete")
            complete = True
    return {"sweep": sweep_id, "node": node, "points": written["points"],
            "services": summary["services"], "children": len(summary["children"]),
            "sweep_complete": complete, "pid": os.getpid()}


def sweep_status(sweep_id: str | None = None, *, now: float | None = None) -> SweepStatus | None:
    """A sweep's state (the latest one by default): who was expected, who reported, who is
    missing (did not answer the ping, or is late past the deadline)."""
    now = time.time() if now is None else now
    client = store.client()
    if sweep_id is None:
        sweep_id = cast("str | None", client.get(store.key("metrics", "sweep", "latest")))
        if sweep_id is None:
            return None
    doc = cast("dict[str, str]", client.hgetall(_key(sweep_id)))
    if "meta" not in doc:
        return None
    meta = cast(SweepMeta, json.loads(doc["meta"]))
    reported = sorted(cast("set[str]", client.smembers(_key(sweep_id, "reported"))))
    outstanding = sorted(set(meta["expected"]) - set(reported))
    late = outstanding if now > meta["deadline"] or doc.get("status") == "closed" else []
    samples = {k[5:]: cast(NodeSummary, json.loads(v)) for k, v in doc.items()
               if k.startswith("node:")}
    return {"id": sweep_id, "started_at": meta["started_at"], "expected": meta["expected"],
            "reported": reported, "missing": sorted(set(meta["missing"]) | set(late)),
            "late": late, "complete": not outstanding,
            "services_node": cast("str | None", client.get(_key(sweep_id, "services"))),
            "samples": samples}
