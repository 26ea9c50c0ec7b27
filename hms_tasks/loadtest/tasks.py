"""Load-test tasks, on the ``hms.loadtest`` queue (give it its own workers, on other machines,
so load generation never competes with housekeeping). The work is in plain functions
(:mod:`~hms_tasks.loadtest.orchestrate`, :mod:`~hms_tasks.loadtest.shard`); these only adapt
them.

How the capability splits its work: ``run`` validates a test, checks that enough loadtest
worker processes are free, records the run in Redis and publishes one ``shard`` per shard (all
starting at one wall-clock instant) plus a final ``merge`` due after the run's deadline, then
returns at once. Each ``shard`` supervises a Locust subprocess (Locust is never imported in a
worker) for the test's duration and checkpoints its data to Redis every second; the last shard
to finish queues ``merge``, which merges the shards' histograms exactly and judges the run.
Nothing waits on a subtask, so no worker deadlocks on its own run.
"""

from __future__ import annotations

from typing import Annotated, Any, cast

import redis
from celery import current_task
from pydantic import Field

from hms_tasks.base import Capability
from hms_tasks.celery import STARTUP_CHECKS
from hms_tasks.loadtest import keys, names, orchestrate, settings, spec
from hms_tasks.loadtest import shard as shards
from hms_tasks.params import checked_by, satisfies

__all__ = ["loadtest", "merge", "run", "shard"]

#: The shard's hard time limit covers the longest run: start delay, duration, grace, the kill
#: and a margin (1,953 s). Far above the visibility timeout: shards are acked at their start
#: (below), and every other load-test task declares a limit of its own below the timeout.
SHARD_TIME_LIMIT = (settings.MAX_START_DELAY + settings.MAX_DURATION_CAP
                    + settings.MAX_GRACE + 63)

loadtest = Capability(name="loadtest", soft_time_limit=SHARD_TIME_LIMIT - 30,
                      time_limit=SHARD_TIME_LIMIT,
                      autoretry_for=(redis.ConnectionError, redis.TimeoutError))

STARTUP_CHECKS.append(spec.configured_problems)
STARTUP_CHECKS.append(orchestrate.merge_hop_problems)


@loadtest.task(names.RUN, soft_time_limit=50, time_limit=60)
def run(test: Annotated[str | dict[str, Any], checked_by(orchestrate.resolve)] | None = None,
        nightly: bool = False) -> dict[str, Any]:
    """Start a distributed load test: ``test`` is a test name of HMS_TASKS_LOADTEST_TESTS or a
    definition (see :mod:`hms_tasks.loadtest.spec`); ``nightly`` runs the test
    HMS_TASKS_LOADTEST_NIGHTLY names, and does nothing when it names none.

    When: on demand (``hms-tasks loadtest run``, Flower, ``dispatch``) and from beat
    (``loadtest-nightly``). About the inspect timeout (``HMS_TASKS_METRICS_PING_TIMEOUT``): it
    never waits for the load. Idempotent: the run id is this task's id, and a redelivered
    message finds its run recorded and publishes nothing again. Refuses (InvalidArguments, not
    retried) a bad definition: a target id not in HMS_TASKS_LOADTEST_TARGETS, a URL where an
    id is expected, a locustfile outside the scenarios directory, users, duration or shards
    out of their limits, thresholds of the wrong type; and (LoadTestRefused) more shards than
    free loadtest worker processes. Nothing is started then. Retries Redis connection errors.
    Writes ``<p>:loadtest:run:<run>`` and ``<p>:loadtest:runs``. Returns the run id, test name,
    users, shards, start and end instants and the shard task ids.
    """
    test_spec = orchestrate.resolve(test, nightly=nightly)
    if test_spec is None:
        return {"skipped": True, "reason": "HMS_TASKS_LOADTEST_NIGHTLY names no test"}
    task_id = current_task.request.id if current_task and current_task.request.id else None
    return orchestrate.start_run(test_spec, run_id=task_id)


# Acked at its start, not at its end: a shard whose worker died is not redelivered (load
# cannot be replayed, and the run's merge reports the shard with what it checkpointed), so
# its 1,953 s limit does not hold every other queue's redelivery back to half an hour.
@loadtest.task(names.SHARD, autoretry_for=(), acks_late=False,
               reject_on_worker_lost=False)
def shard(run_id: Annotated[str, satisfies(orchestrate.valid_run_id, "a run id")],
          index: Annotated[int, Field(ge=0, le=999)]) -> dict[str, Any]:
    """Generate one shard's share of a run's load: a Locust subprocess (FastHttpUser by
    default) hitting only the run's target, from the run's common start instant for its
    duration; progress (elapsed, users, current RPS, requests, failures) goes to Redis and to
    this task's state (``PROGRESS``, in Flower and the result backend) every second.

    When: published by ``run``, one per shard. Lasts the test's duration plus a few seconds
    (bounded by the duration and HMS_TASKS_LOADTEST_GRACE whatever happens). Idempotent: the
    first delivery claims the shard's slot in Redis; a redelivered message (its worker died)
    finds it claimed and returns at once (the checkpointed seconds are merged). Not retried:
    load cannot be replayed. Writes ``<p>:loadtest:run:<run>:shard:<i>`` and its ``:ticks``
    checkpoint. Returns the shard's state, node, requests, failures and reason.
    """
    if not orchestrate.valid_run_id(run_id) or not 0 <= index < 1000:
        from hms_tasks.errors import InvalidArguments

        raise InvalidArguments(names.SHARD, ["run_id or index: not a shard of a run"])

    def progress(p: keys.ShardProgress) -> None:
        task = current_task
        if task is None or not task.request.id:
            return
        meta: dict[str, Any] = {"run_id": run_id, "shard": index,
                                **{k: v for k, v in p.items() if k != "v"}}
        task.update_state(state="PROGRESS", meta=meta)
        task.send_event("task-progress", **cast(Any, meta))

    return shards.run_shard(run_id, index, on_progress=progress)


@loadtest.task(names.MERGE, soft_time_limit=100, time_limit=120)
def merge(run_id: Annotated[str, satisfies(orchestrate.valid_run_id, "a run id")]
          ) -> dict[str, Any]:
    """Merge a run's shards into its report: totals, per-endpoint table and per-second
    timeline from the merged response-time histograms (exactly what one Locust process would
    report for the same requests), the verdict of every threshold, the comparison with the
    previous run of the same test (a regression feeds the ``loadtest_regression`` alert), and
    the HTML page under HMS_TASKS_LOADTEST_REPORTS_DIR.

    When: queued by the last shard to finish, and once more after the run's deadline (which
    merges whatever the shards reported if one never finished): that final merge waits in
    hops of at most 20 s (the longest countdown the 150 s visibility timeout leaves a task
    with a 120 s limit), re-sending itself until the deadline has passed. Well under a second for 8
    shards of 10 minutes and 20 endpoints (benchmarked). Idempotent: a merged run is left
    alone. Retries Redis connection errors. Writes ``<p>:loadtest:report:<run>``, the run's
    status and ``<p>:loadtest:history:<test>``. Returns the run's status, counts, RPS, p95,
    failed checks and whether it regressed.
    """
    if not orchestrate.valid_run_id(run_id):
        from hms_tasks.errors import InvalidArguments

        raise InvalidArguments(names.MERGE, ["run_id: not a run id"])
    return orchestrate.merge_or_wait(run_id)
