"""What the cache knows about the HMS: payload kinds with their builders, and the models whose
changes invalidate them. The HMS registers both (the demo HMS does it in its ``AppConfig.ready``);
nothing here imports an HMS."""

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
    "register_model",
    "tracked_models",
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
    #: Cache key of an id; default ``<kind>:<id>``. A kind whose payload depends on the day
    #: puts the day in the key.
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


def register_model(model: type[Any], *, tags: Callable[[Any], Iterable[str]],
                   fields: Sequence[str] = ()) -> TrackedModel:
    """Invalidate the tags ``tags(instance)`` names whenever an instance of ``model`` is saved
    or deleted (after the transaction commits). ``fields``: see :class:`TrackedModel`."""
    from hms_tasks.cache.changes import connect

    tracked = TrackedModel(model=model, tags=tags, fields=tuple(fields))
    _models[model] = tracked
    connect(tracked)
    return tracked


def tracked_models() -> Mapping[type[Any], TrackedModel]:
    return dict(_models)
