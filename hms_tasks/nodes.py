"""Worker nodes: which are live, which stopped, how to reach one, and its pool processes.

A *node* is one Celery worker (``name@host``, what Flower and ``celery inspect`` show). Tasks that
must run on every node (a metrics sample, a memory sweep) are published to each node's direct
queue (``<node>.dq2``; the app sets ``worker_direct``) after the live nodes answered a ping.

The registry of nodes that answered or reported recently (``<p>:nodes``, a sorted set of node
names scored by the time they were last seen) is what lets a sweep report a node that stopped as
*missing* instead of silently forgetting it. Nodes not seen for
``HMS_TASKS_METRICS_FORGET_NODE_AFTER`` seconds drop out of it.

Pool children publish a small state document each (``<p>:nodes:children:<node>``, a hash of pid
to JSON: tasks run, RSS, whether the memory hooks' signal handler is installed), so a sample
taken in one child can report its siblings, and a sweep knows which of them may be signalled.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Collection, Iterable
from typing import Any, TypedDict, cast

import psutil
from celery.signals import worker_init, worker_process_init

from hms_tasks import store

__all__ = [
    "CHILD_STATE_VERSION",
    "ChildState",
    "children_state",
    "current",
    "forget_child",
    "heartbeat",
    "in_pool_child",
    "known",
    "live",
    "pool_processes",
    "publish_child",
    "send_to",
]

CHILD_STATE_VERSION = 1
#: A child's state document lives this long after its last update (children of a dead worker
#: leave nothing behind for long).
CHILD_STATE_TTL = 86400

_node: str | None = None
#: The worker's main process (where worker_init ran): its pool children have other pids.
_main_pid: int | None = None


@worker_init.connect
def _remember_node(sender: Any = None, **_: Any) -> None:
    global _node, _main_pid
    _node = getattr(sender, "hostname", None)
    _main_pid = os.getpid()


@worker_process_init.connect
def _remember_child_node(sender: Any = None, **_: Any) -> None:
    # Sent in every prefork pool child after the fork (sender: the node name), and by the
    # solo pool in the main process itself.
    global _node
    if isinstance(sender, str) and sender:
        _node = sender


def current() -> str:
    """This process's node name (``name@host``); the host name outside a worker."""
    return _node or f"none@{socket.gethostname()}"


def in_pool_child() -> bool:
    """Whether this process is a prefork pool child (as opposed to a solo/threads worker, or no
    worker at all)."""
    return _main_pid is not None and os.getpid() != _main_pid


def live(*, timeout: float) -> list[str]:
    """Nodes that answer a ping within ``timeout`` seconds, sorted.

    Called from a task, the node running it counts as live too: a solo worker busy with that
    very task cannot answer the ping until it ends.
    """
    from celery import current_task

    from hms_tasks.celery import app

    replies = app.control.ping(timeout=timeout) or []
    found = {name for reply in replies for name in reply}
    if _node is not None and current_task and current_task.request.id:
        found.add(_node)
    return sorted(found)


def heartbeat(nodes: Iterable[str], *, now: float | None = None) -> None:
    """Record that ``nodes`` were seen (answered a ping, or reported) at ``now``."""
    seen = {n: now or time.time() for n in nodes}
    if seen:
        store.client().zadd(store.key("nodes"), cast(Any, seen))


def known(*, now: float | None = None, forget_after: float) -> dict[str, float]:
    """Nodes seen within ``forget_after`` seconds, with the time each was last seen; older ones
    are dropped from the registry."""
    now = now or time.time()
    pipe = store.client().pipeline(transaction=True)
    pipe.zremrangebyscore(store.key("nodes"), "-inf", now - forget_after)
    pipe.zrange(store.key("nodes"), 0, -1, withscores=True)
    _, rows = pipe.execute()
    return {str(n): float(ts) for n, ts in rows}


def send_to(task_name: str, node: str, *, kwargs: dict[str, Any], expires: float,
            countdown: float | None = None) -> str:
    """Publish ``task_name`` to ``node``'s direct queue; returns the task id.

    ``expires`` drops the message if the node did not take it in time (a node that went down
    between the ping and the publish must not run a stale sweep hours later).
    """
    from celery.utils.nodenames import worker_direct

    from hms_tasks.celery import app

    # Fire and forget: nobody waits on these results (the run report has the summary), and a
    # publisher that expected one would subscribe to its result channel.
    options: dict[str, Any] = {"queue": worker_direct(node), "expires": expires,
                               "ignore_result": True}
    if countdown:
        options["countdown"] = countdown
    return str(app.send_task(task_name, kwargs=kwargs, **options).id)


def pool_processes(
    known: Collection[int] | None = None,
) -> tuple[psutil.Process, list[psutil.Process]]:
    """This worker's main process and its pool children.

    In a prefork child: the parent (the worker's main process) and its children: those among
    ``known`` pids (the child registry: cheap) that are still children of the parent, plus
    this process; without ``known``, every child (psutil scans all of /proc for that, which
    costs about 15 µs per process on the machine). Under the solo or threads pool the main
    process runs tasks itself and has no pool children.
    """
    me = psutil.Process()
    if not in_pool_child():
        return me, []
    parent = me.parent()
    if parent is None:  # orphaned: the main process is gone
        return me, [me]
    if known is None:
        return parent, parent.children()
    kids: list[psutil.Process] = []
    for pid in sorted({*known, me.pid}):
        try:
            proc = me if pid == me.pid else psutil.Process(pid)
            if proc.ppid() == parent.pid:
                kids.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return parent, kids


class ChildState(TypedDict):
    v: int
    pid: int
    started_at: float
    #: Tasks this process ran.
    tasks: int
    #: Resident set size at the last update, bytes.
    rss: int
    at: float
    #: The memory hooks' SIGUSR2 handler is installed (the process may be signalled).
    handler: bool


def _children_key(node: str) -> str:
    return store.key("nodes", "children", node)


def publish_child(node: str, state: ChildState) -> None:
    """Store this pool process's state document under its node."""
    key = _children_key(node)
    pipe = store.client().pipeline(transaction=True)
    pipe.hset(key, str(state["pid"]), json.dumps(state, separators=(",", ":")))
    pipe.expire(key, CHILD_STATE_TTL)
    pipe.execute()


def forget_child(node: str, pid: int) -> None:
    store.client().hdel(_children_key(node), str(pid))


def children_state(node: str) -> dict[int, ChildState]:
    """State documents of ``node``'s pool processes by pid; called on the node itself, it drops
    those of processes that are gone."""
    raw = cast("dict[str, str]", store.client().hgetall(_children_key(node)))
    out: dict[int, ChildState] = {}
    gone: list[str] = []
    local = node == current()  # pids mean something only on the node's own machine
    for pid_text, doc in raw.items():
        pid = int(pid_text)
        if local and pid != os.getpid() and not psutil.pid_exists(pid):
            gone.append(pid_text)
            continue
        out[pid] = cast(ChildState, json.loads(doc))
    if gone:
        store.client().hdel(_children_key(node), *gone)
    return out
