"""On-demand tracemalloc comparisons: which allocation sites grew between two points.

Off by default: nothing traces until ``hms.memory.snapshot`` asks a node to. Then every pool
child of that node starts :mod:`tracemalloc` (``frames`` deep, 1 by default, which keeps the
overhead to the tracing window) and takes a baseline; when the window ends each child takes a
second snapshot, writes the ``top`` sites that grew most, and stops tracing. A child that never
hears the end stops by itself :data:`GRACE` seconds after the window.

Results: ``<p>:memory:snapshot:<id>`` HASH pid -> JSON :class:`SnapshotResult` (7 days). Sites
are ``file:line`` of the code that allocated: no data. ``<p>:memory:snapshot:<id>:meta`` STRING
JSON :class:`SnapshotMeta` (7 days), written when the comparison is asked for, tells a pending
comparison from an id that never existed.
"""

from __future__ import annotations

import json
import os
import re
import time
import tracemalloc
from dataclasses import dataclass
from typing import TypedDict, cast

from hms_tasks import store

__all__ = ["GRACE", "ID_RE", "Site", "SnapshotMeta", "SnapshotResult", "active", "announce",
           "expire_if_due", "finish", "meta", "results", "start"]

RESULT_VERSION = 1
RESULT_TTL = 7 * 86400
#: A child that started tracing stops by itself this long after its window.
GRACE = 120.0
#: A comparison id: what ``hms.memory.snapshot`` returns.
ID_RE = re.compile(r"^[a-f0-9]{8,32}$")
_FILTERS = (
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
    tracemalloc.Filter(False, "<unknown>"),
    tracemalloc.Filter(False, __file__),
)


class Site(TypedDict):
    site: str
    size_diff: int
    count_diff: int
    size: int
    count: int


class SnapshotResult(TypedDict):
    v: int
    id: str
    node: str
    pid: int
    seconds: float
    traced_before: int
    traced_after: int
    #: Memory tracemalloc itself used at the end (its overhead).
    tracer_bytes: int
    top: list[Site]


class SnapshotMeta(TypedDict):
    v: int
    id: str
    node: str
    seconds: int
    asked_at: float
    #: When the children compare: results are due then (each stops by itself GRACE later).
    finish_at: float


@dataclass
class _Trace:
    id: str
    top: int
    frames: int
    started_at: float
    deadline: float
    baseline: tracemalloc.Snapshot
    traced_before: int
    we_started: bool


_trace: _Trace | None = None


def active() -> str | None:
    """The id of the comparison this process is tracing for, if any."""
    return _trace.id if _trace else None


def start(snapshot_id: str, *, frames: int, top: int, seconds: float) -> bool:
    """Start tracing (unless already tracing for ``snapshot_id``) and take the baseline."""
    global _trace
    if _trace is not None:
        if _trace.id == snapshot_id:
            return False
        stop()
    we_started = not tracemalloc.is_tracing()
    if we_started:
        tracemalloc.start(frames)
    baseline = tracemalloc.take_snapshot().filter_traces(_FILTERS)
    now = time.monotonic()
    _trace = _Trace(id=snapshot_id, top=top, frames=frames, started_at=now,
                    deadline=now + seconds + GRACE, baseline=baseline,
                    traced_before=tracemalloc.get_traced_memory()[0], we_started=we_started)
    return True


def stop() -> None:
    global _trace
    if _trace is not None and _trace.we_started and tracemalloc.is_tracing():
        tracemalloc.stop()
    _trace = None


def expire_if_due() -> None:
    """Stop a trace whose end never came (called after every task)."""
    if _trace is not None and time.monotonic() > _trace.deadline:
        stop()


def _site(frame: tracemalloc.Frame) -> str:
    parts = frame.filename.replace(os.sep, "/").split("/")
    return f"{'/'.join(parts[-3:])}:{frame.lineno}"


def finish(snapshot_id: str, *, node: str) -> SnapshotResult | None:
    """Compare with the baseline, store the top growing sites, stop tracing."""
    if _trace is None or _trace.id != snapshot_id:
        return None
    trace = _trace
    after = tracemalloc.take_snapshot().filter_traces(_FILTERS)
    key = "lineno" if trace.frames == 1 else "traceback"
    stats = [s for s in after.compare_to(trace.baseline, key) if s.size_diff > 0]
    top: list[Site] = [
        {"site": " <- ".join(_site(f) for f in s.traceback), "size_diff": s.size_diff,
         "count_diff": s.count_diff, "size": s.size, "count": s.count}
        for s in stats[: trace.top]
    ]
    result: SnapshotResult = {
        "v": RESULT_VERSION, "id": snapshot_id, "node": node, "pid": os.getpid(),
        "seconds": round(time.monotonic() - trace.started_at, 3),
        "traced_before": trace.traced_before,
        "traced_after": tracemalloc.get_traced_memory()[0],
        "tracer_bytes": tracemalloc.get_tracemalloc_memory(), "top": top,
    }
    stop()
    key_ = store.key("memory", "snapshot", snapshot_id)
    pipe = store.client().pipeline(transaction=True)
    pipe.hset(key_, str(os.getpid()), json.dumps(result, separators=(",", ":")))
    pipe.expire(key_, RESULT_TTL)
    pipe.execute()
    return result


def results(snapshot_id: str) -> list[SnapshotResult]:
    """Every process's result of comparison ``snapshot_id``."""
    raw = cast("dict[str, str]",
               store.client().hgetall(store.key("memory", "snapshot", snapshot_id)))
    return [cast(SnapshotResult, json.loads(v)) for _, v in sorted(raw.items())]


def _meta_key(snapshot_id: str) -> str:
    return store.key("memory", "snapshot", snapshot_id, "meta")


def announce(snapshot_id: str, *, node: str, seconds: int, now: float | None = None) -> None:
    """Record that comparison ``snapshot_id`` was asked of ``node`` (idempotent: a later
    announce of the same id replaces it)."""
    now = time.time() if now is None else now
    doc: SnapshotMeta = {"v": RESULT_VERSION, "id": snapshot_id, "node": node,
                         "seconds": seconds, "asked_at": now, "finish_at": now + seconds}
    store.client().set(_meta_key(snapshot_id), json.dumps(doc, separators=(",", ":")),
                       ex=RESULT_TTL)


def meta(snapshot_id: str) -> SnapshotMeta | None:
    """What was asked of comparison ``snapshot_id``; None for an id never asked for (or
    whose results expired)."""
    raw = store.client().get(_meta_key(snapshot_id))
    return cast(SnapshotMeta, json.loads(cast(str, raw))) if raw else None
