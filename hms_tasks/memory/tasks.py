"""Memory tasks, on the ``hms.memory`` queue (and the nodes' direct queues). The work is in
plain functions (:mod:`~hms_tasks.memory.tiers`, :mod:`~hms_tasks.memory.sweep`,
:mod:`~hms_tasks.memory.snapshot`); these only adapt them.

How the capability splits its work: the tiers act inside each worker process, after each task,
through the hooks in :mod:`~hms_tasks.memory.hooks` (imported here, so every worker that loads
hms-tasks' tasks has them). ``sweep`` fans ``sweep_node`` out to every live node's direct
queue; each node measures its pool children and signals those over a tier, which then act on
their own. ``snapshot`` starts a tracemalloc comparison on one node and schedules its end.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

import redis
from pydantic import Field

from hms_tasks import nodes
from hms_tasks.base import Capability
from hms_tasks.errors import InvalidArguments
from hms_tasks.memory import hooks, names
from hms_tasks.memory import snapshot as tracing
from hms_tasks.memory import sweep as sweeping
from hms_tasks.metrics import settings as metrics_settings

__all__ = ["memory", "snapshot", "sweep_all", "sweep_node"]

memory = Capability(name="memory", soft_time_limit=20, time_limit=30,
                    autoretry_for=(redis.ConnectionError, redis.TimeoutError))

#: Imported for its signal receivers: every worker that loads these tasks watches its memory.
HOOKS = hooks

_NODE_RE = re.compile(r"^[A-Za-z0-9_.@:-]{1,200}$")
_ID_RE = tracing.ID_RE
#: A finish phase this close to its due time (or past it) compares now rather than wait again.
FINISH_SLACK = 1.0


@memory.task(names.MEMORY_SWEEP)
def sweep_all() -> dict[str, Any]:
    """Fan a memory sweep out to every live node (``sweep_node`` on its direct queue), and
    report the known nodes that did not answer the ping as missing.

    When: every 5 minutes from beat (``memory-sweep``); after each task every process already
    checks itself, so the sweep catches idle children. About the ping timeout (1 s).
    Idempotent: a sweep only measures and nudges. Retries Redis connection errors. Writes
    ``<p>:memory:sweep:latest`` and ``<p>:nodes``. Returns the sweep id, live and missing nodes.
    """
    return sweeping.start_sweep()


@memory.task(names.MEMORY_SWEEP_NODE)
def sweep_node(sweep: Annotated[str, Field(pattern=_ID_RE.pattern, description="a sweep id")]
               | None = None) -> dict[str, Any]:
    """Measure every pool child of the node that runs it against the memory budget; signal
    (``SIGUSR2``) the children over a tier so they act at once if idle, or after their current
    task if busy. The tier actions themselves are recorded by the children.

    When: published by ``sweep`` to each node's direct queue, or ad hoc. Milliseconds.
    Idempotent: a child that already acted cools down. Retries Redis connection errors.
    Writes ``<p>:memory:sweep:<id>``. Returns counts: children, over a tier, signalled.
    """
    if sweep is not None and not _ID_RE.match(sweep):
        raise InvalidArguments(names.MEMORY_SWEEP_NODE, ["sweep: expected a sweep id"])
    return sweeping.sweep_node(sweep)


@memory.task(names.MEMORY_SNAPSHOT)
def snapshot(node: Annotated[str, Field(pattern=_NODE_RE.pattern,
                                        description="a worker node name like name@host")],
             seconds: Annotated[int, Field(ge=1, le=600)] = 60,
             top: Annotated[int, Field(ge=1, le=50)] = 10,
             frames: Annotated[int, Field(ge=1, le=5)] = 1,
             phase: Literal["start", "finish"] = "start",
             snapshot_id: Annotated[str, Field(pattern=_ID_RE.pattern,
                                               description="8 to 32 lower-case hex digits")]
             | None = None) -> dict[str, Any]:
    """Compare tracemalloc snapshots of every pool child of ``node`` taken ``seconds`` apart:
    the ``top`` allocation sites that grew most, ``frames`` deep, to diagnose a leak.

    When: on demand (off by default: nothing traces until asked). Run anywhere, it forwards
    itself to ``node``'s direct queue; there it writes the trace directive, nudges the
    children (they start tracing after their current task, or at once if idle) and schedules
    its own ``finish`` phase ``seconds`` later, which makes every child compare, store its
    result and stop tracing (a window longer than a countdown may be, about 110 s with the
    default visibility timeout, is waited out in hops: an early finish re-sends itself).
    Tracing slows allocations while it runs (about 1.3x with one frame), for at most 10
    minutes. Idempotent per ``snapshot_id``. Writes
    ``<p>:memory:snapshot:<id>:meta`` (what was asked), ``<p>:memory:trace:<node>`` and, from
    each child, ``<p>:memory:snapshot:<id>``. Returns the id (also when it forwarded itself)
    and how many processes were asked (results: ``hms-tasks memory --snapshot ID``).
    """
    problems = []
    if not _NODE_RE.match(node):
        problems.append("node: expected a worker node name like name@host")
    if not 1 <= seconds <= 600:
        problems.append("seconds: expected int from 1 to 600")
    if not 1 <= top <= 50:
        problems.append("top: expected int from 1 to 50")
    if not 1 <= frames <= 5:
        problems.append("frames: expected int from 1 to 5")
    if snapshot_id is not None and not _ID_RE.match(snapshot_id):
        problems.append("snapshot_id: expected 8 to 32 lower-case hex digits")
    if phase == "finish" and snapshot_id is None:
        problems.append("snapshot_id: the finish phase needs the id of its start")
    if problems:
        raise InvalidArguments(names.MEMORY_SNAPSHOT, problems)
    args = {"node": node, "seconds": seconds, "top": top, "frames": frames}
    # The id is chosen here, before any forwarding, so the caller always learns it.
    sid = snapshot_id or uuid.uuid4().hex[:16]
    if nodes.current() != node:
        live = nodes.live(timeout=metrics_settings.get().metrics_ping_timeout)
        if node not in live:
            raise InvalidArguments(names.MEMORY_SNAPSHOT,
                                   [f"node: not a live worker (live: {', '.join(live)})"])
        if phase == "start":
            tracing.announce(sid, node=node, seconds=seconds)
        nodes.send_to(names.MEMORY_SNAPSHOT, node,
                      kwargs={**args, "phase": phase, "snapshot_id": sid},
                      expires=60)
        return {"forwarded_to": node, "phase": phase, "id": sid}
    finish = {**args, "phase": "finish", "snapshot_id": sid}
    if phase == "start":
        tracing.announce(sid, node=node, seconds=seconds)
    else:
        announced = tracing.meta(sid)
        due = announced["finish_at"] if announced else 0.0
        if due - time.time() > FINISH_SLACK:
            _send_finish(node, finish, due=due)
            return {"id": sid, "node": node, "phase": phase, "processes_asked": 0,
                    "results": 0, "finish_in_s": round(due - time.time(), 1)}
    asked = sweeping.trace(sid, phase=phase, seconds=seconds, top=top, frames=frames)
    if phase == "start":
        _send_finish(node, finish, due=time.time() + seconds)
    return {"id": sid, "node": node, "phase": phase, "processes_asked": asked,
            "results": len(tracing.results(sid)) if phase == "finish" else 0}


def _send_finish(node: str, kwargs: dict[str, Any], *, due: float) -> None:
    """Publish the finish phase to ``node``'s direct queue, due at ``due``. A countdown may not
    outlast the visibility timeout (hms_tasks.celery.max_countdown): a later finish goes out
    at the longest countdown allowed and, arriving early, re-sends itself (the announced
    ``finish_at`` says when it is due)."""
    from hms_tasks.celery import max_countdown

    countdown = max(0.0, min(due - time.time(), max_countdown(names.MEMORY_SNAPSHOT)))
    # expires: a node that went down must not compare a stale window hours later.
    nodes.send_to(names.MEMORY_SNAPSHOT, node, kwargs=kwargs, expires=countdown + 300,
                  countdown=countdown)
