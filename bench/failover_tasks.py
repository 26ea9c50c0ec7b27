"""The tasks of the failover benchmark and fault test (not shipped: ``--include
bench.failover_tasks``). Their side effects go to a file, not Redis, so that what a failover
loses in Redis cannot hide a run."""

from __future__ import annotations

import os
import time
from typing import Any

from hms_tasks import conf
from hms_tasks.base import Capability

failover = Capability(name="test", soft_time_limit=10, time_limit=20)


def _log(line: str) -> None:
    with (conf.home() / "failover-runs.log").open("a") as log:
        log.write(f"{line} {time.time():.3f} {os.getpid()}\n")


@failover.task("hms.test.failover_mark")
def mark(n: int, ms: int = 20) -> dict[str, Any]:
    """Note the start, wait ``ms`` milliseconds, note the end, in
    ``$HMS_TASKS_HOME/failover-runs.log`` (idempotent: a re-run adds lines, counted once)."""
    _log(f"start {n}")
    time.sleep(ms / 1000)
    _log(f"done {n}")
    return {"n": n}


@failover.task("hms.test.failover_tick")
def tick() -> dict[str, Any]:
    """Beat's entry: note each run (beat follows the master if these continue)."""
    _log("tick 0")
    return {}
