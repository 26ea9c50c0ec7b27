"""The one Redis plumbing: keys under one prefix, an owner-checked single-flight lock, the
per-thread kept connection."""

from __future__ import annotations

import os
import threading

import pytest
import redis

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


def test_a_held_connection_is_kept_per_thread_and_never_shared_with_a_child() -> None:
    pool = store.client().connection_pool
    held = store.HeldConnection(lambda: pool)
    mine = held.call("CLIENT", "ID")
    assert held.call("CLIENT", "ID") == mine  # kept between calls
    other: list[int] = []
    thread = threading.Thread(target=lambda: other.append(held.call("CLIENT", "ID")))
    thread.start()
    thread.join(10)
    assert len(other) == 1
    assert other[0] != mine  # each thread its own
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child reports through the pipe)
        try:
            os.write(write, str(held.call("CLIENT", "ID")).encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with os.fdopen(read) as got:
        assert int(got.read()) != mine  # the child connected anew
    assert held.call("CLIENT", "ID") == mine  # and the parent's is in step
    # An error reply keeps the connection; a broken one is replaced.
    with pytest.raises(redis.ResponseError):
        held.call("NOSUCHCOMMAND")
    assert held.call("CLIENT", "ID") == mine
    store.client().client_kill_filter(_id=mine)
    with pytest.raises(redis.ConnectionError):
        held.call("CLIENT", "ID")
    assert held.call("CLIENT", "ID") != mine
