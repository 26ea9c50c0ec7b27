"""Memory tiers of a worker process and what each one does.

The budget of one pool child is ``HMS_TASKS_MEMORY_BUDGET_MB`` (or, when
``CELERY_WORKER_MAX_MEMORY_PER_CHILD`` is set explicitly, that limit divided by the emergency
percentage). Against it:

``warning``   (80 %)  collect the young generations (``gc.collect(1)``): cheap, frees cycles
                      that have not yet been promoted
``critical``  (90 %)  full ``gc.collect()``, clear Django's and the cache's process-local state
                      (closed connections, query log, local-memory caches, ``re`` and
                      ``linecache`` caches, hooks registered with :func:`register_cleanup`),
                      then ``malloc_trim(0)`` so glibc returns freed heap to the OS
``emergency`` (95 %)  recycle the child after its current task: Celery's
                      ``worker_max_memory_per_child`` is set to this tier, so billiard replaces
                      the child once the task returned, never mid-task. Where the process
                      cannot be replaced now (solo or threads pool; an idle child nudged by a
                      sweep, which billiard replaces after its next task) the critical actions
                      run instead (``emergency_gc``).

Every action is recorded with RSS before and after, objects collected and pause time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import linecache
import logging
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Literal

from hms_tasks.memory import settings as memory_settings

__all__ = [
    "Budget",
    "Tier",
    "act",
    "budget",
    "classify",
    "clear_process_state",
    "current_rss",
    "register_cleanup",
    "trim_heap",
]

logger = logging.getLogger(__name__)

Tier = Literal["warning", "critical", "emergency"]
TIERS: tuple[Tier, ...] = ("warning", "critical", "emergency")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_cleanups: list[Callable[[], None]] = []


@dataclass(frozen=True)
class Budget:
    #: Bytes one pool child may use.
    total: int
    #: Thresholds in bytes; ``emergency`` equals billiard's replacement limit.
    warning: int
    critical: int
    emergency: int


def current_rss() -> int:
    """This process's resident set size in bytes (``/proc/self/statm``: about 10 µs)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


def budget() -> Budget | None:
    """The budget and thresholds of one pool child, or None when the tiers are off."""
    s = memory_settings.get()
    if not s.memory_budget_mb:
        return None
    from django.conf import settings

    tiers = s.memory_tiers
    limit_kb = getattr(settings, "CELERY_WORKER_MAX_MEMORY_PER_CHILD", None)
    if limit_kb:
        # billiard replaces the child once RSS exceeds this many KiB: that is the emergency
        # tier, and the budget follows from it.
        total = int(limit_kb * 1024 * 100 / tiers.emergency)
        emergency = int(limit_kb) * 1024
    else:
        total = s.memory_budget_mb * 1024 * 1024
        emergency = total * tiers.emergency // 100
    return Budget(total=total, warning=total * tiers.warning // 100,
                  critical=total * tiers.critical // 100, emergency=emergency)


def classify(rss: int, b: Budget) -> Tier | None:
    """The tier ``rss`` bytes fall in (None below the warning tier). The emergency test is
    billiard's own: strictly more KiB than the limit."""
    if rss // 1024 > b.emergency // 1024:
        return "emergency"
    if rss >= b.critical:
        return "critical"
    if rss >= b.warning:
        return "warning"
    return None


def register_cleanup(fn: Callable[[], None]) -> Callable[[], None]:
    """Register ``fn`` to run at the critical tier, between tasks (a process-local cache of an
    HMS, say). Returns ``fn``, so it works as a decorator. A failing hook is logged, skipped."""
    _cleanups.append(fn)
    return fn


def clear_process_state() -> int:
    """Clear the process-local state Django and hms-tasks keep; returns how many steps ran.

    Call only between tasks: it closes this thread's database connections.
    """
    steps = 0
    try:
        from django.core.cache import caches
        from django.core.cache.backends.locmem import LocMemCache
        from django.db import connections, reset_queries

        reset_queries()
        connections.close_all()
        steps += 2
        for cache_ in caches.all(initialized_only=True):
            if isinstance(cache_, LocMemCache):
                cache_.clear()  # a per-process cache: clearing it only costs misses
            cache_.close()
            steps += 1
    except Exception:
        logger.warning("clearing Django state failed", exc_info=True)
    re.purge()
    linecache.clearcache()
    steps += 2
    for fn in list(_cleanups):
        try:
            fn()
            steps += 1
        except Exception:
            logger.warning("memory cleanup hook %r failed", fn, exc_info=True)
    return steps


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    if not name:
        return None
    fn = ctypes.CDLL(name).malloc_trim
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def trim_heap() -> bool:
    """Ask the allocator to return freed heap to the OS (glibc ``malloc_trim``); False where
    the allocator offers no way to."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


@dataclass
class Action:
    tier: Tier
    #: gc_young, gc_full, recycle, or emergency_gc (emergency where the process cannot be
    #: replaced now: no pool, or an idle child nudged by a sweep)
    action: str
    rss_before: int
    rss_after: int
    collected: int
    pause_ms: float
    trimmed: bool


def act(tier: Tier, *, recyclable: bool, between_tasks: bool) -> Action:
    """Run ``tier``'s action in this process and measure it.

    ``recyclable``: a prefork child that billiard will replace after the task (the emergency
    tier then leaves memory alone, so billiard's own check sees it). ``between_tasks``: safe
    to close connections and clear caches (False inside a signal handler, where the
    interrupted code may be using them).
    """
    before = current_rss()
    t0 = time.perf_counter()
    collected = 0
    trimmed = False
    if tier == "emergency" and recyclable:
        name = "recycle"
    elif tier == "warning":
        name = "gc_young"
        collected = gc.collect(1)
    else:
        name = "gc_full" if tier == "critical" else "emergency_gc"
        collected = gc.collect()
        if between_tasks:
            clear_process_state()
            collected += gc.collect()
        trimmed = trim_heap()
    pause = (time.perf_counter() - t0) * 1000
    return Action(tier=tier, action=name, rss_before=before, rss_after=current_rss(),
                  collected=collected, pause_ms=round(pause, 3), trimmed=trimmed)
