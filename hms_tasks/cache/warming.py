"""The hot set and refresh-ahead: which keys deserve to be warm before anyone asks."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from hms_tasks.cache.core import MAX_WARM_IDS, WarmSummary, backend, heat_key, parse_key, warm
from hms_tasks.cache.registry import get_kind, kinds

__all__ = ["decay_heat", "hot_ids", "refresh_ahead"]

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
