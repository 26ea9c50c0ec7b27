"""Redis killed -9 and restarted (AOF ``appendfsync always``): beat and the worker resume.

Two real ``celery beat`` processes (redbeat, lock 3 s, loop 1 s: tests/faults/fault_settings.py)
on the one-second test schedule (tests/faults/beat_schedule_fast.py) and a prefork worker that
runs its entry (``hms.test.echo``), on a private redis-server. Three times, Redis is SIGKILLed and
started again on the same port from its AOF. After each restart the slots go on: a run of the
entry starts after the restart, and more follow. What docs/reliability.md claims is checked:
a Redis blip does not end beat (a tick is skipped and retried); if the lock expired meanwhile,
the holder waits for it again as a standby and one beat takes it. No beat exits, and exactly
one publishes: no more distinct runs than slots in the span, and no slot published twice.

Figure: per restart, the time from Redis being back to the next run of the entry; which beat
held the lock before and after; beats and worker alive; runs and slots over the test.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from hms_tasks import names, store
from tests.faults import beat_schedule_fast, fault_settings
from tests.faults.procs import CeleryProc, beat, worker
from tests.helpers import RedisServer, wait_for

pytestmark = pytest.mark.faults

SCHEDULE = "tests.faults.beat_schedule_fast"
TASK = "hms.test.echo"
QUEUE = names.queue_for(TASK)
PERIOD = beat_schedule_fast.PERIOD
ACQUIRED = "beat: Acquired lock"
LOST = "beat: lost the lock"
LOCK = fault_settings.CELERY_REDBEAT_LOCK_TIMEOUT
#: Seconds Redis stays down at each kill: twice at once (the lock survives in the AOF), then
#: longer than the lock timeout (the lock has expired when Redis is back).
DOWN = [0.0, 0.0, LOCK + 1.0]


def runs(client: redis.Redis) -> dict[str, float]:
    """Each run of the entry in the run reports: task id -> its first start."""
    out: dict[str, float] = {}
    for doc in client.lrange(store.key("report", TASK, "history"), 0, -1):
        report: dict[str, Any] = json.loads(doc)
        out[report["id"]] = min(out.get(report["id"], report["started_at"]),
                                report["started_at"])
    return out


def holder(beats: list[CeleryProc]) -> list[str]:
    """The live beats holding the lock: the last lock line each wrote is an acquisition."""
    return [b.name for b in beats
            if b.proc.poll() is None and (text := b.text()).rfind(ACQUIRED) > text.rfind(LOST)]


def test_beat_and_worker_resume_after_redis_is_killed(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", appendfsync="always")
    server.start()
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    home = tmp_path / "home"
    procs = [beat(f"beat{i}", redis_url=server.url, home=home, schedule=SCHEDULE)
             for i in range(2)]
    beats = list(procs)
    procs.append(consumer := worker("worker", queue=QUEUE, redis_url=server.url, home=home))
    lines = []
    try:
        consumer.wait_line(" ready.")
        for b in beats:
            b.wait_line("beat: Starting...")
        wait_for(lambda: len(runs(client)) >= 3, timeout=60, interval=0.2,
                 what="three runs of the entry")
        t_start = min(runs(client).values())
        for n, down in enumerate(DOWN, start=1):
            before = holder(beats)
            kept = set(runs(client))
            server.kill()
            time.sleep(down)  # the outage's length: the fault, not a synchronization
            server.start()
            # appendfsync always: every acknowledged write survives (no report lost).
            assert kept <= set(runs(client))
            back = time.time()

            def since(back: float = back) -> list[float]:
                with_reconnect = runs(client)
                return sorted(t for t in with_reconnect.values() if t > back)

            after = wait_for(since, timeout=60, interval=0.1,
                             what=f"restart {n}: a run of the entry after Redis came back")
            wait_for(lambda: len(since()) >= 3, timeout=60, interval=0.2,
                     what=f"restart {n}: three runs after Redis came back")
            alive = [b.name for b in beats if b.proc.poll() is None]
            for b in beats:
                assert b.proc.poll() is None, f"{b.name} exited:\n{b.text()[-3000:]}"
            assert consumer.proc.poll() is None, f"the worker exited:\n{consumer.text()[-3000:]}"
            now = holder(beats)
            assert len(now) == 1, f"restart {n}: one live beat holds the lock, not {now}"
            lines.append(f"restart {n} (down {down:g} s): next run {after[0] - back:.2f} s"
                         f" after Redis was back, lock held by {before} before, {now} after,"
                         f" beats alive {alive}")
        got = runs(client)
        span = max(got.values()) - t_start
        # One publisher: no more runs than slots in the span (two would double them).
        assert len(got) <= span / PERIOD + 2, (len(got), span)
    finally:
        for p in procs:
            p.kill()
        client.close()
        server.stop()
    bound = fault_settings.CELERY_REDBEAT_LOCK_TIMEOUT \
        + fault_settings.CELERY_BEAT_MAX_LOOP_INTERVAL
    print(f"\nFIGURE beat redis kill -9 x{len(DOWN)} (AOF always, lock {bound - 1} s + loop 1 s): "
          + "; ".join(lines) + f"; {len(got)} runs over {span:.1f} s (period {PERIOD:g} s),"
          " worker alive")
