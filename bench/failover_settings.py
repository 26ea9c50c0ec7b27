"""Settings of the failover benchmark's processes: the minimal ones (no demo), Redis behind
the sentinels named by ``REDIS_SENTINELS``/``REDIS_SENTINEL_MASTER``/
``REDIS_SENTINEL_PASSWORD``, the tag cache on it, and a one-entry beat schedule."""

from __future__ import annotations

import os

from tests.minimal_settings import *  # noqa: F403

HMS_TASKS_REDIS_URL = os.environ["REDIS_URL"]
HMS_TASKS_REDIS_SENTINELS = os.environ["REDIS_SENTINELS"].split(",")
HMS_TASKS_REDIS_SENTINEL_MASTER = os.environ["REDIS_SENTINEL_MASTER"]
HMS_TASKS_REDIS_SENTINEL_PASSWORD = os.environ.get("REDIS_SENTINEL_PASSWORD") or None
HMS_TASKS_REPORT_HISTORY = 20000
HMS_TASKS_BEAT_SCHEDULE = "bench.failover_settings"
# The publish outbox (0: off, to measure what it saves); the default otherwise.
HMS_TASKS_PUBLISH_OUTBOX_SECONDS = float(os.environ.get("BENCH_PUBLISH_OUTBOX_SECONDS", "60"))
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "hms": {"BACKEND": "hms_tasks.cache.TaggedRedisCache", "LOCATION": HMS_TASKS_REDIS_URL,
            "KEY_PREFIX": "hms-cache"},
}

#: Beat's schedule (HMS_TASKS_BEAT_SCHEDULE names this module): a tick every second.
BEAT_SCHEDULE = {
    "failover-tick": {"task": "hms.test.failover_tick", "schedule": 1.0,
                      "options": {"expires": 5}},
}
# Worker and beat import the benchmark's tasks (beat checks its entries are registered).
CELERY_IMPORTS = ("bench.failover_tasks",)
