"""The worker hooks that watch every process that runs tasks.

* After every task (``task_postrun``) the process reads its RSS (about 10 µs) and, at or above
  a tier, acts (:func:`hms_tasks.memory.tiers.act`) and records the action. The same tier does
  not act again within ``HMS_TASKS_MEMORY_COOLDOWN`` seconds unless it escalated.
* Every prefork pool child installs a ``SIGUSR2`` handler (``worker_process_init``): the
  ``hms.memory.sweep`` fan-out signals a sibling that is over a tier, or that has a tracemalloc
  directive waiting. A child that is busy with a task only notes the signal and acts after the
  task; an idle one acts at once, but then only collects garbage and trims the heap (never
  closes connections: the handler may interrupt Django's own cleanup).
* Every process publishes a small state document (tasks run, RSS) at most every
  :data:`PUBLISH_EVERY` seconds (:func:`hms_tasks.nodes.publish_child`), and every child
  records its start and exit.

Recorded actions: ``<p>:memory:events`` LIST of JSON :class:`MemoryEvent`, newest first, capped
at 1,000.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, TypedDict, cast

from celery.signals import task_postrun, task_prerun, worker_process_init, worker_process_shutdown

from hms_tasks import nodes, store
from hms_tasks.memory import settings, snapshot, tiers

__all__ = ["EVENT_VERSION", "MemoryEvent", "check", "events", "request_check", "state"]

logger = logging.getLogger(__name__)

EVENT_VERSION = 1
EVENTS_KEPT = 1000
PUBLISH_EVERY = 10.0
NUDGE_SIGNAL = signal.SIGUSR2


class MemoryEvent(TypedDict):
    v: int
    node: str
    pid: int
    #: warning, critical, emergency; or "lifecycle" for child_start / child_exit
    tier: str
    #: gc_young, gc_full, recycle, emergency_gc, child_start, child_exit
    action: str
    #: task (after a task), sweep (signalled by hms.memory.sweep), or worker
    trigger: str
    task: str | None
    budget: int
    rss_before: int
    rss_after: int
    collected: int
    pause_ms: float
    at: float
    exitcode: int | None


@dataclass
class _ProcState:
    pid: int = field(default_factory=os.getpid)
    started_at: float = field(default_factory=time.time)
    busy: bool = False
    in_hook: bool = False
    nudged: bool = False
    tasks: int = 0
    last_publish: float = 0.0
    last_tier: tiers.Tier | None = None
    last_action: dict[str, float] = field(default_factory=dict)
    handler: bool = False


_state = _ProcState()


def state() -> _ProcState:
    """This process's hook state (for tests and the sweep)."""
    return _state


def _events_key() -> str:
    return store.key("memory", "events")


def _record(event: MemoryEvent) -> None:
    pipe = store.client().pipeline(transaction=True)
    pipe.lpush(_events_key(), json.dumps(event, separators=(",", ":")))
    pipe.ltrim(_events_key(), 0, EVENTS_KEPT - 1)
    pipe.execute()


def events(*, last: int = 50, pid: int | None = None) -> list[MemoryEvent]:
    """Recent memory events, newest first (only those of ``pid`` if given)."""
    docs = cast("list[str]", store.client().lrange(_events_key(), 0, EVENTS_KEPT - 1))
    out = [cast(MemoryEvent, json.loads(d)) for d in docs]
    if pid is not None:
        out = [e for e in out if e["pid"] == pid]
    return out[:last]


def _publish(*, force: bool = False) -> None:
    now = time.time()
    if not force and now - _state.last_publish < PUBLISH_EVERY:
        return
    _state.last_publish = now
    nodes.publish_child(nodes.current(), {
        "v": nodes.CHILD_STATE_VERSION, "pid": _state.pid, "started_at": _state.started_at,
        "tasks": _state.tasks, "rss": tiers.current_rss(), "at": now,
        "handler": _state.handler})


def _recyclable() -> bool:
    from hms_tasks.celery import app

    return nodes.in_pool_child() and bool(app.conf.worker_max_memory_per_child)


