"""From a model change to its cached values dead at commit, then gone: signals, commit, the
generation bump, the change log, a real worker running hms.cache.fanout_changes, real Redis
and the real database. "Cached" is what a read sees (a value whose generations are current);
"stored" is the key itself, which the worker unlinks."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import date
from typing import Any

import pytest
from django.db import transaction

from hms_tasks import reports
from hms_tasks.cache import changes, get_or_build, names
from hms_tasks.cache.core import backend
from hms_tasks.cache.registry import get_kind
from hms_tasks.demo.models import Appointment, Patient, Practitioner
from hms_tasks.demo.seed import seed
from tests.helpers import RedisServer, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def hospital() -> None:
    seed(patients=60, seed=5, today=date.today(), force=True)
    # Seeding recorded a whole-cache invalidation; let it land before the test warms.
    assert changes.flush()
    wait_for(lambda: changes.pending_entries() == 0, what="the seed's invalidation")


def cached(kind: str, id_: int) -> bool:
    be = backend()
    return bool(be.has_key(get_kind(kind).key(id_)))


def stored(kind: str, id_: int) -> bool:
    from hms_tasks.cache.registry import get_kind

    be = backend()
    return bool(be.client().exists(be.make_key(get_kind(kind).key(id_))))


def build(kind: str, id_: int) -> Any:
    """``get_or_build``, then wait for the miss's fill: it is stored by the process's filler
    thread just after the payload is returned. (A fill is refused, rightly, while a fan-out of
    an earlier commit bumps the generations: callers settle() their earlier commits first.)"""
    payload = get_or_build(kind, id_)
    wait_for(lambda: cached(kind, id_), what=f"{kind}:{id_} to be stored")
    return payload


def patients(n: int) -> list[int]:
    return list(Patient.objects.order_by("id").values_list("id", flat=True)[:n])


def settle() -> None:
    """This process's committed changes are in Redis, and some worker has applied them."""
    assert changes.flush()
    wait_for(lambda: changes.pending_entries() == 0, what="the change log to drain")


def test_save_commit_next_read_misses_then_keys_gone(worker: Any, hospital: None) -> None:
    a, b = patients(2)
    assert build("patient", a) is not None
    assert build("patient", b) is not None
    assert cached("patient", a)
    with transaction.atomic():
        p = Patient.objects.get(id=a)
        p.allergies = "penicillin"
        p.save()
    # Read after commit: dead as soon as the commit returned, without waiting for anything.
    assert not cached("patient", a)
    assert cached("patient", b)  # untouched
    wait_for(lambda: not stored("patient", a), what="the worker to unlink the patient's key")
    assert stored("patient", b)
    assert get_or_build("patient", a)["patient"]["allergies"] == "penicillin"
    report = wait_for(lambda: reports.latest(names.CACHE_FANOUT_CHANGES),
                      what="fanout's run report")
    assert report["outcome"] == "success"
    assert report["summary"]["unlinked"] >= 1


def test_rollback_dispatches_nothing(worker: Any, hospital: None) -> None:
    (a,) = patients(1)
    before = build("patient", a)

    def change_then_fail() -> None:
        with transaction.atomic():
            Patient.objects.get(id=a).save()
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        change_then_fail()
    assert changes.flush()
    assert changes.pending_entries() == 0
    assert cached("patient", a)
    assert get_or_build("patient", a) == before


def test_savepoint_rollback_is_honoured(worker: Any, hospital: None) -> None:
    a, b = patients(2)
    build("patient", a)
    build("patient", b)
    with transaction.atomic():
        Patient.objects.get(id=a).save()
        try:
            with transaction.atomic():
                Patient.objects.get(id=b).save()
                raise RuntimeError("inner rolled back")
        except RuntimeError:
            pass
    assert not cached("patient", a)
    assert cached("patient", b)
    settle()
    wait_for(lambda: not stored("patient", a), what="the committed change to land")
    assert stored("patient", b)


