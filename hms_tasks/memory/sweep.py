"""The memory sweep: every pool child of every node, measured against its budget.

:func:`start_sweep` (``hms.memory.sweep``) pings the nodes and publishes
``hms.memory.sweep_node`` to each live node's direct queue. :func:`sweep_node` runs on the node:
it measures every pool child (psutil), signals the siblings that are over a tier (``SIGUSR2``,
only to children whose state document says the handler is installed) and asks its own process
to check after the task. Each child then acts on its tier itself (:mod:`~hms_tasks.memory.hooks`).

Layout: ``<p>:memory:sweep:<id>`` HASH node -> JSON :class:`NodeSweep` (a day);
``<p>:memory:sweep:latest`` STRING id of the newest sweep.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any, TypedDict

import psutil

from hms_tasks import nodes, store
from hms_tasks.memory import hooks, names, tiers
from hms_tasks.metrics import settings as metrics_settings

__all__ = ["ChildRow", "NodeSweep", "start_sweep", "sweep_node", "trace"]

SWEEP_VERSION = 1
SWEEP_TTL = 86400
GATHER_SECONDS = 45.0


class ChildRow(TypedDict):
    pid: int
    rss: int
    percent: float | None
    tier: str | None
    signalled: bool


class NodeSweep(TypedDict):
    v: int
    node: str
    at: float
    budget: int
    children: list[ChildRow]


def start_sweep(*, now: float | None = None) -> dict[str, Any]:
    """Publish ``sweep_node`` to every live node; report known nodes that did not answer."""
    now = time.time() if now is None else now
    s = metrics_settings.get()
    live = nodes.live(timeout=s.metrics_ping_timeout)
    known = nodes.known(now=now, forget_after=s.metrics_forget_node_after)
    missing = sorted(set(known) - set(live))
    nodes.heartbeat(live, now=now)
    sweep_id = uuid.uuid4().hex[:16]
    store.client().set(store.key("memory", "sweep", "latest"), sweep_id, ex=SWEEP_TTL)
    for node in live:
        nodes.send_to(names.MEMORY_SWEEP_NODE, node, kwargs={"sweep": sweep_id},
                      expires=GATHER_SECONDS)
    return {"sweep": sweep_id, "live": len(live), "nodes": live, "missing": missing}


def _signal(pid: int) -> bool:
    try:
        os.kill(pid, hooks.NUDGE_SIGNAL)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def nudge_siblings(*, only_over_tier: bool) -> tuple[list[ChildRow], int]:
    """Measure this node's pool children; signal those over a tier (or all, for a trace
    directive) that have the handler installed; the calling process checks after its task.
    Returns the rows and the budget in bytes (0: tiers off)."""
    node = nodes.current()
    b = tiers.budget()
    main, children = nodes.pool_processes()
    states = nodes.children_state(node)
    rows: list[ChildRow] = []
    for proc in children or [main]:
        try:
            rss = int(proc.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        tier = tiers.classify(rss, b) if b else None
        signalled = False
        if tier is not None or not only_over_tier:
            if proc.pid == os.getpid():
                hooks.request_check()
                signalled = True
            elif (st := states.get(proc.pid)) is not None and st["handler"]:
                signalled = _signal(proc.pid)
        rows.append({"pid": proc.pid, "rss": rss,
                     "percent": round(100 * rss / b.total, 2) if b else None,
                     "tier": tier, "signalled": signalled})
    return rows, b.total if b else 0


def sweep_node(sweep_id: str | None) -> dict[str, Any]:
    """Measure and nudge this node's pool children; store the node's row of the sweep."""
    node = nodes.current()
    rows, total = nudge_siblings(only_over_tier=True)
    doc: NodeSweep = {"v": SWEEP_VERSION, "node": node, "at": time.time(), "budget": total,
                      "children": rows}
    if sweep_id is not None:
        key = store.key("memory", "sweep", sweep_id)
        pipe = store.client().pipeline(transaction=True)
        pipe.hset(key, node, json.dumps(doc, separators=(",", ":")))
        pipe.expire(key, SWEEP_TTL)
        pipe.execute()
    nodes.heartbeat([node])
    return {"sweep": sweep_id, "node": node, "children": len(rows),
            "over_tier": sum(1 for r in rows if r["tier"]),
            "signalled": sum(1 for r in rows if r["signalled"]),
            "max_rss": max((r["rss"] for r in rows), default=0), "budget": total}


def trace(snapshot_id: str, *, phase: str, seconds: int, top: int, frames: int) -> int:
    """Write this node's tracemalloc directive and nudge every pool child; returns how many
    processes were asked."""
    node = nodes.current()
    doc = {"v": 1, "id": snapshot_id, "phase": phase, "seconds": seconds, "top": top,
           "frames": frames}
    store.client().set(store.key("memory", "trace", node), json.dumps(doc),
                       ex=seconds + 600)
    rows, _ = nudge_siblings(only_over_tier=False)
    return sum(1 for r in rows if r["signalled"])