def check(*, trigger: str, task: str | None = None) -> MemoryEvent | None:
    """Measure this process against its budget and act on its tier; returns the recorded
    event, or None (below the tiers, tiers off, or cooling down)."""
    b = tiers.budget()
    if b is None:
        return None
    rss = tiers.current_rss()
    tier = tiers.classify(rss, b)
    if tier is None:
        _state.last_tier = None
        return None
    now = time.monotonic()
    escalated = _state.last_tier is None or (
        tiers.TIERS.index(tier) > tiers.TIERS.index(_state.last_tier))
    cooldown = settings.get().memory_cooldown
    if not escalated and now - _state.last_action.get(tier, -1e18) < cooldown:
        return None
    after_task = trigger == "task"
    action = tiers.act(tier, recyclable=after_task and _recyclable(), between_tasks=after_task)
    _state.last_tier = tier
    _state.last_action[tier] = now
    event: MemoryEvent = {
        "v": EVENT_VERSION, "node": nodes.current(), "pid": os.getpid(), "tier": tier,
        "action": action.action, "trigger": trigger, "task": task, "budget": b.total,
        "rss_before": action.rss_before, "rss_after": action.rss_after,
        "collected": action.collected, "pause_ms": action.pause_ms, "at": time.time(),
        "exitcode": None,
    }
    level = logging.WARNING if tier != "warning" else logging.INFO
    logger.log(level, "memory %s: pid %d rss %.1f MiB of %.1f MiB budget -> %s (%.1f MiB after,"
               " %d objects, %.1f ms)", tier, event["pid"], action.rss_before / 2**20,
               b.total / 2**20, action.action, action.rss_after / 2**20, action.collected,
               action.pause_ms)
    try:
        _record(event)
    except Exception:
        logger.warning("could not record a memory event", exc_info=True)
    return event


def _directives() -> None:
    """Act on a tracemalloc directive for this node, if there is one."""
    raw = store.client().get(store.key("memory", "trace", nodes.current()))
    if not raw:
        return
    d = json.loads(cast(str, raw))
    if d["phase"] == "start" and snapshot.active() != d["id"]:
        snapshot.start(d["id"], frames=d["frames"], top=d["top"], seconds=d["seconds"])
    elif d["phase"] == "finish" and snapshot.active() == d["id"]:
        snapshot.finish(d["id"], node=nodes.current())


def request_check() -> None:
    """Ask this process to check its tier and its directives after the current task."""
    _state.nudged = True


def _on_nudge(signum: int, frame: Any) -> None:
    if _state.busy or _state.in_hook:
        _state.nudged = True  # acted on after the task
        return
    _state.in_hook = True
    try:
        check(trigger="sweep")
        _directives()
    except Exception:
        logger.warning("memory nudge failed", exc_info=True)
    finally:
        _state.in_hook = False


@worker_process_init.connect
def _child_started(**_: Any) -> None:
    global _state
    if not nodes.in_pool_child():
        return  # the solo pool sends this signal in the worker's main process
    _state = _ProcState()  # the parent's counters mean nothing here
    signal.signal(NUDGE_SIGNAL, _on_nudge)
    _state.handler = True
    try:
        _publish(force=True)
        b = tiers.budget()
        rss = tiers.current_rss()
        _record({"v": EVENT_VERSION, "node": nodes.current(), "pid": _state.pid,
                 "tier": "lifecycle", "action": "child_start", "trigger": "worker",
                 "task": None, "budget": b.total if b else 0, "rss_before": rss,
                 "rss_after": rss, "collected": 0, "pause_ms": 0.0, "at": time.time(),
                 "exitcode": None})
    except Exception:
        logger.warning("could not publish the pool child's state", exc_info=True)


@worker_process_shutdown.connect
def _child_exiting(pid: Any = None, exitcode: Any = None, **_: Any) -> None:
    try:
        b = tiers.budget()
        rss = tiers.current_rss()
        _record({"v": EVENT_VERSION, "node": nodes.current(), "pid": os.getpid(),
                 "tier": "lifecycle", "action": "child_exit", "trigger": "worker",
                 "task": None, "budget": b.total if b else 0, "rss_before": rss,
                 "rss_after": rss, "collected": 0, "pause_ms": 0.0, "at": time.time(),
                 "exitcode": exitcode if isinstance(exitcode, int) else None})
        nodes.forget_child(nodes.current(), os.getpid())
    except Exception:
        logger.warning("could not record the pool child's exit", exc_info=True)


@task_prerun.connect
def _task_starting(**_: Any) -> None:
    _state.busy = True


@task_postrun.connect
def _task_done(task: Any = None, **_: Any) -> None:
    _state.tasks += 1
    _state.in_hook = True
    try:
        check(trigger="task", task=getattr(task, "name", None))
        if _state.nudged:
            _state.nudged = False
            _directives()
        snapshot.expire_if_due()
        _publish()
    except Exception:
        logger.warning("memory check after a task failed", exc_info=True)
    finally:
        _state.in_hook = False
        _state.busy = False
