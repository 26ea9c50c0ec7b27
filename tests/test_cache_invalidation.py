"""From a model change to its cached values gone: signals, commit, the change log, a real
worker running hms.cache.fanout_changes, real Redis and the real database."""

from __future__ import annotations

import time
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


def patients(n: int) -> list[int]:
    return list(Patient.objects.order_by("id").values_list("id", flat=True)[:n])


def settle() -> None:
    """This process's committed changes are in Redis, and some worker has applied them."""
    assert changes.flush()
    wait_for(lambda: changes.pending_entries() == 0, what="the change log to drain")


def test_save_commit_task_keys_gone(worker: Any, hospital: None) -> None:
    a, b = patients(2)
    assert get_or_build("patient", a) is not None
    assert get_or_build("patient", b) is not None
    assert cached("patient", a)
    with transaction.atomic():
        p = Patient.objects.get(id=a)
        p.allergies = "penicillin"
        p.save()
    wait_for(lambda: not cached("patient", a), what="the patient's key to go")
    assert cached("patient", b)  # untouched
    assert get_or_build("patient", a)["patient"]["allergies"] == "penicillin"
    report = wait_for(lambda: reports.latest(names.CACHE_FANOUT_CHANGES),
                      what="fanout's run report")
    assert report["outcome"] == "success"
    assert report["summary"]["unlinked"] >= 1


def test_rollback_dispatches_nothing(worker: Any, hospital: None) -> None:
    (a,) = patients(1)
    get_or_build("patient", a)
    before = changes.recorder().stats["recorded"]
    def change_then_fail() -> None:
        with transaction.atomic():
            Patient.objects.get(id=a).save()
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        change_then_fail()
    assert changes.flush()
    assert changes.recorder().stats["recorded"] == before
    assert changes.pending_entries() == 0
    assert cached("patient", a)


def test_savepoint_rollback_is_honoured(worker: Any, hospital: None) -> None:
    a, b = patients(2)
    get_or_build("patient", a)
    get_or_build("patient", b)
    with transaction.atomic():
        Patient.objects.get(id=a).save()
        try:
            with transaction.atomic():
                Patient.objects.get(id=b).save()
                raise RuntimeError("inner rolled back")
        except RuntimeError:
            pass
    settle()
    wait_for(lambda: not cached("patient", a), what="the committed change to land")
    assert cached("patient", b)


def test_bulk_update_invalidates_every_row_and_a_move_both_schedules(worker: Any,
                                                                     hospital: None) -> None:
    ids = patients(5)
    for i in ids:
        get_or_build("patient", i)
    Patient.objects.filter(id__in=ids[:3]).update(notes="")
    wait_for(lambda: not any(cached("patient", i) for i in ids[:3]), what="bulk invalidation")
    assert all(cached("patient", i) for i in ids[3:])

    first, second = Practitioner.objects.order_by("id").values_list("id", flat=True)[:2]
    get_or_build("schedule", first)
    get_or_build("schedule", second)
    appointment = Appointment.objects.filter(practitioner_id=first).order_by("id").first()
    assert appointment is not None
    Appointment.objects.filter(id=appointment.id).update(practitioner_id=second)
    wait_for(lambda: not cached("schedule", first) and not cached("schedule", second),
             what="both practitioners' schedules to go")


def test_moving_an_instance_invalidates_its_old_tags(worker: Any, hospital: None) -> None:
    first, second = Practitioner.objects.order_by("id").values_list("id", flat=True)[:2]
    get_or_build("schedule", first)
    get_or_build("schedule", second)
    appointment = Appointment.objects.filter(practitioner_id=first).order_by("id").first()
    assert appointment is not None
    appointment.practitioner_id = second
    appointment.save()
    wait_for(lambda: not cached("schedule", first) and not cached("schedule", second),
             what="old and new schedules to go")


def test_only_hot_keys_are_rewarmed(worker: Any, hospital: None) -> None:
    hot, cold = patients(2)
    for _ in range(4):
        get_or_build("patient", hot)  # heat 4 >= HMS_TASKS_CACHE_HOT_SCORE (3)
    get_or_build("patient", cold)
    with transaction.atomic():
        for pid in (hot, cold):
            p = Patient.objects.get(id=pid)
            p.allergies = "latex"
            p.save()
    wait_for(lambda: not cached("patient", cold), what="the cold key to go")
    report = wait_for(lambda: (r := reports.latest(names.CACHE_FANOUT_CHANGES)) and
                      r["summary"]["rewarmed"] >= 1 and r, what="refresh-ahead")
    assert report["summary"]["hot"] == 1
    assert cached("patient", hot)  # re-warmed right away, with the new data
    assert backend().get(get_kind("patient").key(hot))["patient"]["allergies"] == "latex"
    assert not cached("patient", cold)


