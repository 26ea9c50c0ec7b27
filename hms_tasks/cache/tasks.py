"""Cache tasks, on the ``hms.cache`` queue. The work is in plain functions
(:mod:`~hms_tasks.cache.core`, :mod:`~hms_tasks.cache.changes`, :mod:`~hms_tasks.cache.warming`,
public through :mod:`hms_tasks.cache`); these only adapt them to Celery.

How the capability splits its work: the HMS's processes only *record* what changed (a Lua call
per 10 ms at most, not waited for); ``fanout_changes`` applies the change log and re-warms the
hot keys it invalidated; ``warm_hot`` keeps the hot set warm on a schedule, splitting large sets
into ``warm_patients`` chunks that any cache worker can take.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import redis
from celery import group
from celery.signals import worker_process_shutdown
from pydantic import Field

from hms_tasks.base import Capability
from hms_tasks.cache import changes, core, warming
from hms_tasks.cache.names import (
    CACHE_FANOUT_CHANGES,
    CACHE_INVALIDATE_TAGS,
    CACHE_STATS,
    CACHE_WARM_HOT,
    CACHE_WARM_PATIENTS,
)
from hms_tasks.cache.registry import kinds
from hms_tasks.cache.stats import cache_stats
from hms_tasks.cache.tags import MAX_TAGS, check_tags
from hms_tasks.errors import InvalidArguments
from hms_tasks.params import checked_by

__all__ = ["cache", "fanout_changes", "invalidate_tags", "stats", "warm_hot", "warm_patients"]

# Limits below the 150 s visibility timeout (a start-up check), far above the work: no task
# warms more than 10,000 ids of a kind at once (warm_patients splits into chunks of 1,000; the
# hot set's patients go out as chunks), about 1 s at the benchmarked 12,500-20,000 payloads/s;
# a non-patient kind's hot set warms inline, up to the limit of ids (100,000: 5-8 s at those
# rates); fanout_changes hands over after 20 s and then re-warms what it invalidated; an
# invalidation unlinks about 500,000 keys/s. A kind whose payload builder is over ten times
# slower than the demo's must keep its hot set smaller.
cache = Capability(name="cache", soft_time_limit=100, time_limit=120,
                   autoretry_for=(redis.ConnectionError, redis.TimeoutError))

#: Ids per warm_patients task when a set is split across workers.
CHUNK = 1000
#: fanout_changes keeps taking the change log this long after it ran dry, so a steady trickle
#: of changes is served by a few tasks a second rather than one task per change.
FANOUT_LINGER = 0.1
#: fanout_changes hands over to a fresh task after this long (its time limit is far off).
FANOUT_BUDGET = 20.0


@worker_process_shutdown.connect
def _write_recorded_changes(**_: Any) -> None:
    # A pool process that is recycled (max_tasks_per_child, a memory tier) ends with
    # os._exit, which runs no atexit hook: the changes its tasks committed are written first.
    changes.flush(2.0)


@cache.task(CACHE_WARM_PATIENTS)
def warm_patients(ids: Annotated[list[int], checked_by(core.check_ids)]) -> dict[str, Any]:
    """Build and store the summaries of the given patients.

    When: on demand, and as the chunks of ``warm_hot``. Up to 10,000 ids; more than 1,000 are
    split into a group of tasks of 1,000 on the ``hms.cache`` queue. About 0.05 s per 1,000
    patients. Idempotent (same rows, same payloads; a payload whose patient changed meanwhile is
    skipped, never stored stale). Retries Redis connection errors. Writes the patients' cache
    keys and their tag indexes. Returns counts: written, skipped_stale, missing, batches,
    queries, chunks dispatched.
    """
    ids = core.check_ids(ids)
    if len(ids) > CHUNK:
        chunks = [ids[i:i + CHUNK] for i in range(0, len(ids), CHUNK)]
        group(warm_patients.s(c) for c in chunks).apply_async()
        return {"requested": len(ids), "chunks_dispatched": len(chunks)}
    return dict(core.warm("patient", ids))


@cache.task(CACHE_WARM_HOT)
def warm_hot(limit: Annotated[int, Field(ge=1, le=100_000)] = 5000) -> dict[str, Any]:
    """Warm the hot set of every kind: what the HMS registered as hot (today's and tomorrow's
    appointments, admitted inpatients) and the most-read keys by decayed heat.

    When: every 10 minutes, and a full warm (larger limit) at 06:00 before morning rounds.
    First halves every key's heat (the decay). Patients beyond 1,000 go out as warm_patients
    chunks; other kinds warm inline. Seconds. Idempotent. Returns counts per kind.
    """
    if type(limit) is not int or not 1 <= limit <= 100_000:
        raise InvalidArguments(CACHE_WARM_HOT, ["limit: expected int from 1 to 100000"])
    tracked = warming.decay_heat()
    summary: dict[str, Any] = {"heat_tracked": tracked}
    for kind in kinds():
        ids = warming.hot_ids(kind, limit)
        summary[f"{kind}_hot"] = len(ids)
        if not ids:
            continue
        if kind == "patient" and len(ids) > CHUNK:
            for start in range(0, len(ids), core.MAX_WARM_IDS):
                warm_patients.delay(ids[start:start + core.MAX_WARM_IDS])
            summary["patient_chunks"] = -(-len(ids) // CHUNK)
            continue
        for start in range(0, len(ids), core.MAX_WARM_IDS):
            done = core.warm(kind, ids[start:start + core.MAX_WARM_IDS])
            summary[f"{kind}_written"] = summary.get(f"{kind}_written", 0) + done["written"]
            summary["queries"] = summary.get("queries", 0) + done["queries"]
    return summary


@cache.task(CACHE_INVALIDATE_TAGS)
def invalidate_tags(
        tags: Annotated[list[str], Field(min_length=1, max_length=MAX_TAGS),
                        checked_by(check_tags)],
) -> dict[str, Any]:
    """Invalidate every cached value carrying one of ``tags`` (``kind:id``, or ``all``), then
    re-warm those of them that were hot.

    When: on demand (an HMS that changed data behind the ORM's back, an operator). Fast:
    about 500,000 keys a second. Idempotent. Writes: new tag generations; unlinks the keys.
    Returns counts: tags, keys unlinked, hot keys re-warmed.
    """
    return dict(warming.invalidate_tags(tags))


@cache.task(CACHE_FANOUT_CHANGES)
def fanout_changes() -> dict[str, Any]:
    """Apply the change log the HMS's processes recorded: each step takes up to 100 entries off
    it and invalidates their tags atomically; then re-warm the invalidated keys that were hot.

    When: sent by a recording process when no fan-out is pending (one task per burst), and by
    beat every minute as a safety net. Runs until the log stays empty for 0.1 s, at most 20 s
    (then hands over to a new task). Idempotent: the log is consumed atomically, and
    invalidating twice is harmless. Returns counts: entries, tags, keys unlinked, re-warmed.
    """
    started = time.monotonic()
    total = {"entries": 0, "tags": 0, "unlinked": 0, "hot": 0, "rewarmed": 0, "handed_over": 0}
    hot: set[str] = set()
    dry_since: float | None = None
    while True:
        now = time.monotonic()
        clear = dry_since is not None and now - dry_since >= FANOUT_LINGER
        applied = changes.apply_changes(clear_if_empty=clear)
        total["entries"] += applied.entries
        total["tags"] += applied.tags
        total["unlinked"] += applied.unlinked
        hot.update(applied.hot)
        if applied.entries:
            dry_since = None
            if now - started > FANOUT_BUDGET:
                fanout_changes.delay()
                total["handed_over"] = 1
                break
        elif clear:
            break
        else:
            dry_since = dry_since or now
            time.sleep(0.005)
    total["hot"] = len(hot)
    total["rewarmed"] = sum(w["written"] for w in warming.refresh_ahead(hot))
    return total


@cache.task(CACHE_STATS, soft_time_limit=50, time_limit=60)
def stats(window_minutes: Annotated[int, Field(ge=1, le=1440)] = 15) -> dict[str, Any]:
    """Hit rate per kind over the last ``window_minutes``, keys per kind, Redis memory and
    evictions, the change-log backlog.

    When: every 5 minutes. About 0.1 s per 100,000 cached keys (a SCAN). Read-only, so
    idempotent. Returns those counts (also its run report).
    """
    if type(window_minutes) is not int or not 1 <= window_minutes <= 1440:
        raise InvalidArguments(CACHE_STATS, ["window_minutes: expected int from 1 to 1440"])
    return cache_stats(window_minutes=window_minutes)
