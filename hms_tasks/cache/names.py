"""The cache's Celery task names: contracts, pinned here and snapshot-tested.

Import-light (nothing but this module): clients, beat schedules and the CLI name tasks without
importing Celery or Django. Renaming one breaks queued messages and beat entries.
"""

from __future__ import annotations

__all__ = [
    "CACHE_FANOUT_CHANGES",
    "CACHE_INVALIDATE_TAGS",
    "CACHE_STATS",
    "CACHE_WARM_HOT",
    "CACHE_WARM_PATIENTS",
]

CACHE_WARM_PATIENTS = "hms.cache.warm_patients"
CACHE_WARM_HOT = "hms.cache.warm_hot"
CACHE_INVALIDATE_TAGS = "hms.cache.invalidate_tags"
CACHE_FANOUT_CHANGES = "hms.cache.fanout_changes"
CACHE_STATS = "hms.cache.stats"
