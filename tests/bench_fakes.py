"""Benchmark parts for tests of ``python -m bench``: small, real, and one that fails."""

from __future__ import annotations

import redis

from bench.common import Row, django_on, private_redis


def uses_redis() -> list[Row]:
    """Publish a task through the Celery app bound to a private Redis, as a real part does,
    then stop that Redis (the next part must not talk to it)."""
    from hms_tasks import store
    from hms_tasks.metrics import names

    with private_redis() as url:
        app = django_on(url)
        app.send_task(names.METRICS_COLLECT_HOST, queue="hms.metrics")
        queued = store.client().llen("hms.metrics")
    return [Row(what="published", ours=queued, baseline=None, unit="msg", target="= 1",
                ok=queued == 1)]


def crash() -> list[Row]:
    raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