def test_outage_during_commits_loses_no_invalidation(worker: Any, hospital: None,
                                                     redis_server: RedisServer) -> None:
    ids = patients(4)
    for i in ids:
        get_or_build("patient", i)
    failures = changes.recorder().stats["failures"]
    redis_server.stop()
    try:
        # The HMS keeps writing while Redis (broker and cache) is down: no write fails.
        for i in ids[:3]:
            with transaction.atomic():
                p = Patient.objects.get(id=i)
                p.allergies = "peanuts"
                p.save()
        wait_for(lambda: changes.recorder().stats["failures"] > failures,
                 what="the recorder to notice the outage")
        assert not changes.recorder().idle()  # still holding the changes
    finally:
        redis_server.start()
    # The data survived the restart (AOF), so the stale keys are still there until the
    # buffered changes land.
    assert cached("patient", ids[3])
    wait_for(lambda: not any(cached("patient", i) for i in ids[:3]), timeout=60,
             what="the buffered invalidations to land after the outage")
    assert cached("patient", ids[3])
    assert all(get_or_build("patient", i)["patient"]["allergies"] == "peanuts"
               for i in ids[:3])


def save_allergies(ids: list[int], value: str) -> None:
    for i in ids:
        with transaction.atomic():
            p = Patient.objects.get(id=i)
            p.allergies = value
            p.save()


def test_commits_are_written_by_the_committing_thread(worker: Any, hospital: None) -> None:
    first, *ids = patients(21)
    save_allergies([first], "dust")  # opens the recorder's own connection if it had none
    settle()
    for i in ids:
        get_or_build("patient", i)
    before = dict(changes.recorder().stats)
    save_allergies(ids, "pollen")
    settle()
    after = changes.recorder().stats
    # Written on the direct connection (at most one command per commit), none by the
    # flusher's slower round trips.
    assert 1 <= after["sent"] - before["sent"] <= len(ids)
    assert after["flushed_entries"] == before["flushed_entries"]
    wait_for(lambda: not any(cached("patient", i) for i in ids), what="the keys to go")


def test_commands_refused_or_unanswered_are_sent_again(worker: Any, hospital: None,
                                                        redis_server: RedisServer) -> None:
    ids = patients(6)
    save_allergies(ids[:1], "dust")
    settle()
    for i in ids:
        get_or_build("patient", i)
    failures = changes.recorder().stats["failures"]
    # Refused: the script cache emptied under an open connection (NOSCRIPT replies).
    backend().client().script_flush()
    save_allergies(ids[:3], "latex")
    wait_for(lambda: not any(cached("patient", i) for i in ids[:3]), timeout=30,
             what="the refused commands' invalidations to land")
    assert changes.recorder().stats["failures"] > failures
    # Unanswered: Redis hangs with commands in flight; after REPLY_TIMEOUT their tags go
    # back to the flusher, which lands them once Redis answers again.
    failures = changes.recorder().stats["failures"]
    redis_server.pause()
    try:
        save_allergies(ids[3:5], "latex")
        wait_for(lambda: changes.recorder().stats["failures"] > failures, timeout=30,
                 what="the recorder to give up on the unanswered commands")
    finally:
        redis_server.resume()
    wait_for(lambda: not any(cached("patient", i) for i in ids[3:5]), timeout=60,
             what="the unanswered commands' invalidations to land")
    assert cached("patient", ids[5])


def test_a_lone_change_after_a_stream_is_acknowledged_without_a_flush(worker: Any,
                                                                     hospital: None) -> None:
    rec = changes.recorder()
    rec.add(frozenset({"patient:1"}))
    assert changes.flush()
    direct = rec._direct
    assert direct is not None  # the recorder's own connection is open
    # A change written on that connection just after another (not after a quiet spell), then
    # nothing more: its reply must still be read, by the flusher, without anyone asking.
    with rec._cond:
        direct.last_send = time.monotonic() - changes.LINGER
    sent = rec.stats["sent"]
    rec.add(frozenset({"patient:2"}))
    assert rec.stats["sent"] == sent + 1
    wait_for(rec.idle, timeout=5, what="the flusher to read the last reply")
