"""A Redis crash during tasks: the worker keeps running, and no task that had started is lost.

A real prefork worker (concurrency 2) consumes a stream of short tasks
(``hms.test.mark``: 50 ms, then a key in Redis, idempotent) from a private redis-server with
AOF ``appendfsync always``. Mid-stream, Redis is SIGKILLed and restarted on the same port,
twice; a second test stops it gracefully (SIGTERM) instead. Afterwards the worker process is
still alive and consuming, and every published task either succeeded (its key is set) or has a
run report with a non-success outcome and an error saying why.

Figure: published, succeeded, reported-not-succeeded, lost (must be 0), runs and re-runs.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from hms_tasks import names, store
from tests.helpers import RedisServer, stop, wait_for

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
QUEUE = names.DEFAULT_QUEUE
TASK = "hms.test.mark"
TASKS = 300


@dataclass
class Outcome:
    published: int
    succeeded: int
    reported: dict[str, int]
    lost: list[int]
    runs: int
    rerun: int
    worker_alive: bool
    #: Messages still queued or unacked once every task settled.
    stranded: int


def _start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "hms_tasks", "worker", "--pool", "prefork",
             "--concurrency", "2", "--include", "tests.faults.crash_tasks", "-Q", QUEUE,
             "-n", "crash@localhost", "--without-mingle", "--without-gossip",
             "--loglevel", "INFO"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )


def _runs(home: Path) -> list[int]:
    path = home / "runs.log"
    if not path.exists():
        return []
    return [int(line.split()[0]) for line in path.read_text().splitlines() if line.strip()]


def _publish(url: str, numbers: range) -> None:
    from hms_tasks.celery import app

    with app.connection_for_write(url=url) as conn, conn.Producer() as producer:
        for n in numbers:
            app.send_task(TASK, kwargs={"n": n}, task_id=f"crash-{n}", producer=producer)


def _settle(client: redis.Redis, numbers: range) -> tuple[set[int], dict[int, dict[str, Any]]]:
    """The tasks whose key is set, and the latest non-success report of each other task."""
    done = {n for n, hit in zip(numbers, client.mget(
        [store.key("crash", "done", str(n)) for n in numbers]), strict=True) if hit}
    history = client.lrange(store.key("report", TASK, "history"), 0, -1)
    failed: dict[int, dict[str, Any]] = {}
    for doc in reversed(history):  # oldest first: the newest report of a task wins
        report = json.loads(doc)
        n = int(str(report["id"]).removeprefix("crash-"))
        if report["outcome"] != "success":
            failed[n] = report
        else:
            failed.pop(n, None)
    return done, {n: r for n, r in failed.items() if n not in done}


def _crash_run(tmp_path: Path, *, faults: list[str]) -> Outcome:
    """Publish :data:`TASKS` tasks and apply each fault ("kill" or "term", then a restart)
    once a further share of them has started. Returns what became of each task."""
    server = RedisServer(tmp_path / "redis", appendfsync="always")
    server.start()
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.faults.crash_settings",
           "MINIMAL_DB": str(tmp_path / "db.sqlite3"), "REDIS_URL": server.url,
           "HMS_TASKS_REDIS_URL": server.url, "HMS_TASKS_HOME": str(tmp_path)}
    log_path = tmp_path / "worker.log"
    worker = _start_worker(env, log_path)
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    numbers = range(TASKS)
    try:
        wait_for(lambda: b"ready." in log_path.read_bytes(), timeout=60,
                 what="the worker to be ready")
        _publish(server.url, numbers)
        for i, fault in enumerate(faults, start=1):
            share = TASKS * i // (len(faults) + 1)
            wait_for(lambda share=share: len(set(_runs(tmp_path))) >= share, timeout=60,
                     what=f"{share} tasks to start")
            if fault == "kill":
                server.kill()
            else:
                server.stop()
            server.start()
            assert worker.poll() is None, f"the worker exited after Redis fault {i} ({fault})"

        def settled() -> bool:
            if worker.poll() is not None:
                return True  # the worker exited: nothing more will settle
            with contextlib.suppress(redis.ConnectionError):
                done, failed = _settle(client, numbers)
                return len(done) + len(failed) == TASKS
            return False

        # A task whose run was cut off runs again as soon as the worker is back on Redis;
        # the deadline is far below the visibility timeout (3,600 s), so a task left for
        # kombu's visibility-timeout restore counts as lost.
        with contextlib.suppress(AssertionError):
            wait_for(settled, timeout=60, interval=0.2, what="every task to succeed or report")
        done, failed = _settle(client, numbers)
        alive = worker.poll() is None
        if alive:
            # Still consuming: one more task runs.
            _publish(server.url, range(TASKS, TASKS + 1))
            wait_for(lambda: client.get(store.key("crash", "done", str(TASKS))), timeout=30,
                     what="a task published after the faults to run")

        def stranded_messages() -> int:
            return int(client.llen(QUEUE)) + int(client.hlen("unacked"))

        # The last ack follows the last side effect by a moment.
        with contextlib.suppress(AssertionError):
            wait_for(lambda: stranded_messages() == 0, timeout=10, what="no message left")
        stranded = stranded_messages()
    finally:
        stop(worker)
        client.close()
        server.stop()
    runs = collections.Counter(n for n in _runs(tmp_path) if n < TASKS)
    outcome = Outcome(
        published=TASKS, succeeded=len(done),
        reported=dict(collections.Counter(
            f"{r['outcome']}:{r['error']}" for r in failed.values())),
        lost=sorted(set(numbers) - done - set(failed)),
        runs=sum(runs.values()), rerun=sum(1 for c in runs.values() if c > 1),
        worker_alive=alive, stranded=stranded,
    )
    print(f"\nredis faults {faults}: {outcome.published} published, {outcome.succeeded} "
          f"succeeded, {sum(outcome.reported.values())} reported not succeeded "
          f"{outcome.reported}, lost {len(outcome.lost)}, {outcome.runs} runs "
          f"({outcome.rerun} tasks ran more than once), worker alive {outcome.worker_alive}, "
          f"{outcome.stranded} messages left queued or unacked")
    if outcome.lost or not alive:
        # What the worker did with the lost tasks, and everything it warned about (the tail
        # alone missed them once), then the tail.
        text = log_path.read_text(errors="replace")
        marks = tuple(f"crash-{n}]" for n in outcome.lost)
        print("ran more than once:", sorted(n for n, c in runs.items() if c > 1))
        print("\n".join(line for line in text.splitlines()
                        if any(m in line for m in marks) or ("/MainProcess] Task" not in line
                        and "INFO/ForkPoolWorker" not in line))[-60000:])
        print(text[-5000:])
    return outcome


def test_redis_killed_twice_mid_stream_loses_no_task(tmp_path: Path) -> None:
    outcome = _crash_run(tmp_path, faults=["kill", "kill"])
    assert outcome.worker_alive
    assert outcome.lost == []
    assert outcome.stranded == 0
    for key in outcome.reported:
        assert key.split(":")[1] not in ("", "None"), f"a report without a reason: {key}"


def test_redis_stopped_gracefully_mid_stream_loses_no_task(tmp_path: Path) -> None:
    outcome = _crash_run(tmp_path, faults=["term"])
    assert outcome.worker_alive
    assert outcome.lost == []
    assert outcome.stranded == 0


def test_a_run_report_redis_could_not_take_is_written_with_the_next(
    redis_server: RedisServer,
) -> None:
    from hms_tasks import reports
    from tests.tasks_for_tests import echo

    redis_server.stop()
    assert echo(1, [7]) == {"count": 1, "ids": 1, "mode": "fast", "noted": False}
    redis_server.start()
    echo(2, [])
    summaries = [r["summary"] for r in reports.history("hms.test.echo")]
    # Newest first: the run that Redis missed was written, before the next one.
    assert [s and s["count"] for s in summaries] == [2, 1]
