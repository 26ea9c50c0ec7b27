"""A call whose arguments do not fit is rejected, not failed: one WARNING line without a
traceback, INVALID in monitors, the problems for a client waiting on the result. With a real
in-process worker that sends task events, the Redis result backend and an event receiver."""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import states
from celery.events.state import State
from click.testing import CliRunner

from hms_tasks import names, reports
from hms_tasks.cli import cli
from hms_tasks.errors import InvalidArguments
from hms_tasks.memory import names as memory_names
from tests import tasks_for_tests  # noqa: F401  (registers hms.test.*)
from tests.helpers import wait_for


@pytest.fixture(scope="module")
def events_worker(redis_server: Any, celery_app: Any) -> Iterator[Any]:
    """The conftest worker, with task events on (as under ``make run``, for Flower)."""
    from celery.contrib.testing.worker import start_worker

    with start_worker(celery_app, pool="solo", perform_ping_check=False,
                      queues=list(names.ALL_QUEUES), shutdown_timeout=30, loglevel="WARNING",
                      task_events=True) as w:
        yield w


class Monitor:
    """What Flower sees: every event, folded into Celery's event state as Flower does."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state = State()
        self.events: list[dict[str, Any]] = []
        self.probe = f"probe-{uuid.uuid4().hex}"
        self._conn = app.connection_for_read()
        self._receiver = app.events.Receiver(self._conn, handlers={"*": self._on_event})
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _on_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.state.event(event)

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # the connection closed at stop()
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def start(self) -> None:
        self._thread.start()
        # Events are fan-out (Redis PUBLISH): wait until the receiver hears one of ours.
        with self.app.events.default_dispatcher() as dispatcher:
            def heard() -> bool:
                dispatcher.send("test-probe", probe=self.probe)
                return any(e.get("probe") == self.probe for e in self.events)

            wait_for(heard, what="the event receiver to subscribe")

    def stop(self) -> None:
        self._receiver.should_stop = True
        self._conn.release()

    def of(self, task_id: str) -> list[str]:
        return [e["type"] for e in self.events if e.get("uuid") == task_id]


@pytest.fixture
def monitor(events_worker: Any, celery_app: Any) -> Iterator[Monitor]:
    m = Monitor(celery_app)
    m.start()
    yield m
    m.stop()


def test_rejection_is_a_warning_and_invalid_in_monitors(
        monitor: Monitor, celery_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    secret = "Jane Doe 1961-04-02"
    caplog.set_level(logging.INFO)
    result = celery_app.send_task("hms.test.echo", kwargs={"count": secret, "bogus": 1})

    # A client waiting on the result gets the problems (no traceback was stored).
    with pytest.raises(InvalidArguments) as info:
        result.get(timeout=30)
    assert "count: expected int, got str" in str(info.value)
    assert result.state == states.FAILURE
    assert result.traceback is None

    # Flower's view: INVALID with the problems, never a failure with a traceback.
    # The worker's own events are buffered: whichever order they arrive in, the state ends
    # INVALID (the task-invalid event ranks after task-started, unlike task-rejected).
    wait_for(lambda: {"task-invalid", "task-started"} <= set(monitor.of(result.id)),
             what="the task-started and task-invalid events")
    assert "task-failed" not in monitor.of(result.id)
    task = monitor.state.tasks[result.id]
    assert task.state == "INVALID"
    assert "count: expected int, got str" in task.exception
    assert not task.traceback

    # The log: one WARNING naming the task and the fields, no ERROR, no traceback, no value.
    ours = [r for r in caplog.records if result.id in r.getMessage()]
    warnings = [r for r in ours if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in ours]
    line = warnings[0].getMessage()
    assert line.startswith(f"hms.test.echo[{result.id}] rejected: ")
    assert "count: expected int" in line
    assert "bogus: unknown argument" in line
    assert "\n" not in line
    assert not any(r.levelno >= logging.ERROR for r in ours)
    assert not any(r.exc_info for r in ours)
    assert not any("Jane" in r.getMessage() or "1961" in r.getMessage() for r in caplog.records)

    # The run report still says rejected (written before the result).
    report = reports.latest("hms.test.echo")
    assert report is not None
    assert report["id"] == result.id
    assert report["outcome"] == "rejected"


def test_a_rejected_message_is_not_redelivered(events_worker: Any, celery_app: Any) -> None:
    from hms_tasks import store

    bad = celery_app.send_task("hms.test.echo", kwargs={"count": -1})
    with pytest.raises(InvalidArguments):
        bad.get(timeout=30)
    # Acknowledged: nothing waits in the queue or among kombu's unacked messages.
    client = store.client()
    wait_for(lambda: client.hlen("unacked") == 0, what="the message to be acknowledged")
    assert client.llen(names.DEFAULT_QUEUE) == 0


def test_dispatch_wait_exits_1_with_the_problems_of_a_rejection(events_worker: Any) -> None:
    # Whether a node is live is known only when the task runs: the CLI's check passes, the
    # worker rejects the call, and --wait prints the problems and exits 1.
    result = CliRunner().invoke(cli, ["dispatch", memory_names.MEMORY_SNAPSHOT, "--arg",
                                      "node=ghost@nowhere", "--wait", "--timeout", "30"])
    assert result.exit_code == 1, result.output
    (error,) = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert "failed: InvalidArguments" in error
    assert "node: not a live worker (live: " in error
    wait_for(lambda: (reports.latest(memory_names.MEMORY_SNAPSHOT) or {}).get("outcome")
             == "rejected", what="the rejected run report")
