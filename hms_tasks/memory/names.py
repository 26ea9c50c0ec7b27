"""Celery task names of the memory capability: contracts, snapshot-tested.

Import-light (nothing but constants), so beat schedules and clients calling ``send_task`` can
name the tasks without importing Celery or Django. Renaming one breaks in-flight messages and
beat entries: add a migration note to docs/memory.md first.
"""

from __future__ import annotations

__all__ = ["MEMORY_SNAPSHOT", "MEMORY_SWEEP", "MEMORY_SWEEP_NODE"]

MEMORY_SWEEP = "hms.memory.sweep"
MEMORY_SWEEP_NODE = "hms.memory.sweep_node"
MEMORY_SNAPSHOT = "hms.memory.snapshot"
