"""The redelivery bound: with the shipped settings every message that waits in a worker (a
running acks_late task, a countdown or ETA, a retry) is acknowledged within the visibility
timeout of its delivery, and a publish that would break that is refused, with nothing sent."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.test import override_settings

from hms_tasks import celery as hms_celery
from hms_tasks import conf, names, store
from hms_tasks.celery import app, load_tasks, longest_retry_wait, max_countdown, startup_problems
from hms_tasks.errors import ConfigurationError
from hms_tasks.memory import names as memory_names

SNAPSHOT_QUEUE = names.queue_for(memory_names.MEMORY_SNAPSHOT)


def _queued(queue: str) -> list[dict[str, Any]]:
    return [json.loads(raw)["headers"] for raw in store.client().lrange(queue, 0, -1)]


def test_shipped_settings_redeliver_within_three_minutes() -> None:
    load_tasks(app)
    vt = conf.get().visibility_timeout
    default = conf.CoreSettings.model_fields["visibility_timeout"].default
    assert vt == default == 150  # the default, which the suite keeps
    # The sweep runs every RESTORE_INTERVAL: a SIGKILLed worker's task is back within 160 s.
    assert vt + hms_celery.RESTORE_INTERVAL <= 180
    assert startup_problems(app) == []
    hms = {n: t for n, t in app.tasks.items() if n.startswith("hms.") and ".test." not in n}
    assert hms
    for name, task in hms.items():
        if name == "hms.loadtest.shard":
            # Acked at its start: its 1,953 s limit holds no other queue back.
            assert task.acks_late is False
            continue
        assert task.acks_late, name
        # A retry's wait plus the run fits below the timeout with its margin.
        assert (longest_retry_wait(task) + task.time_limit + hms_celery.COUNTDOWN_MARGIN
                <= vt), name


@pytest.mark.parametrize("when", ["countdown", "eta", "eta-text", "apply_async"])
def test_a_wait_past_the_visibility_timeout_is_refused_and_nothing_is_sent(when: str) -> None:
    cap = max_countdown(memory_names.MEMORY_SNAPSHOT)
    assert cap == 150 - 30 - hms_celery.COUNTDOWN_MARGIN  # its hard limit is 30 s

    def send(seconds: float) -> Any:
        kwargs = {"node": "w@h", "seconds": 5}
        at = datetime.now(UTC) + timedelta(seconds=seconds)
        if when == "countdown":
            return app.send_task(memory_names.MEMORY_SNAPSHOT, kwargs=kwargs, countdown=seconds)
        if when == "eta":
            return app.send_task(memory_names.MEMORY_SNAPSHOT, kwargs=kwargs, eta=at)
        if when == "eta-text":
            return app.send_task(memory_names.MEMORY_SNAPSHOT, kwargs=kwargs,
                                 eta=at.isoformat())
        return app.tasks[memory_names.MEMORY_SNAPSHOT].apply_async(kwargs=kwargs,
                                                                    countdown=seconds)

    with pytest.raises(ConfigurationError) as info:
        send(cap + 5)
    message = str(info.value)
    assert f"at most {cap:g} s away" in message
    assert "HMS_TASKS_VISIBILITY_TIMEOUT" in message
    assert _queued(SNAPSHOT_QUEUE) == []

    send(cap - 5)
    [sent] = _queued(SNAPSHOT_QUEUE)
    assert sent["task"] == memory_names.MEMORY_SNAPSHOT
    assert sent["eta"] is not None


def test_a_per_message_time_limit_counts_and_other_apps_tasks_are_left_alone() -> None:
    # 150 - 100 - 10: a countdown of 50 s would keep this message unacked 150 s or more.
    with pytest.raises(ConfigurationError):
        app.send_task(memory_names.MEMORY_SNAPSHOT, kwargs={"node": "w@h"}, countdown=50,
                      time_limit=100)
    assert _queued(SNAPSHOT_QUEUE) == []
    # Not an hms task: its owner's business (it goes to the default queue).
    app.send_task("other.app.task", countdown=3600)
    [sent] = _queued(names.DEFAULT_QUEUE)
    assert sent["task"] == "other.app.task"


def test_start_up_refuses_retries_that_would_wait_past_the_timeout() -> None:
    with override_settings(HMS_TASKS_VISIBILITY_TIMEOUT=100):
        problems = startup_problems(app)
    # The webhook's last retry waits 64 s: with its 30 s limit and the margin, over 100 s.
    assert ("task hms.metrics.deliver_webhook: its retries wait up to 64 s, longer than its"
            " hard time limit leaves below the visibility timeout (100 s,"
            " HMS_TASKS_VISIBILITY_TIMEOUT): lower retry_backoff_max") in problems
    # And the cache tasks' 120 s limit is over the timeout itself.
    assert any(p.startswith("task hms.cache.warm_hot: hard time limit 120 s must be below")
               for p in problems)
