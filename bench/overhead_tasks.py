"""The two no-op tasks of the overhead benchmark (not shipped: the worker loads them with
``--include bench.overhead_tasks``). Both get the same worker and the same task options."""

from __future__ import annotations

from typing import Any

from hms_tasks.base import Capability
from hms_tasks.celery import app

bench = Capability(name="bench", soft_time_limit=10, time_limit=20)


@bench.task("hms.bench.noop")
def hms_noop() -> dict[str, Any]:
    """A no-op declared the way hms tasks are: argument check, run report, redelivery cap."""
    return {"done": 1}


@app.task(name="bench.bare_noop", acks_late=True, reject_on_worker_lost=True,
          soft_time_limit=10, time_limit=20)
def bare_noop() -> dict[str, Any]:
    """The same no-op as a bare Celery task."""
    return {"done": 1}
