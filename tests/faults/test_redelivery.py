"""Redelivery after a worker dies, and the limits that keep one message from killing workers
forever: real ``celery worker`` subprocesses (tests/faults/procs.py) on the session's Redis,
with the 60 s visibility timeout of tests/faults/fault_settings.py.

- A whole worker SIGKILLed (its process group, as the OOM killer or a container kill) with 20
  tasks running, a second worker alive: every task runs again on the second one, after the
  visibility timeout plus kombu's restore sweep (``RESTORE_INTERVAL``). Figure: the
  redelivery times (kill to the second start).
- Rolling SIGTERM restarts of two workers under a steady load: nothing lost, no task started
  twice, no side effect applied twice.
- A task that kills its pool child every time: dropped after HMS_TASKS_MAX_REDELIVERIES, as a
  FAILURE with ``Poisoned``; the worker keeps serving.
- A task past its hard time limit: the child is replaced and the result and the run report say
  ``TimeLimitExceeded``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import TimeLimitExceeded

from hms_tasks import celery as hms_celery
from hms_tasks import conf, names, reports, store
from hms_tasks.errors import Poisoned
from tests.faults import fault_settings
from tests.faults.procs import worker
from tests.helpers import RedisServer, wait_for

pytestmark = pytest.mark.faults

QUEUE = names.queue_for("hms.test.effect")


def starts(key: str) -> list[tuple[str, int, float]]:
    """(task id, pid, time) of every start of an ``hms.test.effect`` task under ``key``."""
    rows = store.client().lrange(store.key("test", key, "starts"), 0, -1)
    return [(i, int(p), float(t)) for i, p, t in (r.split() for r in rows)]


def done(key: str) -> dict[str, int]:
    """Task id -> runs that reached the side effect."""
    runs = store.client().hgetall(store.key("test", key, "done"))
    return {k: int(v) for k, v in runs.items()}


def duplicates(key: str) -> int:
    return int(store.client().get(store.key("test", key, "duplicates")) or 0)


def test_sigkilled_worker_tasks_run_again_on_the_survivor(
        redis_server: RedisServer, celery_app: Any, tmp_path: Path) -> None:
    trials = 20
    victim = worker("victim", queue=QUEUE, redis_url=redis_server.url, home=tmp_path,
                    pool="threads", concurrency=trials)
    survivor = None
    try:
        victim.wait_line("ready.")
        ids = [celery_app.send_task("hms.test.effect", kwargs={"key": "kill", "seconds": 600.0,
                                                               "first_only": True}).id
               for _ in range(trials)]
        wait_for(lambda: len(starts("kill")) == trials, timeout=60, what="every task to start")
        survivor = worker("survivor", queue=QUEUE, redis_url=redis_server.url, home=tmp_path)
        survivor.wait_line("ready.")
        assert not done("kill"), "nothing finished before the kill"
        killed_at = time.time()
        victim.kill()
        wait_for(lambda: len(done("kill")) == trials, timeout=5 * 60, interval=0.2,
                 what="every task to run again")
        runs = done("kill")
        assert set(runs) == set(ids), "0 lost"
        assert set(runs.values()) == {1}
        assert duplicates("kill") == 0
        again = {i: t for i, pid, t in starts("kill") if t > killed_at}
        assert set(again) == set(ids)
        assert wait_for(lambda: store.client().hlen("unacked") == 0, what="every ack")
        delays = sorted(t - killed_at for t in again.values())
        first = {i: t for i, pid, t in starts("kill") if t <= killed_at}
        since_start = max(again[i] - first[i] for i in ids)
        vt = fault_settings.HMS_TASKS_VISIBILITY_TIMEOUT
        print(f"\nFIGURE worker SIGKILL with {trials} tasks running: {trials - len(runs)} lost,"
              f" 0 duplicates; redelivered after {delays[0]:.1f} s (min),"
              f" {statistics.median(delays):.1f} s (median), {delays[-1]:.1f} s (max),"
              f" at most {since_start:.1f} s after the first start;"
              f" bound: visibility timeout {vt} s + restore sweep"
              f" {hms_celery.RESTORE_INTERVAL} s")
    finally:
        victim.kill()
        if survivor is not None:
            survivor.terminate()


def test_rolling_sigterm_restarts_lose_and_repeat_nothing(
        redis_server: RedisServer, celery_app: Any, tmp_path: Path) -> None:
    workers = [worker(f"roll{i}", queue=QUEUE, redis_url=redis_server.url, home=tmp_path)
               for i in range(2)]
    sent: list[str] = []

    def load(n: int) -> None:
        sent.extend(celery_app.send_task("hms.test.effect",
                                         kwargs={"key": "roll", "seconds": 0.05}).id
                    for _ in range(n))

    stops: list[str] = []  # what the failure message shows: each restart's worker and times
    shutdowns: list[float] = []  # seconds from each SIGTERM to the worker's exit
    try:
        for w in workers:
            w.wait_line("ready.")
        load(100)
        restarts = 4
        for r in range(restarts):
            old = workers[r % 2]
            # Mid-load: the old worker has tasks running when it is asked to stop.
            wait_for(lambda: len(done("roll")) < len(sent), what="tasks still queued")
            asked = time.time()
            assert old.terminate() == 0
            shutdowns.append(time.time() - asked)
            stops.append(f"{old.name} (pid {old.proc.pid}) SIGTERM at {asked:.3f},"
                         f" exited at {time.time():.3f}")
            load(50)
            workers[r % 2] = worker(f"roll{r + 2}", queue=QUEUE, redis_url=redis_server.url,
                                    home=tmp_path)
            workers[r % 2].wait_line("ready.")
            load(50)
        wait_for(lambda: len(done("roll")) == len(sent), timeout=180, interval=0.2,
                 what="every task to finish")
        runs = done("roll")
        lost = set(sent) - set(runs)
        repeated = [i for i, n in runs.items() if n > 1]
        assert not lost
        # Each task that started more than once, with the pids and times of its starts.
        twice: dict[str, list[str]] = {}
        for i, pid, t in starts("roll"):
            twice.setdefault(i, []).append(f"pid {pid} at {t:.3f}")
        twice = {i: s for i, s in twice.items() if len(s) > 1}
        why = f"started twice: {twice}; stops: {stops}"
        assert duplicates("roll") == 0, why
        assert not repeated, why
        # A warm shutdown finishes and acks what its pool took: nothing even starts twice.
        assert not twice, why
        print(f"\nFIGURE rolling SIGTERM: {restarts} restarts under {len(sent)} tasks:"
              f" {len(lost)} lost, {duplicates('roll')} duplicate side effects,"
              f" {len(repeated)} tasks run twice, {len(twice)} started twice; warm shutdowns"
              f" took {min(shutdowns):.1f}-{max(shutdowns):.1f} s")
    finally:
        for w in workers:
            w.terminate()


def test_poisoned_message_is_dropped_and_worker_keeps_serving(
        redis_server: RedisServer, celery_app: Any, tmp_path: Path) -> None:
    proc = worker("poison", queue=QUEUE, redis_url=redis_server.url, home=tmp_path,
                  concurrency=1)
    try:
        proc.wait_line("ready.")
        doomed = celery_app.send_task("hms.test.die")
        report = wait_for(lambda: reports.latest("hms.test.die"), timeout=120,
                          what="the poisoned message's run report")
        assert report["outcome"] == "poisoned"
        assert report["id"] == doomed.id
        assert report["error"] == "Poisoned"
        deaths = int(store.client().get(store.key("redeliveries", doomed.id)) or 0)
        assert deaths == conf.get().max_redeliveries + 1
        # Not a success: the result is a failure whose error names no data.
        with pytest.raises(Poisoned):
            doomed.get(timeout=30)
        assert doomed.state == "FAILURE"
        # The message is gone for good: nothing queued, nothing waiting to be restored.
        client = store.client()
        wait_for(lambda: client.hlen("unacked") == 0, what="the poisoned message to be acked")
        assert client.llen(QUEUE) == 0
        # The worker survived its children's deaths and still serves.
        ok = celery_app.send_task("hms.test.echo", kwargs={"count": 1, "ids": []})
        assert ok.get(timeout=60) == {"count": 1, "ids": 0, "mode": "fast", "noted": False}
        assert proc.proc.poll() is None
        print(f"\nFIGURE poison task: {deaths - 1} redeliveries then dropped"
              f" (HMS_TASKS_MAX_REDELIVERIES={conf.get().max_redeliveries}), state"
              f" {doomed.state}, worker alive")
    finally:
        proc.terminate()


def test_hard_time_limit_replaces_the_child_and_says_so(
        redis_server: RedisServer, celery_app: Any, tmp_path: Path) -> None:
    proc = worker("limit", queue=QUEUE, redis_url=redis_server.url, home=tmp_path,
                  concurrency=1)
    try:
        proc.wait_line("ready.")
        before = celery_app.send_task("hms.test.whoami").get(timeout=60)["pid"]
        stuck = celery_app.send_task("hms.test.hang", kwargs={"seconds": 30.0})
        with pytest.raises(TimeLimitExceeded):
            stuck.get(timeout=60)
        report = wait_for(lambda: reports.latest("hms.test.hang"), what="the run report")
        assert report["outcome"] == "failure"
        assert report["error"] == "TimeLimitExceeded"
        after = celery_app.send_task("hms.test.whoami").get(timeout=60)["pid"]
        assert after != before, "the child past its hard limit was replaced"
        assert proc.proc.poll() is None
        print(f"\nFIGURE hard time limit: result {type(stuck.result).__name__}, run report"
              f" {report['error']}, child {before} replaced by {after}")
    finally:
        proc.terminate()
