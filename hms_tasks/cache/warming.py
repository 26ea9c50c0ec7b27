"""The hot set and refresh-ahead: which keys deserve to be warm before anyone asks, and
invalidating tags now (re-warming what was hot)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import TypedDict

from hms_tasks.cache import settings
from hms_tasks.cache.core import MAX_WARM_IDS, WarmSummary, backend, heat_key, parse_key, warm
from hms_tasks.cache.registry import get_kind, kinds
from hms_tasks.cache.tags import check_tags
from hms_tasks.errors import InvalidArguments

__all__ = ["Invalidated", "decay_heat", "hot_ids", "invalidate_tags", "refresh_ahead"]

#: Each warm_hot halves every key's heat, and forgets keys colder than this.
HEAT_FLOOR = 0.25


def decay_heat() -> int:
    """Halve the heat of every key and drop the cold ones; returns keys still tracked."""
    be = backend()
    key = heat_key(be)
    pipe = be.client().pipeline(transaction=True)
    pipe.zunionstore(key, {key: 0.5})
    pipe.zremrangebyscore(key, "-inf", HEAT_FLOOR)
    pipe.zcard(key)
    return int(pipe.execute()[-1])


def hot_ids(kind: str, limit: int) -> list[int]:
    """The kind's own hot set (``Kind.hot_ids``: today's appointments, say) first, then its
    most-read keys by decayed heat; at most ``limit`` ids."""
    k = get_kind(kind)
    ids: dict[int, None] = dict.fromkeys(k.hot_ids(limit) if k.hot_ids else [])
    if len(ids) < limit:
        be = backend()
        # Heat covers every kind; read a bounded slice and keep this kind's keys.
        for made in be.client().zrevrange(heat_key(be), 0, limit * len(kinds()) - 1):
            parsed = parse_key(be, made.decode())
            if parsed and parsed[0] == kind:
                ids.setdefault(parsed[1])
                if len(ids) >= limit:
                    break
    return list(ids)[:limit]


def refresh_ahead(made_keys: Iterable[str]) -> list[WarmSummary]:
    """Re-warm the given (just invalidated, hot) keys, grouped by kind."""
    be = backend()
    by_kind: dict[str, list[int]] = defaultdict(list)
    for made in made_keys:
        parsed = parse_key(be, made)
        if parsed:
            by_kind[parsed[0]].append(parsed[1])
    return [
        warm(kind, ids[start:start + MAX_WARM_IDS])
        for kind, ids in sorted(by_kind.items())
        for start in range(0, len(ids), MAX_WARM_IDS)
    ]


class Invalidated(TypedDict):
    tags: int
    unlinked: int
    hot: int
    rewarmed: int


def invalidate_tags(tags: Iterable[str]) -> Invalidated:
    """Invalidate every cached value carrying one of ``tags`` (``kind:id``, or ``all``) now, in
    this process, then re-warm those of them that were hot (``HMS_TASKS_CACHE_HOT_SCORE``).

    For data changed behind the ORM's back (raw SQL, another application); changes made
    through registered models are invalidated by the write path without this. Idempotent.
    Tags are checked first (:class:`~hms_tasks.errors.InvalidArguments` naming ``tags``; the
    message never quotes a tag). Returns counts: tags, keys unlinked, hot keys, re-warmed.
    """
    tags = check_tags(tags)
    if not tags:
        raise InvalidArguments("cache", ["tags: must not be empty"])
    be = backend()
    unlinked, hot = be.invalidate_tags(tags, heat_key=heat_key(be),
                                       hot_score=settings.get().cache_hot_score)
    rewarmed = sum(w["written"] for w in refresh_ahead(hot))
    return {"tags": len(tags), "unlinked": unlinked, "hot": len(hot), "rewarmed": rewarmed}
