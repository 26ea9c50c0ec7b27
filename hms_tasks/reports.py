"""Run reports: every hms task run leaves one in Redis.

Layout (``<p>`` is ``HMS_TASKS_REDIS_PREFIX``)::

    <p>:report:tasks              SET    names of tasks that have reports
    <p>:report:<task>:latest      STRING JSON RunReport of the task's last run
    <p>:report:<task>:history     LIST   JSON RunReports, newest first, capped at
                                         HMS_TASKS_REPORT_HISTORY entries

One report is written in one MULTI/EXEC round trip, so readers never see the latest document
without its history entry, and the history never grows past its cap. Reports carry counts, ids
and durations only: the summary is what the task returned, and hms tasks return counts.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal, TypedDict, cast

from hms_tasks import conf, store

__all__ = ["REPORT_VERSION", "Outcome", "RunReport", "history", "latest", "record", "task_names"]

logger = logging.getLogger(__name__)

REPORT_VERSION = 1
# A summary is a handful of counts; anything this large is a bug (or data that must not be here).
MAX_SUMMARY_BYTES = 32_768

Outcome = Literal["success", "failure", "retry", "rejected", "poisoned"]


class RunReport(TypedDict):
    v: int
    task: str
    id: str | None
    node: str
    started_at: float
    finished_at: float
    duration_ms: float
    outcome: Outcome
    summary: dict[str, Any] | None
    #: Exception class name only: messages can quote data.
    error: str | None


def _keys(task: str) -> tuple[str, str]:
    return store.key("report", task, "latest"), store.key("report", task, "history")


def encode(report: RunReport) -> str:
    doc = json.dumps(report, separators=(",", ":"), default=str)
    if len(doc) > MAX_SUMMARY_BYTES:
        size = len(doc)
        report = {**report, "summary": {"truncated": True, "bytes": size}}
        doc = json.dumps(report, separators=(",", ":"), default=str)
    return doc


def record(report: RunReport) -> None:
    """Store ``report`` as its task's latest run and push it onto the capped history."""
    latest_key, history_key = _keys(report["task"])
    doc = encode(report)
    pipe = store.client().pipeline(transaction=True)
    pipe.set(latest_key, doc)
    pipe.lpush(history_key, doc)
    pipe.ltrim(history_key, 0, conf.get().report_history - 1)
    pipe.sadd(store.key("report", "tasks"), report["task"])
    pipe.execute()


def latest(task: str) -> RunReport | None:
    """The task's last run report, or None if it never ran."""
    doc = cast("str | None", store.client().get(_keys(task)[0]))
    return cast(RunReport, json.loads(doc)) if doc else None


def history(task: str, *, last: int = 10) -> list[RunReport]:
    """Up to ``last`` most recent reports of ``task``, newest first."""
    docs = cast("list[str]", store.client().lrange(_keys(task)[1], 0, max(last, 1) - 1))
    return [cast(RunReport, json.loads(d)) for d in docs]


def task_names() -> list[str]:
    """Names of every task that has left a report, sorted."""
    return sorted(cast("set[str]", store.client().smembers(store.key("report", "tasks"))))
