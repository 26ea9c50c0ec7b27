"""The task of the Redis crash fault test: short, idempotent, with its side effect in Redis."""

from __future__ import annotations

import os
import time
from typing import Any

from hms_tasks import conf, store
from hms_tasks.base import Capability

crash = Capability(name="test", soft_time_limit=10, time_limit=20)


@crash.task("hms.test.mark")
def mark(n: int, ms: int = 50) -> dict[str, Any]:
    """Wait ``ms`` milliseconds, then set ``<p>:crash:done:<n>`` in Redis (idempotent: a
    second run sets the same key). Every start is appended to ``$HMS_TASKS_HOME/runs.log``,
    so the test counts runs without Redis."""
    with (conf.home() / "runs.log").open("a") as log:
        log.write(f"{n} {os.getpid()}\n")
    time.sleep(ms / 1000)
    store.client().set(store.key("crash", "done", str(n)), "1")
    return {"n": n}
