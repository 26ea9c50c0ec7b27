"""Settings of the memory capability (``HMS_TASKS_MEMORY_*``) and the Celery option it sets.

Read them with :data:`get`; they are validated on first use and by the start-up check, with
errors naming the setting and field (``HMS_TASKS_MEMORY_TIERS['warning']: ...``).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hms_tasks import conf

__all__ = ["DEFAULT_MEMORY_TIERS", "MemorySettings", "MemoryTiers", "celery_options", "get"]

#: Memory tiers of a worker's pool child, in percent of its budget (HMS_TASKS_MEMORY_BUDGET_MB).
DEFAULT_MEMORY_TIERS: dict[str, int] = {"warning": 80, "critical": 90, "emergency": 95}

Percent = Annotated[int, Field(ge=1, le=100)]


class MemoryTiers(BaseModel):
    """Tiers in whole percent of the budget, rising."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    #: Collect the young generations.
    warning: Percent
    #: Full collection, process-local state cleared, heap trimmed.
    critical: Percent
    #: The child is replaced after its current task (Celery's worker_max_memory_per_child).
    emergency: Percent

    @model_validator(mode="after")
    def _rising(self) -> MemoryTiers:
        if not self.warning < self.critical < self.emergency:
            raise ValueError("must rise: warning < critical < emergency")
        return self


class MemorySettings(conf.Settings):
    """The memory budget of a worker pool child, its tiers, and how often a tier repeats."""

    merged: ClassVar[tuple[str, ...]] = ("memory_tiers",)

    #: Memory budget of one worker pool child in MiB; 0 turns the GC tiers off. Celery's
    #: ``worker_max_memory_per_child`` defaults to its emergency tier (:func:`celery_options`),
    #: so billiard replaces a child after the task that took it past. (A
    #: CELERY_WORKER_MAX_MEMORY_PER_CHILD that is set explicitly wins, and the budget is
    #: derived from it: see hms_tasks.memory.tiers.budget.)
    memory_budget_mb: int = 1024
    #: Tiers in percent of the budget: ``warning`` (collect the young generations),
    #: ``critical`` (full collection, process-local state cleared, heap trimmed),
    #: ``emergency`` (the child is replaced after its current task). Merged per key.
    memory_tiers: MemoryTiers = Field(
        default_factory=lambda: dict(DEFAULT_MEMORY_TIERS), validate_default=True)
    #: Seconds before the same tier's action repeats in the same process (escalations act
    #: at once).
    memory_cooldown: Annotated[int, Field(ge=0, le=3600)] = 30

    @field_validator("memory_budget_mb")
    @classmethod
    def _budget(cls, value: int) -> int:
        if not (value == 0 or 64 <= value <= 1_048_576):
            raise ValueError("must be 0 (tiers off) or an integer from 64 to 1048576")
        return value


get = conf.section(MemorySettings)


def celery_options() -> dict[str, Any]:
    """Celery's ``worker_max_memory_per_child`` (KiB) at the budget's emergency tier, so
    billiard replaces a pool child after the task that took it past, never mid-task; None when
    the tiers are off. A ``CELERY_WORKER_MAX_MEMORY_PER_CHILD`` in Django settings overrides
    it (Celery options given there win over these)."""
    s = get()
    limit = s.memory_budget_mb * 1024 * s.memory_tiers.emergency // 100
    return {"worker_max_memory_per_child": limit if s.memory_budget_mb else None}
