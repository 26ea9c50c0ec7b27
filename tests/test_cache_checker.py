"""A randomized concurrent checker of the cache's one promise: after the writes stop and the
change log is applied, every cached key is absent or equal to what the database says.

Writer threads update patients (the real signal -> commit -> change log -> worker path);
filler threads read through the cache, with random delays injected between a fill's database
read and its write (some of them last until an invalidation of the row has landed). The same
checker runs against a deliberately naive fill (a plain SET after the build) and must catch it:
that is how we know it has teeth.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import date
from typing import Any

import pytest
from django.db import close_old_connections, connection, transaction

from hms_tasks.cache import changes, registry
from hms_tasks.cache.core import backend, get_or_build
from hms_tasks.demo.cache import build_patients
from hms_tasks.demo.models import Patient
from hms_tasks.demo.seed import seed
from tests.helpers import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

SEEDS = range(8)
OPS_PER_SEED = 400
HOT_IDS = 6  # few rows, many collisions
WRITERS = 3
FILLERS = 3


LANDED = -1.0  # a pause that lasts until an invalidation of the row has landed


class Delays:
    """Random pauses between a fill's database read and its write (the race window)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.lock = threading.Lock()

    def pause(self, invalidated: Callable[[], bool]) -> None:
        with self.lock:
            delay = self.rng.choice((0.0, 0.0, 0.002, 0.01, 0.05, 0.12, LANDED, LANDED))
        if delay != LANDED:
            time.sleep(delay)
            return
        # A fill that stores after an invalidation of its row landed is the one that leaves a
        # stale value behind for good. Timed sleeps catch that only when they outlast the
        # invalidation's latency, which a loaded CI machine stretches; so half the pauses wait
        # for the landing itself (up to a bound: the row may not be written again).
        deadline = time.monotonic() + 0.5
        while not invalidated() and time.monotonic() < deadline:
            time.sleep(0.002)


@pytest.fixture
def checked_kind() -> Iterator[Delays]:
    delays = Delays(random.Random(0))

    def build_many(ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        tags = [f"patient:{i}" for i in ids]
        before = backend().generations(tags)
        built = build_patients(ids)
        # The database was read; the fill comes later.
        delays.pause(lambda: backend().generations(tags) != before)
        return built

    registry.register_kind("chk", build_many=build_many, tags=lambda i: [f"patient:{i}"])
    yield delays
    registry.unregister_kind("chk")


def correct_fill(pid: int) -> None:
    get_or_build("chk", pid)


def naive_fill(pid: int) -> None:
    # A read-through cache without leases or generations: on a miss, read the database,
    # (pause), then store unconditionally. The classic fill/invalidate race.
    if backend().get(f"chk:{pid}") is not None:
        return
    payload = registry.get_kind("chk").build_many([pid]).get(pid)
    if payload is not None:
        backend().set(f"chk:{pid}", payload, 600, tags=[f"patient:{pid}"])


def run_seed(seed_value: int, ids: list[int], fill: Callable[[int], None],
             delays: Delays) -> list[int]:
    """Run one randomized round; return the ids whose cached value is stale afterwards."""
    rng = random.Random(seed_value)
    delays.rng.seed(seed_value * 7919)
    plan = [(rng.random() < 0.4, rng.choice(ids), rng.randrange(10**6))
            for _ in range(OPS_PER_SEED)]
    writes = [(pid, v) for is_write, pid, v in plan if is_write]
    reads = [pid for is_write, pid, _ in plan if not is_write]
    errors: list[BaseException] = []

    writing = threading.Event()
    writing.set()

    def worker_thread(items: list[Any], act: Callable[[Any], None], *,
                      until_writes_end: bool = False) -> None:
        try:
            for item in items:
                act(item)
            # Fillers keep reading (their plan again) while writes go on: the last write of a
            # row must find fills in flight, or the round cannot end with a race at all.
            while until_writes_end and writing.is_set():
                for item in items:
                    act(item)
                    if not writing.is_set():
                        break
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            close_old_connections()
            connection.close()

    pace = random.Random(seed_value + 1)
    pace_lock = threading.Lock()

    def write(item: tuple[int, int]) -> None:
        pid, value = item
        # Think time, so writes spread over the whole round instead of finishing before the
        # slow fills: the last write of a row must be able to race a fill.
        with pace_lock:
            think = pace.uniform(0, 0.06)
        time.sleep(think)
        with transaction.atomic():
            p = Patient.objects.get(id=pid)
            p.allergies = f"a{value}"
            p.save()

    writers = [threading.Thread(target=worker_thread, args=(writes[i::WRITERS], write))
               for i in range(WRITERS)]
    fillers = [threading.Thread(target=worker_thread, args=(reads[i::FILLERS], fill),
                                kwargs={"until_writes_end": True}) for i in range(FILLERS)]
    for t in writers + fillers:
        t.start()
    for t in writers:
        t.join(120)
    writing.clear()
    for t in fillers:
        t.join(120)
    assert not errors, errors
    # Quiescence: every committed change recorded, applied, and no fan-out still running.
    assert changes.flush()
    wait_for(lambda: changes.pending_entries() == 0 and not backend().client().exists(
        backend().internal_key("fanout-pending")), timeout=30, what="the change log to settle")
    truth = build_patients(ids)
    return [pid for pid in ids
            if (cached := backend().get(f"chk:{pid}")) is not None and cached != truth[pid]]


@pytest.fixture
def ids() -> list[int]:
    seed(patients=20, seed=3, today=date.today(), force=True)
    assert changes.flush()
    return list(Patient.objects.order_by("id").values_list("id", flat=True)[:HOT_IDS])


def test_no_stale_value_survives_quiescence(worker: Any, checked_kind: Delays,
                                            ids: list[int]) -> None:
    for s in SEEDS:
        stale = run_seed(s, ids, correct_fill, checked_kind)
        assert stale == [], f"seed {s}: stale keys for patients {stale}"
        backend().invalidate_tags([f"patient:{i}" for i in ids])  # next round starts cold


def test_checker_catches_a_naive_fill(worker: Any, checked_kind: Delays, ids: list[int]
                                      ) -> None:
    # Catching the race takes a fill that stores after the invalidation landed and no later
    # write to that row: the pauses that wait for the landing make that the first seed as a
    # rule, on a loaded machine too. The loop stops at the first catch, so the extra seeds
    # cost nothing unless the checker is blind.
    caught = []
    for s in range(30):
        caught += run_seed(s, ids, naive_fill, checked_kind)
        backend().invalidate_tags([f"patient:{i}" for i in ids])
        if caught:
            break
    assert caught, "the checker did not catch the naive fill: it has no teeth"
