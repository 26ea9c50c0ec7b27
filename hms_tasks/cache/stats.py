"""Cache statistics: hit rate per kind over a window, key counts per kind, memory."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from hms_tasks.cache.changes import pending_entries
from hms_tasks.cache.core import backend, heat_key

__all__ = ["cache_stats"]


def cache_stats(*, window_minutes: int = 15) -> dict[str, Any]:
    """Hits, misses and hit rate per kind over the last ``window_minutes``; keys per kind;
    Redis memory and evictions; the change-log backlog. Counts only: no key names, no values.

    Key counts come from a SCAN of the cache's keys: about 0.1 s per 100,000 keys.
    """
    be = backend()
    client = be.client()
    now = int(time.time() // 60)
    pipe = client.pipeline(transaction=False)
    for minute in range(now - window_minutes + 1, now + 1):
        pipe.hgetall(be.internal_key("stats", str(minute)))
    counts: Counter[str] = Counter()
    for bucket in pipe.execute():
        for field, value in bucket.items():
            counts[field.decode()] += int(value)
    per_kind: dict[str, dict[str, Any]] = {}
    for field, value in counts.items():
        kind, _, what = field.rpartition(":")
        per_kind.setdefault(kind, {"hits": 0, "misses": 0})[f"{what}s" if what == "hit"
                                                              else "misses"] += value
    for entry in per_kind.values():
        reads = entry["hits"] + entry["misses"]
        entry["hit_rate"] = round(entry["hits"] / reads, 4) if reads else None
    prefix = be.make_key("")
    keys: Counter[str] = Counter()
    for made in client.scan_iter(match=f"{prefix}*", count=1000):
        keys[made.decode()[len(prefix):].split(":", 1)[0]] += 1
    memory = client.info("memory")
    info_stats = client.info("stats")
    return {
        "window_minutes": window_minutes,
        "kinds": per_kind,
        "keys": dict(keys),
        "hot_keys": int(client.zcard(heat_key(be))),
        "change_log_backlog": pending_entries(),
        "used_memory": int(memory["used_memory"]),
        "maxmemory": int(memory.get("maxmemory", 0)),
        "evicted_keys": int(info_stats.get("evicted_keys", 0)),
    }
