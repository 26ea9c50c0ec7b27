"""What the cache knows about the HMS: payload kinds with their builders, and the models whose
changes invalidate them. The HMS registers both (the demo HMS does it in its ``AppConfig.ready``)
through :func:`register_kind` and :func:`hms_tasks.cache.register_model`; nothing here imports
an HMS, and nothing here imports the rest of the cache (it sits below it)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hms_tasks.errors import InvalidArguments

__all__ = [
    "BuildMany",
    "Kind",
    "TrackedModel",
    "get_kind",
    "kinds",
    "register_kind",
    "track",
    "tracked_models",
    "unregister_kind",
]

#: Builds payloads for many ids with a constant number of queries; ids without a row are left
#: out. Every payload carries the ``id`` and ``updated_at`` (ISO 8601) of what it was built from.
BuildMany = Callable[[Sequence[int]], Mapping[int, dict[str, Any]]]


@dataclass(frozen=True)
class Kind:
    """A kind of cached payload, such as ``patient`` (a patient summary)."""

    name: str
    build_many: BuildMany
    #: Tags the payload of an id depends on, for example ``["patient:42"]``.
    tags: Callable[[int], list[str]]
    #: Ids worth having warm (for example, patients with appointments today), at most ``limit``.
    hot_ids: Callable[[int], list[int]] | None = None
    #: Cache key of an id; default ``<kind>:<id>``. A kind whose payload depends on the date
    #: (today's appointments) must put the date in its key (``<kind>:<id>:<date>``), or a
    #: payload built before midnight would be served after it until its TTL.
    key_of: Callable[[int], str] | None = None

    def key(self, id_: int) -> str:
        return self.key_of(id_) if self.key_of else f"{self.name}:{id_}"


@dataclass(frozen=True)
class TrackedModel:
    """A model whose saves and deletes invalidate cached payloads."""

    model: type[Any]
    #: Tags an instance's payloads carry; called with the instance, or, for the values it was
    #: loaded with, an object with the ``fields`` as attributes.
    tags: Callable[[Any], Iterable[str]]
    #: Attribute names whose *old* values also name tags (a moved appointment invalidates the
    #: old practitioner's schedule too). Snapshotted when an instance is loaded.
    fields: tuple[str, ...] = ()


_kinds: dict[str, Kind] = {}
_models: dict[type[Any], TrackedModel] = {}


def register_kind(
    name: str,
    *,
    build_many: BuildMany,
    tags: Callable[[int], list[str]],
    hot_ids: Callable[[int], list[int]] | None = None,
    key_of: Callable[[int], str] | None = None,
) -> Kind:
    """Register (or replace: a real HMS may override the demo's) a payload kind."""
    kind = Kind(name=name, build_many=build_many, tags=tags, hot_ids=hot_ids, key_of=key_of)
    _kinds[name] = kind
    return kind


def get_kind(name: object) -> Kind:
    """The registered kind ``name``; unknown: :class:`InvalidArguments` listing the kinds."""
    found = _kinds.get(name) if isinstance(name, str) else None
    if found is None:
        raise InvalidArguments("cache", [f"kind: unknown kind (allowed: {', '.join(kinds())})"])
    return found


def kinds() -> list[str]:
    return sorted(_kinds)


def track(tracked: TrackedModel) -> TrackedModel:
    """Record ``tracked`` (replacing an earlier entry of its model). Only records: connecting
    its signals is :func:`hms_tasks.cache.tracking.register_model`'s part."""
    _models[tracked.model] = tracked
    return tracked


def unregister_kind(name: str) -> None:
    """Forget the kind ``name`` if registered (tests register kinds of their own)."""
    _kinds.pop(name, None)


def tracked_models() -> Mapping[type[Any], TrackedModel]:
    return dict(_models)
