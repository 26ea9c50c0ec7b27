"""One active beat: two and three real ``celery beat`` processes on a one-second test schedule
(tests/faults/beat_schedule_fast.py) publish each slot once, over 20 periods; when the lock's
holder is SIGKILLed, a standby takes over and the slots go on, still once each.

Nothing consumes the queue: the published messages are the record. Each carries its
``expires`` instant, which is its send time plus the entry's ``expires`` (1.5 periods), so
two beats publishing the same slot show up as two sends a few milliseconds apart.
Figures: slots published and the shortest gap between two; the takeover time (kill to the
next slot), against the bound BEAT lock timeout + one loop interval (8 s + 1 s here).
"""

from __future__ import annotations

import itertools
import json
import time
from datetime import datetime
from pathlib import Path

import pytest

from hms_tasks import names, store
from tests.faults import beat_schedule_fast, fault_settings
from tests.faults.procs import CeleryProc, beat
from tests.helpers import RedisServer, wait_for

pytestmark = pytest.mark.faults

SCHEDULE = "tests.faults.beat_schedule_fast"
QUEUE = names.queue_for("hms.test.echo")
PERIOD = beat_schedule_fast.PERIOD
EXPIRES = 1.5 * PERIOD
PERIODS = 20
ACQUIRED = "beat: Acquired lock"


def sends() -> list[float]:
    """Send instants of the queued slot messages, oldest first."""
    out = []
    for raw in store.client().lrange(QUEUE, 0, -1):
        headers = json.loads(raw)["headers"]
        assert headers["task"] == "hms.test.echo"
        out.append(datetime.fromisoformat(headers["expires"]).timestamp() - EXPIRES)
    return sorted(out)


def shortest_gap(times: list[float]) -> float:
    return min(b - a for a, b in itertools.pairwise(times))


def holders(beats: list[CeleryProc]) -> list[CeleryProc]:
    return [b for b in beats if ACQUIRED in b.text()]


@pytest.mark.parametrize("count", [2, 3])
def test_beats_publish_each_slot_once_and_take_over(
        count: int, redis_server: RedisServer, tmp_path: Path) -> None:
    beats = [beat(f"beat{i}", redis_url=redis_server.url, home=tmp_path, schedule=SCHEDULE)
             for i in range(count)]
    try:
        for b in beats:
            b.wait_line("beat: Starting...")
        wait_for(lambda: len(sends()) >= PERIODS, timeout=120, interval=0.2,
                 what=f"{PERIODS} slots")
        times = sends()
        span = times[-1] - times[0]
        # Each slot once: no two sends closer than half a period, and no more sends than
        # periods in the span (two active beats would send twice as many, milliseconds apart).
        assert shortest_gap(times) > 0.5 * PERIOD, times
        assert len(times) <= span / PERIOD + 2
        first = holders(beats)
        assert len(first) == 1, "exactly one beat holds the lock"

        killed_at = time.time()
        first[0].kill()
        standby = [b for b in beats if b is not first[0]]
        after = wait_for(lambda: [t for t in sends() if t > killed_at], timeout=60,
                         interval=0.05, what="a slot from the beat that took over")
        takeover = after[0] - killed_at
        new = holders(standby)
        assert len(new) == 1, "exactly one standby took the lock"
        wait_for(lambda: len([t for t in sends() if t > killed_at]) >= 5, timeout=60,
                 interval=0.2, what="five more slots")
        times = sends()
        assert shortest_gap(times) > 0.5 * PERIOD, times
        bound = fault_settings.CELERY_REDBEAT_LOCK_TIMEOUT \
            + fault_settings.CELERY_BEAT_MAX_LOOP_INTERVAL
        print(f"\nFIGURE beats={count}: {len(times)} slots over {times[-1] - times[0]:.1f} s,"
              f" shortest gap {shortest_gap(times):.3f} s (period {PERIOD:g} s);"
              f" takeover after SIGKILL of the holder {takeover:.2f} s (bound {bound} s)")
    finally:
        for b in beats:
            b.kill()
