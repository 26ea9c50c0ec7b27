"""A pool child SIGKILLed mid-warm leaves no half-written cache key, and the warm completes.

A real prefork worker (one pool process, cache encryption on) warms the demo HMS's patients
(``hms.cache.warm_patients``, a batch of ids per trial) from the demo's SQLite database, seeded
under a private home. In each of 50 trials the cache is emptied, a warm is sent, and once it has
started (its state is STARTED) the pool process running it is SIGKILLed after a random delay
spanning the task's run, as the OOM killer would. The task is ``acks_late`` and
``reject_on_worker_lost``: its message goes back to the queue, and the respawned child runs it
again.

"Half-written", concretely (:mod:`hms_tasks.cache.lua`): ``FILL_MANY`` writes a value and adds
its key to the index set of each of its tags (``<prefix>:_hms:tag:<tag>``) in one Lua call. A
later ``invalidate_tags`` unlinks exactly the keys in the tag's index, so a value missing from
the index of one of its tags would survive an invalidation, and a key indexed without its value
means a fill that stopped halfway. After each kill, one MULTI/EXEC snapshot (every value key
and every tag index at one instant, while the redelivered warm may be running) must show:
each value is a complete tagged value (``\\x00hms1|tag=gen,...|payload`` whose payload
decrypts and decodes as JSON: Fernet authenticates the whole token, so a cut-off payload
fails), its key is in the index of each of its tags but ``all``, and every indexed key has
its value. After the redelivered warm succeeds, every id of the batch has its value.

The worker notices a dead pool process either at once (the process's sentinel) or at billiard's
pool maintenance, every 5 s; the redelivery follows, so a trial takes up to about 5 s.

Figure: trials, kills that landed mid-task (state STARTED at the kill), half-written keys (0),
warms completed by their redelivery, and the time from the kill to the warm's success.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import redis
from cryptography.fernet import Fernet

from hms_tasks.cache import names as cache_names
from hms_tasks.cache.backend import HEADER, HmsSerializer, Undecryptable
from hms_tasks.celery import app
from tests.faults.procs import REPO, CeleryProc
from tests.helpers import RedisServer, wait_for

pytestmark = pytest.mark.faults

TASK = cache_names.CACHE_WARM_PATIENTS
QUEUE = "hms.cache"
PATIENTS = 1500
BATCH = 1000  # warm_patients' chunk: one task, one batch, one FILL_MANY call
TRIALS = 50
PREFIX = "hms-cache:"
INTERNAL = PREFIX + "_hms:"
INDEX = INTERNAL + "tag:"


def snapshot(client: redis.Redis) -> tuple[dict[bytes, bytes], dict[str, set[bytes]]]:
    """Every cache value and every tag index, read in one MULTI/EXEC (one instant)."""
    keys = [k for k in client.scan_iter(match=PREFIX + "*", count=1000)
            if not k.startswith(INTERNAL.encode())]
    indexes = list(client.scan_iter(match=INDEX + "*", count=1000))
    with client.pipeline(transaction=True) as pipe:
        for k in keys:
            pipe.get(k)
        for i in indexes:
            pipe.smembers(i)
        out = pipe.execute()
    values = {k: v for k, v in zip(keys, out[:len(keys)], strict=True) if v is not None}
    index = {i.decode()[len(INDEX):]: set(m) for i, m in zip(indexes, out[len(keys):],
                                                            strict=True)}
    return values, index


def half_written(values: dict[bytes, bytes], index: dict[str, set[bytes]],
                 serializer: HmsSerializer) -> list[str]:
    """What a cut-off fill would leave: each problem, naming the key (never the payload)."""
    problems = []
    for key, value in values.items():
        end = value.find(b"|", len(HEADER))
        if not value.startswith(HEADER) or end < 0:
            problems.append(f"{key!r}: no complete header")
            continue
        try:
            serializer.loads(value[end + 1:])
        except (Undecryptable, ValueError):
            problems.append(f"{key!r}: payload does not decrypt and decode")
        for pair in value[len(HEADER):end].decode().split(","):
            tag = pair.partition("=")[0]
            if tag != "all" and key not in index.get(tag, set()):
                problems.append(f"{key!r}: not in the index of its tag {tag!r}")
    for tag, members in index.items():
        problems += [f"{m!r}: indexed under {tag!r} without a value" for m in members
                     if m not in values]
    return problems


def pool_child(worker: CeleryProc) -> psutil.Process:
    children = psutil.Process(worker.proc.pid).children()
    alive = [c for c in children if c.status() != psutil.STATUS_ZOMBIE]
    assert len(alive) == 1, alive
    return alive[0]


def test_sigkilled_pool_child_mid_warm_leaves_no_half_written_key(
        redis_server: RedisServer, tmp_path: Path) -> None:
    key = Fernet.generate_key().decode()
    (tmp_path / "warm_kill_settings.py").write_text(
        "from tests.faults.fault_settings import *  # noqa\n"
        f"HMS_TASKS_CACHE_ENCRYPTION_KEYS = [{key!r}]\n")
    home = tmp_path / "home"
    home.mkdir()
    env = {"DJANGO_SETTINGS_MODULE": "warm_kill_settings", "REDIS_URL": redis_server.url,
           "HMS_TASKS_HOME": str(home), "DATABASE_URL": "",  # the demo's SQLite in home
           "PYTHONPATH": os.pathsep.join((str(tmp_path), str(REPO)))}
    seeded = subprocess.run(
        [sys.executable, "-m", "hms_tasks.demo.cli", "--patients", str(PATIENTS), "--seed", "3"],
        cwd=REPO, env={**os.environ, **env}, capture_output=True, timeout=300)
    assert seeded.returncode == 0, seeded.stderr.decode(errors="replace")
    assert json.loads(seeded.stdout.splitlines()[-1])["patients"] == PATIENTS
    ids = list(range(1, PATIENTS + 1))  # a fresh database numbers them from 1

    client = redis.Redis.from_url(redis_server.url)
    serializer = HmsSerializer([key])
    worker = CeleryProc(["worker", "--pool", "prefork", "--concurrency", "1", "-Q", QUEUE,
                         "-n", "warmkill@localhost", "--without-mingle", "--without-gossip",
                         "--loglevel", "INFO"],
                        redis_url=redis_server.url, home=home, name="worker", env=env)
    rng = random.Random(12)
    landed = completed = 0
    problems: list[str] = []
    settled: list[float] = []  # kill to the warm's success
    try:
        worker.wait_line(" ready.")
        # The seed's change fan-out (queued before the worker started) runs first.
        assert app.send_task(TASK, kwargs={"ids": ids[:5]}).get(timeout=60)["missing"] == 0
        wait_for(lambda: client.llen(QUEUE) == 0 and client.hlen("unacked") == 0,
                 timeout=30, what="the queue to drain")
        # How long a warm of a batch runs, from its start (not its publish: an idle worker
        # takes a message up to 100 ms after it lands): the kills are spread over it.
        first = app.send_task(TASK, kwargs={"ids": ids[:BATCH]})
        wait_for(lambda: first.state in ("STARTED", "SUCCESS"), timeout=30, interval=0.002,
                 what="the timed warm to start")
        t0 = time.perf_counter()
        first.get(timeout=60)
        span = time.perf_counter() - t0
        for trial in range(TRIALS):
            stale = list(client.scan_iter(match=PREFIX + "*", count=1000))
            if stale:
                client.delete(*stale)
            batch = sorted(rng.sample(ids, BATCH))
            child = pool_child(worker)
            result = app.send_task(TASK, kwargs={"ids": batch})
            wait_for(lambda result=result: result.state in ("STARTED", "SUCCESS"),
                     timeout=30, interval=0.002, what=f"trial {trial}: the warm to start")
            time.sleep(rng.uniform(0, span))  # the fault's timing, not a synchronization
            if result.state == "STARTED":
                landed += 1
            child.kill()
            killed_at = time.perf_counter()
            child.wait(timeout=10)
            values, index = snapshot(client)
            problems += [f"trial {trial}: {p}" for p in half_written(values, index,
                                                                      serializer)]
            summary = result.get(timeout=60)
            settled.append(time.perf_counter() - killed_at)
            values, index = snapshot(client)
            problems += [f"trial {trial}, after: {p}" for p in half_written(values, index,
                                                                             serializer)]
            if summary["written"] == BATCH and len(values) == BATCH:
                completed += 1
            wait_for(lambda: len(psutil.Process(worker.proc.pid).children()) == 1
                     and client.hlen("unacked") == 0, timeout=30,
                     what=f"trial {trial}: the pool to be whole and the message acked")
        assert worker.proc.poll() is None, "the worker exited"
    finally:
        worker.kill()
        client.close()
    print(f"\nFIGURE warm kill: {TRIALS} trials of {BATCH} ids (warm {span * 1000:.0f} ms),"
          f" {landed} kills landed mid-task, {len(problems)} half-written keys,"
          f" {completed}/{TRIALS} warms completed by their redelivery; kill to success"
          f" {min(settled):.2f}-{max(settled):.2f} s")
    assert problems == [], problems[:20]
    assert completed == TRIALS
    assert landed >= TRIALS // 2, "too few kills landed mid-task to prove anything"
