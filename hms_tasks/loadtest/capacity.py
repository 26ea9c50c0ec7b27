"""How many worker processes could run a load-test shard right now.

A shard occupies one worker process (a prefork child, or a whole solo worker) for its duration,
so a run needs as many free processes among the nodes consuming ``hms.loadtest`` as it has
shards; more would leave some shards queued behind others and starting late. The count comes
from the nodes that answer ``inspect`` within ``HMS_TASKS_METRICS_PING_TIMEOUT``: for each node
consuming the queue, its pool size minus the tasks it is running (the asking ``run`` task itself
excluded: its process is free again once it has dispatched the shards).

A solo worker running the ``run`` task cannot answer ``inspect`` until the task returns, so
the node running it is counted from what it knows of itself (its pool size, noted when the
worker started).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery.signals import worker_init

from hms_tasks import capabilities
from hms_tasks.loadtest.text import count
from hms_tasks.metrics import settings as metrics_settings

__all__ = ["Capacity", "NodeCapacity", "free_processes"]

QUEUE = capabilities.queue("loadtest")

#: (node name, pool processes) of this worker, noted at start-up.
_me: dict[str, Any] = {}


@worker_init.connect
def _remember_worker(sender: Any = None, **_: Any) -> None:
    if sender is None:
        return
    pool = getattr(sender, "pool_cls", None)
    pool_name = getattr(pool, "__module__", "") + "." + getattr(pool, "__name__", str(pool))
    solo = "solo" in pool_name.lower()
    _me["node"] = getattr(sender, "hostname", None)
    _me["processes"] = 1 if solo else int(getattr(sender, "concurrency", 1) or 1)


@dataclass(frozen=True)
class NodeCapacity:
    node: str
    processes: int
    busy: int

    @property
    def free(self) -> int:
        return max(0, self.processes - self.busy)


@dataclass(frozen=True)
class Capacity:
    nodes: tuple[NodeCapacity, ...]

    @property
    def free(self) -> int:
        return sum(n.free for n in self.nodes)

    def describe(self) -> str:
        if not self.nodes:
            return f"no live worker consumes the {QUEUE} queue"
        parts = ", ".join(f"{n.node} ({count(n.processes, 'process', 'processes')}, {n.busy}"
                          " busy)" for n in self.nodes)
        return (f"{count(self.free, 'free worker process', 'free worker processes')} on"
                f" {count(len(self.nodes), 'node')} consuming {QUEUE}: {parts}")


def free_processes(*, timeout: float | None = None) -> Capacity:
    """The nodes consuming ``hms.loadtest`` and their free processes (see the module doc)."""
    from celery import current_task

    from hms_tasks.celery import app

    timeout = metrics_settings.get().metrics_ping_timeout if timeout is None else timeout
    queues: dict[str, Any] = app.control.inspect(timeout=timeout).active_queues() or {}
    nodes = sorted(n for n, qs in queues.items()
                   if any(isinstance(q, dict) and q.get("name") == QUEUE for q in qs or ()))
    my_task = current_task.request.id if current_task and current_task.request.id else None
    me = _me.get("node") if my_task else None
    stats: dict[str, Any] = {}
    active: dict[str, Any] = {}
    if nodes:
        inspect = app.control.inspect(destination=nodes, timeout=timeout, limit=len(nodes))
        stats = inspect.stats() or {}
        active = inspect.active() or {}
    out: list[NodeCapacity] = []
    for node in nodes:
        pool = (stats.get(node) or {}).get("pool") or {}
        processes = pool.get("max-concurrency")
        if not isinstance(processes, int):
            processes = 1
        tasks = [t for t in active.get(node) or () if t.get("id") != my_task]
        out.append(NodeCapacity(node=node, processes=processes, busy=len(tasks)))
    if me and me not in nodes:
        # This worker runs the asking task and could not answer (a solo pool): count it from
        # what it knows of itself; the asking task's process is free once it returns.
        out.append(NodeCapacity(node=me, processes=int(_me.get("processes", 1)), busy=0))
    return Capacity(nodes=tuple(out))
