"""Memory: tiered GC triggers that keep every worker pool child within its budget, a periodic
sweep of every child of every node, and on-demand tracemalloc comparisons to find a leak. The
manual is docs/memory.md.

The public API is :data:`__all__`, imported on first use (so ``hms_tasks.memory.names`` stays
import-light). An HMS that keeps process-local caches registers them to be cleared at the
critical tier::

    from hms_tasks.memory import register_cleanup

    @register_cleanup
    def _drop_my_cache() -> None:
        MY_CACHE.clear()

Modules: :mod:`~hms_tasks.memory.tiers` (budget, tiers, actions), :mod:`~hms_tasks.memory.hooks`
(the worker signal hooks), :mod:`~hms_tasks.memory.sweep`, :mod:`~hms_tasks.memory.snapshot`
(tracemalloc), :mod:`~hms_tasks.memory.settings`, :mod:`~hms_tasks.memory.names`,
:mod:`~hms_tasks.memory.tasks`, :mod:`~hms_tasks.memory.cli`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hms_tasks.capabilities import lazy_exports as _lazy_exports

if TYPE_CHECKING:
    from hms_tasks.memory.hooks import MemoryEvent, events
    from hms_tasks.memory.settings import MemorySettings
    from hms_tasks.memory.settings import get as get_settings
    from hms_tasks.memory.snapshot import SnapshotResult
    from hms_tasks.memory.snapshot import results as snapshot_results
    from hms_tasks.memory.tiers import Budget, budget, current_rss, register_cleanup

__all__ = [
    "Budget",
    "MemoryEvent",
    "MemorySettings",
    "SnapshotResult",
    "budget",
    "current_rss",
    "events",
    "get_settings",
    "register_cleanup",
    "snapshot_results",
]

#: Public name -> (module, attribute).
_EXPORTS: dict[str, tuple[str, str]] = {
    "Budget": ("tiers", "Budget"),
    "MemoryEvent": ("hooks", "MemoryEvent"),
    "MemorySettings": ("settings", "MemorySettings"),
    "SnapshotResult": ("snapshot", "SnapshotResult"),
    "budget": ("tiers", "budget"),
    "current_rss": ("tiers", "current_rss"),
    "events": ("hooks", "events"),
    "register_cleanup": ("tiers", "register_cleanup"),
    "get_settings": ("settings", "get"),
    "snapshot_results": ("snapshot", "results"),
}


__getattr__ = _lazy_exports(__name__, _EXPORTS)
