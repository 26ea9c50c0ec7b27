"""The one Redis plumbing: keys under one prefix, an owner-checked single-flight lock."""

from __future__ import annotations

from hms_tasks import store
from tests.helpers import wait_for


def test_key_uses_the_one_prefix() -> None:
    assert store.key("report", "x") == "hms:report:x"


def test_single_flight_admits_one_holder() -> None:
    with store.single_flight("t", ttl=10) as first, store.single_flight("t", ttl=10) as second:
        assert first is True
        assert second is False
    with store.single_flight("t", ttl=10) as again:
        assert again is True


def test_an_expired_holder_does_not_free_the_next_holders_lock() -> None:
    # The naive release (an unconditional DEL) frees the lock of whoever holds it now.
    with store.single_flight("slow", ttl=0.2) as slow:
        assert slow
        wait_for(lambda: not store.client().exists(store.key("lock", "slow")), timeout=5)
        taken = store.lock("slow", ttl=10)
        assert taken.acquire(blocking=False)
    # The slow run's block ended after its lock expired: the new holder still holds it.
    assert store.client().exists(store.key("lock", "slow"))
    assert taken.owned()
    taken.release()