def test_bulk_update_invalidates_every_row_and_a_move_both_schedules(worker: Any,
                                                                     hospital: None) -> None:
    ids = patients(5)
    for i in ids:
        build("patient", i)
    Patient.objects.filter(id__in=ids[:3]).update(notes="")
    assert not any(cached("patient", i) for i in ids[:3])
    assert all(cached("patient", i) for i in ids[3:])
    wait_for(lambda: not any(stored("patient", i) for i in ids[:3]), what="bulk invalidation")

    first, second = Practitioner.objects.order_by("id").values_list("id", flat=True)[:2]
    build("schedule", first)
    build("schedule", second)
    appointment = Appointment.objects.filter(practitioner_id=first).order_by("id").first()
    assert appointment is not None
    Appointment.objects.filter(id=appointment.id).update(practitioner_id=second)
    assert not cached("schedule", first)
    assert not cached("schedule", second)


def test_moving_an_instance_invalidates_its_old_tags(worker: Any, hospital: None) -> None:
    first, second = Practitioner.objects.order_by("id").values_list("id", flat=True)[:2]
    build("schedule", first)
    build("schedule", second)
    appointment = Appointment.objects.filter(practitioner_id=first).order_by("id").first()
    assert appointment is not None
    appointment.practitioner_id = second
    appointment.save()
    assert not cached("schedule", first)
    assert not cached("schedule", second)


def test_only_hot_keys_are_rewarmed(worker: Any, hospital: None) -> None:
    hot, cold = patients(2)
    for _ in range(4):
        build("patient", hot)  # heat 4 >= HMS_TASKS_CACHE_HOT_SCORE (3)
    build("patient", cold)
    with transaction.atomic():
        for pid in (hot, cold):
            p = Patient.objects.get(id=pid)
            p.allergies = "latex"
            p.save()
    assert not cached("patient", cold)
    wait_for(lambda: not stored("patient", cold), what="the cold key to go")
    report = wait_for(lambda: (r := reports.latest(names.CACHE_FANOUT_CHANGES)) and
                      r["summary"]["rewarmed"] >= 1 and r, what="refresh-ahead")
    assert report["summary"]["hot"] == 1
    assert cached("patient", hot)  # re-warmed right away, with the new data
    assert backend().get(get_kind("patient").key(hot))["patient"]["allergies"] == "latex"
    assert not cached("patient", cold)


def save_allergies(ids: list[int], value: str) -> None:
    for i in ids:
        with transaction.atomic():
            p = Patient.objects.get(id=i)
            p.allergies = value
            p.save()


def allergies(id_: int) -> str:
    payload = get_or_build("patient", id_)
    assert payload is not None
    return str(payload["patient"]["allergies"])


def test_redis_down_commits_succeed_buffered_then_land(worker: Any, hospital: None,
                                                       redis_server: RedisServer) -> None:
    ids = patients(4)
    for i in ids:
        build("patient", i)
    redis_server.stop()
    try:
        # The HMS keeps writing while Redis (broker and cache) is down: no write fails, and
        # the changes are held (nothing can land).
        save_allergies(ids[:3], "peanuts")
        assert not changes.flush(0.5)
    finally:
        redis_server.start()
    # The data survived the restart (AOF): the old values are there, dead only once the
    # buffered changes land.
    assert changes.flush(30)
    assert not any(cached("patient", i) for i in ids[:3])
    assert cached("patient", ids[3])
    # Nothing reads them meanwhile, so the worker's fan-out unlinks all three dead entries.
    # (Reading first raced it: a fill landing before the fan-out is unlinked with the dead
    # entries, one landing after stays, and neither "all gone" nor "all fresh" held.)
    wait_for(lambda: not any(stored("patient", i) for i in ids[:3]), timeout=30,
             what="the worker to apply the buffered changes")
    assert stored("patient", ids[3])
    assert all(allergies(i) == "peanuts" for i in ids[:3])


