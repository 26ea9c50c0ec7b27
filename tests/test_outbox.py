"""The publish outbox's bookkeeping (:mod:`hms_tasks.outbox`), without Redis: which messages a
new master's replication info says were lost, and what a publish to a replaced master does.
The failover itself, on a real Sentinel stack: tests/test_sentinel.py."""

from __future__ import annotations

import json

import pytest

from hms_tasks.outbox import Master, MasterSuperseded, Outbox, with_new_tag

OLD, NEW, OTHER = "a" * 40, "b" * 40, "c" * 40


def _payload(n: int) -> str:
    return json.dumps({"body": str(n), "properties": {"delivery_tag": f"tag-{n}"}})


def _master(replid: str, offset: int, replid2: str = "0" * 40, second: int = -1) -> Master:
    return Master(replid=replid, offset=offset, replid2=replid2, second_offset=second)


def test_messages_past_the_promoted_replicas_copy_are_returned_once() -> None:
    box = Outbox()
    for n, offset in enumerate((100, 200, 300)):
        assert box.landed(_master(OLD, offset), [("q", _payload(n))], seconds=60) == []
    # The new master continued OLD up to offset 250: messages at 100 and 200 made it.
    again = box.landed(_master(NEW, 400, OLD, 251), [("q", _payload(3))], seconds=60)
    assert [e.payload for e in again] == [_payload(2)]
    assert box.landed(_master(NEW, 500), [("q", _payload(4))], seconds=60) == []
    assert box.stats["republished"] == 1


def test_a_new_master_that_does_not_continue_the_old_one_returns_all_of_it() -> None:
    box = Outbox()
    box.landed(_master(OLD, 100), [("q", _payload(0))], seconds=60)
    again = box.landed(_master(NEW, 5, OTHER, 3), [], seconds=60)
    assert [e.payload for e in again] == [_payload(0)]


def test_a_publish_to_the_replaced_master_past_its_cut_raises_a_connection_error() -> None:
    box = Outbox()
    box.landed(_master(OLD, 100), [("q", _payload(0))], seconds=60)
    box.landed(_master(NEW, 400, OLD, 151), [], seconds=60)
    # A connection still on the old master, in the window: lost, so kombu must retry it.
    with pytest.raises(MasterSuperseded):
        box.landed(_master(OLD, 160), [("q", _payload(1))], seconds=60)
    # Before the cut (replicated before the promotion), it is kept.
    assert box.landed(_master(OLD, 120), [("q", _payload(2))], seconds=60) == []


def test_a_failed_re_publish_is_returned_again() -> None:
    box = Outbox()
    box.landed(_master(OLD, 100), [("q", _payload(0))], seconds=60)
    again = box.landed(_master(NEW, 400, OLD, 1), [], seconds=60)
    box.unclaim(again)
    assert box.landed(_master(NEW, 401), [], seconds=60) == again


def test_old_messages_are_forgotten() -> None:
    box = Outbox()
    box.landed(_master(OLD, 100), [("q", _payload(0))], seconds=60)
    assert box.landed(_master(NEW, 400, OLD, 1), [], seconds=0) == []


def test_a_copy_has_a_new_delivery_tag_and_nothing_else_changed() -> None:
    copy = json.loads(with_new_tag(_payload(7)))
    original = json.loads(_payload(7))
    assert copy["properties"].pop("delivery_tag") != original["properties"].pop("delivery_tag")
    assert copy == original


def test_a_broker_user_without_info_still_publishes(redis_server: object) -> None:
    """An ACL user that may not run INFO: the push is made and the outbox keeps nothing
    (a warning says so) instead of the publish failing after its push (and being retried:
    a duplicate on every publish)."""
    import os
    import uuid

    import redis

    from hms_tasks import broker

    admin = redis.Redis.from_url(os.environ["REDIS_URL"])
    user, password = f"hms-test-noinfo-{uuid.uuid4().hex[:8]}", "noinfo-pw"
    admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["~*"],
                      channels=["*"], commands=["+@all", "-info"])
    key = f"hms-test-noinfo-{uuid.uuid4().hex}"
    try:
        limited = redis.Redis.from_url(os.environ["REDIS_URL"], username=user,
                                       password=password)
        assert broker._push(limited, [(key, "message")]) is None
        assert admin.lrange(key, 0, -1) == [b"message"]
    finally:
        admin.acl_deluser(user)
        admin.delete(key)
