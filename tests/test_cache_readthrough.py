"""get_or_build: single flight under concurrent misses, and bad input."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
from django.test import override_settings

from hms_tasks.cache import registry
from hms_tasks.cache.core import backend, get_or_build
from hms_tasks.cache.stats import cache_stats
from hms_tasks.errors import InvalidArguments
from tests.helpers import wait_for


class SlowBuilder:
    """Builds ``{"id": i}`` once released; counts how often it was asked."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, ids: Sequence[int]) -> Mapping[int, dict[str, Any]]:
        with self.lock:
            self.calls += 1
        assert self.release.wait(30), "the test never released the builder"
        return {i: {"id": i, "updated_at": "2026-01-01T00:00:00+00:00"} for i in ids if i < 1000}


@pytest.fixture
def slow() -> Iterator[SlowBuilder]:
    builder = SlowBuilder()
    registry.register_kind("slowkind", build_many=builder, tags=lambda i: [f"slowkind:{i}"])
    yield builder
    builder.release.set()
    registry.unregister_kind("slowkind")


def _misses(kind: str) -> int:
    return int(cache_stats(window_minutes=2)["kinds"].get(kind, {}).get("misses", 0))


def test_concurrent_misses_build_once(slow: SlowBuilder) -> None:
    n = 8
    results: list[Any] = []
    with override_settings(HMS_TASKS_CACHE_WAIT_MS=10_000):
        threads = [threading.Thread(target=lambda: results.append(get_or_build("slowkind", 7)))
                   for _ in range(n)]
        for t in threads:
            t.start()
        # Every reader has missed (one holds the lease and builds, the rest wait on it).
        wait_for(lambda: _misses("slowkind") == n, what="all readers to miss")
        assert slow.calls == 1
        slow.release.set()
        for t in threads:
            t.join(30)
    assert results == [{"id": 7, "updated_at": "2026-01-01T00:00:00+00:00"}] * n
    assert slow.calls == 1
    # And it is now a hit for everyone.
    assert get_or_build("slowkind", 7) == results[0]
    assert slow.calls == 1
    stats = cache_stats(window_minutes=2)["kinds"]["slowkind"]
    assert stats["hits"] == 1
    assert stats["misses"] == n


def test_waiters_fall_through_to_the_database_when_the_builder_is_slow(slow: SlowBuilder
                                                                        ) -> None:
    holder = threading.Thread(target=lambda: get_or_build("slowkind", 8))
    holder.start()
    wait_for(lambda: slow.calls == 1, what="the lease holder to start building")
    with override_settings(HMS_TASKS_CACHE_WAIT_MS=0):
        other = threading.Thread(target=lambda: get_or_build("slowkind", 8))
        other.start()
        wait_for(lambda: slow.calls == 2, what="the second reader to build itself")
    slow.release.set()
    holder.join(30)
    other.join(30)
    # The lease holder's fill lands (on its process's filler thread).
    assert wait_for(lambda: backend().get("slowkind:8"), what="the fill") == {
        "id": 8, "updated_at": "2026-01-01T00:00:00+00:00"}


def test_a_forked_process_fills_its_misses(slow: SlowBuilder) -> None:
    # The prefork pool forks worker processes from a parent that may have read through the
    # cache already: the child's misses must still be stored (threads do not survive a fork).
    slow.release.set()
    get_or_build("slowkind", 20)
    wait_for(lambda: backend().get("slowkind:20"), what="the parent's fill")
    child = os.fork()
    if child == 0:  # pragma: no cover (the child reports through its exit code)
        code = 1
        try:
            get_or_build("slowkind", 21)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if backend().get("slowkind:21") is not None:
                    code = 0
                    break
                time.sleep(0.01)
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_missing_row_is_not_cached(slow: SlowBuilder) -> None:
    slow.release.set()
    assert get_or_build("slowkind", 5000) is None
    assert get_or_build("slowkind", 5000) is None
    assert slow.calls == 2
    assert not backend().client().exists(backend().internal_key(
        "lease", backend().make_key("slowkind:5000")))


@pytest.mark.parametrize(
    ("kind", "id_", "message"),
    [
        ("nosuchkind", 1, "kind: unknown kind (allowed:"),
        ("slowkind", "1", "id: every id must be a positive integer"),
        ("slowkind", 0, "id: every id must be a positive integer"),
        ("slowkind", True, "id: every id must be a positive integer"),
    ],
)
def test_bad_input_names_the_argument(slow: SlowBuilder, kind: str, id_: Any, message: str
                                      ) -> None:
    with pytest.raises(InvalidArguments) as info:
        get_or_build(kind, id_)
    assert message in str(info.value)
    assert slow.calls == 0


def test_a_thread_reads_its_own_fill(slow: SlowBuilder) -> None:
    # A miss's fill goes out without waiting; the thread's next read goes over the same
    # connection, after it: never a second miss (and build) of what this thread just filled.
    slow.release.set()
    for i in range(30, 40):
        payload = get_or_build("slowkind", i)
        assert get_or_build("slowkind", i) == payload
    assert slow.calls == 10
    assert _misses("slowkind") == 10


def test_reads_after_a_script_flush_with_a_fill_owed(slow: SlowBuilder) -> None:
    # Redis lost its scripts (a restart) while a fill's reply was owed: the next read loads
    # its script again, and the fill was stored.
    slow.release.set()
    get_or_build("slowkind", 41)
    backend().client().script_flush()
    assert get_or_build("slowkind", 42) == {"id": 42, "updated_at": "2026-01-01T00:00:00+00:00"}
    for i in (41, 42):
        wait_for(lambda i=i: backend().get(f"slowkind:{i}"), what=f"the fill of {i}")


def test_reads_after_the_connection_broke_with_a_fill_owed(slow: SlowBuilder) -> None:
    # The connection a fill went out on was closed by the server before its reply was read:
    # the next read goes through the pool (a new connection) and fills as usual.
    slow.release.set()
    get_or_build("slowkind", 51)
    backend().client().client_kill_filter(_type="normal", skipme=True)
    assert get_or_build("slowkind", 52) == {"id": 52, "updated_at": "2026-01-01T00:00:00+00:00"}
    wait_for(lambda: backend().get("slowkind:52"), what="the fill of 52")
    assert get_or_build("slowkind", 52) == {"id": 52, "updated_at": "2026-01-01T00:00:00+00:00"}
