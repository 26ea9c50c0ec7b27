"""Registering the models whose saves and deletes invalidate cached payloads.

Separate from :mod:`~hms_tasks.cache.registry` so that the registry stays at the bottom of the
cache's imports: registering a model records it there and connects its signals in
:mod:`~hms_tasks.cache.changes`, which itself reads the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from hms_tasks.cache.changes import connect
from hms_tasks.cache.registry import TrackedModel, track

__all__ = ["register_model"]


def register_model(model: type[Any], *, tags: Callable[[Any], Iterable[str]],
                   fields: Sequence[str] = ()) -> TrackedModel:
    """Invalidate the tags ``tags(instance)`` names whenever an instance of ``model`` is saved
    or deleted (after the transaction commits). ``fields``: attribute names whose values *when
    the instance was loaded* also name tags (a moved appointment invalidates the old
    practitioner's schedule too); see :class:`~hms_tasks.cache.registry.TrackedModel`."""
    tracked = track(TrackedModel(model=model, tags=tags, fields=tuple(fields)))
    connect(tracked)
    return tracked