def test_hung_redis_never_holds_a_commit_and_the_change_lands_after(
        worker: Any, hospital: None, redis_server: RedisServer) -> None:
    ids = patients(3)
    for i in ids:
        build("patient", i)
    redis_server.pause()  # SIGSTOP: connections stay open, nothing is answered
    try:
        writer = threading.Thread(target=save_allergies, args=(ids[:2], "latex"))
        writer.start()
        # Generous (the call gives up after COMMIT_TIMEOUT): what is checked is that the
        # commits return while Redis still answers nothing.
        writer.join(10)
        assert not writer.is_alive(), "a commit waited for the hung Redis"
        assert not changes.flush(0.2)
    finally:
        redis_server.resume()
    assert changes.flush(30)
    assert not any(cached("patient", i) for i in ids[:2])
    assert cached("patient", ids[2])
    assert allergies(ids[0]) == "latex"


def test_commit_after_redis_lost_its_scripts_still_invalidates(worker: Any,
                                                               hospital: None) -> None:
    ids = patients(2)
    save_allergies(ids[:1], "dust")  # the recording script is loaded by now
    settle()
    for i in ids:
        build("patient", i)
    backend().client().script_flush()  # as after a Redis restart without persistence
    save_allergies(ids[:1], "latex")
    assert not cached("patient", ids[0])
    assert cached("patient", ids[1])
    assert allergies(ids[0]) == "latex"


# -- read after commit, seen from another process ---------------------------------------------

_READER = r"""
import sys
import django
django.setup()
from django.core.cache import caches
from hms_tasks.cache import settings as cache_settings
from hms_tasks.cache.registry import get_kind
cache = caches[cache_settings.get().cache_alias]
print("ready", flush=True)
for line in sys.stdin:
    value = cache.get(get_kind("patient").key(int(line)))
    print("miss" if value is None else value["patient"]["allergies"], flush=True)
"""


@pytest.fixture
def reader() -> Iterator[subprocess.Popen[str]]:
    """A process of its own that reads a patient's summary through the cache on request."""
    proc = subprocess.Popen([sys.executable, "-c", _READER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    proc.kill()
    proc.wait()


def stale_reads(reader: subprocess.Popen[str], pid: int, rounds: int) -> int:
    """Rounds in which the reader, asked only after the commit returned, got the summary
    cached before the commit."""
    assert reader.stdin is not None
    assert reader.stdout is not None
    stale = 0
    for n in range(rounds):
        before = allergies(pid)
        # A miss stores its payload on the process's filler thread, just after it returned.
        wait_for(lambda: cached("patient", pid), what="the summary to be stored")
        save_allergies([pid], f"v{n}")
        reader.stdin.write(f"{pid}\n")
        reader.stdin.flush()
        seen = reader.stdout.readline().strip()
        assert seen in ("miss", f"v{n}", before)
        stale += seen == before
        settle()
    return stale


def test_a_reader_in_another_process_never_sees_the_pre_commit_payload(
        worker: Any, hospital: None, reader: subprocess.Popen[str]) -> None:
    (pid,) = patients(1)
    assert stale_reads(reader, pid, 20) == 0


def test_invalidating_only_in_the_task_fails_that_check(
        worker: Any, hospital: None, reader: subprocess.Popen[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The naive write path: commit appends to the change log and the worker's task does all
    # the invalidation, a few milliseconds later. The check above must catch it.
    be = backend()
    append = be.client().register_script(
        "redis.call('RPUSH', KEYS[1], ARGV[1]) "
        "if redis.call('SET', KEYS[2], '1', 'NX', 'EX', 30) then return 1 end return 0")

    def naive(tags: Any, *, timeout: float | None = None) -> bool:
        import json

        return bool(append(keys=list(changes._keys()), args=[json.dumps(sorted(tags))]) == 1)

    monkeypatch.setattr(changes, "record_changes", naive)
    monkeypatch.setattr(changes, "_record_at_commit", naive)
    (pid,) = patients(1)
    assert stale_reads(reader, pid, 20) > 0
