"""Run reports, argument checks on the worker, JSON-only messages: with a real worker and Redis."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import override_settings

from hms_tasks import names, reports, store
from hms_tasks.errors import InvalidArguments, TaskFailed
from hms_tasks.metrics import names as metrics_names
from hms_tasks.metrics.tasks import collect_host
from tests import tasks_for_tests


def test_collect_host_runs_on_worker_and_writes_report(worker: Any) -> None:
    result = collect_host.delay()
    sample = result.get(timeout=30)
    assert sample["cpu"]["count"] >= 1
    assert len(sample["cpu"]["per_core"]) == sample["cpu"]["count"]
    assert 0 <= sample["memory"]["percent"] <= 100
    assert sample["process"]["rss"] > 0
    assert sample["process"]["threads"] >= 1
    report = reports.latest(metrics_names.METRICS_COLLECT_HOST)
    assert report is not None
    assert report["id"] == result.id
    assert report["outcome"] == "success"
    assert report["node"] == worker.hostname
    assert report["finished_at"] >= report["started_at"]
    assert report["summary"] == sample
    assert metrics_names.METRICS_COLLECT_HOST in reports.task_names()


def test_history_is_capped(worker: Any) -> None:
    with override_settings(HMS_TASKS_REPORT_HISTORY=3):
        ids = [tasks_for_tests.echo.delay(count=i, ids=[]).id for i in range(5)]
        for task_id in ids:
            tasks_for_tests.echo.AsyncResult(task_id).get(timeout=30)
        runs = reports.history("hms.test.echo", last=50)
        assert [r["id"] for r in runs] == ids[::-1][:3]
        assert store.client().llen(store.key("report", "hms.test.echo", "history")) == 3


def test_worker_rejects_bad_arguments_from_any_client(worker: Any, celery_app: Any) -> None:
    # send_task skips every client-side check, as `celery call` does.
    result = celery_app.send_task("hms.test.echo", kwargs={"count": "many", "bogus": 1})
    with pytest.raises(InvalidArguments) as info:
        result.get(timeout=30)
    assert "count: expected int, got str" in str(info.value)
    assert "bogus: unknown argument" in str(info.value)
    assert "ids: missing" in str(info.value)
    report = reports.latest("hms.test.echo")
    assert report is not None
    assert report["outcome"] == "rejected"
    assert report["error"] == "InvalidArguments"


def test_failure_hides_exception_message(worker: Any) -> None:
    result = tasks_for_tests.boom.delay(row=7)
    with pytest.raises(TaskFailed) as info:
        result.get(timeout=30)
    assert "Jane" not in str(info.value)
    assert "MRN" not in (result.traceback or "")
    assert "RuntimeError" in str(info.value)
    report = reports.latest("hms.test.boom")
    assert report is not None
    assert report["outcome"] == "failure"
    assert report["error"] == "RuntimeError"
    assert "Jane" not in json.dumps(report)


def test_worker_refuses_pickle_messages(worker: Any, celery_app: Any) -> None:
    pickled = celery_app.send_task("hms.test.echo", kwargs={"count": 1, "ids": []},
                                   serializer="pickle")
    plain = celery_app.send_task("hms.test.echo", kwargs={"count": 2, "ids": []})
    # One solo worker consumes one queue in order: once the JSON message ran, the pickled one
    # (published first) has been refused.
    assert plain.get(timeout=30)["count"] == 2
    assert [r["id"] for r in reports.history("hms.test.echo", last=10)] == [plain.id]
    assert pickled.state == "PENDING"
    client = store.client()
    assert client.llen(names.DEFAULT_QUEUE) == 0
