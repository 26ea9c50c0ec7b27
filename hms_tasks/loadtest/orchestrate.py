"""Start, watch, abort and merge a distributed load test.

How a run goes::

    hms.loadtest.run          checks the definition and the free loadtest worker processes,
      (any loadtest worker)   writes the run record (start_at = now + START_DELAY), publishes
                              one hms.loadtest.shard per shard and a final hms.loadtest.merge
                              due at end_at + GRACE + 5 s, and returns: it never waits.
                              (A countdown may not outlast the visibility timeout: the final
                              merge waits in hops of at most max_countdown, re-sending itself
                              until it is due.)
    hms.loadtest.shard x N    each in its own worker process: a Locust subprocess starting at
                              start_at, stopping at end_at, checkpointed to Redis every second
    hms.loadtest.merge        queued by the last shard to finish (or, if a shard never does,
                              by the final one): merges every shard's data exactly, judges the
                              thresholds, compares with the previous run, stores the report
                              and writes the HTML page.

Nothing blocks on a subtask, so a single solo worker can run a one-shard test on its own. The
run id is the ``run`` task's id, which the caller knows before the task even starts.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

from hms_tasks import nodes
from hms_tasks.errors import InvalidArguments, LoadTestRefused
from hms_tasks.loadtest import capacity, keys, names, report, settings, spec, stats, text
from hms_tasks.metrics import names as metrics_names

__all__ = [
    "abort_run",
    "html_path",
    "merge_or_wait",
    "merge_run",
    "resolve",
    "start_run",
    "status",
    "valid_run_id",
]

logger = logging.getLogger(__name__)

#: Seconds after the grace period at which the final merge runs whatever the shards did.
FINAL_MERGE_DELAY = 5.0
#: The final merge waits for the run's deadline in hops of at most the countdown the
#: visibility timeout leaves it (hms_tasks.celery.max_countdown): fewer seconds than this per
#: hop would be a busy loop, so the start-up check refuses such settings.
MIN_MERGE_HOP = 5.0


def valid_run_id(run_id: str) -> bool:
    return isinstance(run_id, str) and 1 <= len(run_id) <= 64 and all(
        c.isalnum() or c in "-_." for c in run_id)


def resolve(test: str | dict[str, Any] | None, *, nightly: bool = False,
            task: str = names.RUN) -> spec.LoadTestSpec | None:
    """The spec to run: a test of HMS_TASKS_LOADTEST_TESTS by name, or a definition; with
    ``nightly`` the one HMS_TASKS_LOADTEST_NIGHTLY names (None when it is not set)."""
    if nightly:
        if test is not None:
            raise InvalidArguments(task, ["nightly: runs the HMS_TASKS_LOADTEST_NIGHTLY test;"
                                          " give no test with it"])
        name = settings.get().loadtest_nightly
        return None if name is None else spec.configured(name, task=task)
    if isinstance(test, str):
        return spec.configured(test, task=task)
    if test is None:
        raise InvalidArguments(task, ["test: missing (a test name of HMS_TASKS_LOADTEST_TESTS,"
                                      " or a definition object)"])
    return spec.parse(test, task=task)


def check_capacity(test: spec.LoadTestSpec) -> capacity.Capacity:
    """Refuse (LoadTestRefused) a test with more shards than free loadtest processes."""
    cap = capacity.free_processes()
    if cap.free < test.shards:
        raise LoadTestRefused(f"shards: {test.shards} requested, but {cap.describe()};"
                              " nothing was started")
    return cap


def start_run(test: spec.LoadTestSpec, *, run_id: str | None = None,
              now: float | None = None) -> dict[str, Any]:
    """Check capacity, record the run and publish its shards and final merge; returns the
    run's summary (ids and instants). Idempotent per ``run_id``: a second call for a recorded
    run publishes its messages again, which changes nothing (shards claim their slot once, the
    merge is idempotent) but covers a first call that died half-way through publishing."""
    run_id = run_id or str(uuid.uuid4())
    if not valid_run_id(run_id):
        raise InvalidArguments(names.RUN, ["run id: letters, digits, '-', '_', '.'"])
    s = settings.get()
    existing = keys.run(run_id)
    if existing:
        # A redelivered message (the first delivery's worker died): it may have died before
        # publishing everything, so publish again. Shards claim their slot once and the merge
        # is idempotent, so duplicates change nothing.
        _publish(run_id, json.loads(existing["shard_ids"]), end_at=float(existing["end_at"]),
                 deadline=float(existing["deadline"]))
        return {"run_id": run_id, "test": existing.get("test"), "redelivered": True,
                "status": existing.get("status")}
    cap = check_capacity(test)
    now = time.time() if now is None else now
    start_at = now + s.loadtest_start_delay
    end_at = start_at + test.duration
    deadline = end_at + s.loadtest_grace
    shard_ids = [f"{run_id}-shard-{i}" for i in range(test.shards)]
    created = keys.create_run(run_id, {
        "id": run_id, "test": test.name, "target": test.target, "status": "scheduled",
        "spec": json.dumps(test.to_json(), separators=(",", ":")), "created_at": now,
        "start_at": start_at, "end_at": end_at, "deadline": deadline, "shards": test.shards,
        "users": test.users, "node": nodes.current(), "shard_ids": shard_ids, "done": 0,
        "abort": "0",
    }, created_at=now)
    if not created:
        return {"run_id": run_id, "test": test.name, "redelivered": True}
    _publish(run_id, shard_ids, end_at=end_at, deadline=deadline, now=now)
    logger.info("load test %s (%s): %s over %s from %.3f for %g s", run_id, test.name,
                text.count(test.users, "user"), text.count(test.shards, "shard"), start_at,
                test.duration)
    return {"run_id": run_id, "test": test.name, "target": test.target, "users": test.users,
            "shards": test.shards, "start_at": round(start_at, 3), "end_at": round(end_at, 3),
            "deadline": round(deadline, 3), "free_processes": cap.free,
            "shard_ids": shard_ids}


def _publish(run_id: str, shard_ids: list[str], *, end_at: float, deadline: float,
             now: float | None = None) -> None:
    """Publish the run's shards and its final merge (fixed task ids)."""
    from hms_tasks.celery import app

    now = time.time() if now is None else now
    for i, task_id in enumerate(shard_ids):
        # A shard message nobody took before the run's end is worthless: it expires.
        app.send_task(names.SHARD, kwargs={"run_id": run_id, "index": i},
                      task_id=task_id, expires=max(1.0, end_at - now))
    _send_final_merge(run_id, due=deadline + FINAL_MERGE_DELAY, now=now)


def _send_final_merge(run_id: str, *, due: float, now: float | None = None) -> None:
    """Publish the run's final merge (task id ``<run>-merge-final``), due at ``due``: with the
    longest countdown allowed (a merge that arrives early sends itself again; see
    :func:`merge_or_wait`)."""
    from hms_tasks.celery import app, max_countdown

    now = time.time() if now is None else now
    countdown = max(0.0, min(due - now, max_countdown(names.MERGE)))
    app.send_task(names.MERGE, kwargs={"run_id": run_id},
                  task_id=f"{run_id}-merge-final", ignore_result=True, countdown=countdown)


def merge_hop_problems() -> list[str]:
    """Start-up check: the final merge's hops are long enough not to be a busy loop."""
    from hms_tasks.celery import max_countdown

    hop = max_countdown(names.MERGE)
    if hop >= MIN_MERGE_HOP:
        return []
    return [f"task {names.MERGE}: its hard time limit leaves {max(hop, 0):g} s below the"
            " visibility timeout (HMS_TASKS_VISIBILITY_TIMEOUT) for the final merge to wait"
            f" in; it needs {MIN_MERGE_HOP:g} s: raise the timeout"]


def merge_or_wait(run_id: str, *, now: float | None = None) -> dict[str, Any]:
    """What ``hms.loadtest.merge`` does: :func:`merge_run`, and when the run is not due yet
    (shards still running before its deadline), send the final merge again for the rest of
    the wait. Each hop is a fresh message, so no message waits in a worker past the visibility
    timeout. A hop re-sent twice (its worker died after sending) makes two chains: harmless,
    the merge is idempotent."""
    result = merge_run(run_id, now=now)
    due = result.get("due_at")
    if due is not None:
        _send_final_merge(run_id, due=float(due), now=now)
    return result


def abort_run(run_id: str) -> str:
    """Ask every shard of the run to stop; ``asked``, ``already asked``, ``over`` or
    ``unknown``. Shards stop within about 3 s (5 s at most) and keep what they measured."""
    return {1: "asked", 2: "already asked", 0: "over", -1: "unknown"}[keys.abort(run_id)]


def status(run_id: str, *, now: float | None = None) -> dict[str, Any] | None:
    """The run's state for ``hms-tasks loadtest status``: its status, elapsed time and the
    sum of its shards' progress (users, current RPS, requests, failures), shard by shard."""
    rec = keys.run(run_id)
    if not rec:
        return None
    now = time.time() if now is None else now
    count = int(rec.get("shards", 0))
    rows = []
    totals: dict[str, int] = {"users": 0, "rps": 0, "requests": 0, "failures": 0}
    for i, sh in enumerate(keys.shards(run_id, count)):
        progress = json.loads(sh["progress"]) if sh.get("progress") else {}
        final = sh.get("state") in keys.FINAL_SHARD_STATES
        row: dict[str, Any] = {
            "index": i, "state": sh.get("state", "queued"), "node": sh.get("node"),
            "users": int(sh.get("users", 0) or 0),
            "requests": int(sh.get("requests") or progress.get("requests", 0)),
            "failures": int(sh.get("failures") or progress.get("failures", 0)),
            "rps": 0 if final else int(progress.get("rps", 0)),
            "reason": sh.get("reason"), "contained": _contained(sh)}
        rows.append(row)
        for k in ("rps", "requests", "failures"):
            totals[k] += row[k]
        totals["users"] += 0 if final else int(progress.get("users", 0))
    start_at, end_at = float(rec["start_at"]), float(rec["end_at"])
    return {
        "run_id": run_id, "test": rec.get("test"), "target": rec.get("target"),
        "status": rec.get("status"), "verdict": rec.get("verdict"),
        "aborting": rec.get("abort") == "1" and rec.get("status") not in keys.FINAL_STATUSES,
        "start_at": start_at, "end_at": end_at,
        "duration_s": round(end_at - start_at, 3),
        "elapsed_s": round(min(max(0.0, now - start_at), end_at - start_at), 1),
        **totals, "shards": rows,
    }


def html_path(run_id: str) -> Path:
    return Path(settings.get().loadtest_reports_dir) / f"{run_id}.html"


def _contained(meta: dict[str, str]) -> bool | None:
    """Whether the shard's runner ran in a network namespace (None: not known, it never
    started; see hms_tasks.loadtest.containment)."""
    return {"1": True, "0": False}.get(meta.get("contained", ""))


def _shard_data(run_id: str, index: int, meta: dict[str, str]) -> tuple[stats.RunData,
                                                                         dict[str, Any]]:
    state = meta.get("state")
    row: dict[str, Any] = {"index": index, "node": meta.get("node"), "state": state,
                           "users": int(meta.get("users", 0) or 0),
                           "reason": meta.get("reason"), "check": None,
                           "locust": meta.get("locust"), "contained": _contained(meta)}
    if meta.get("result"):
        doc = json.loads(meta["result"])
        data = stats.RunData.from_json(doc)
        row["check"] = doc.get("check")
    else:
        data = stats.RunData()
        lines = keys.ticks(run_id, index)
        for line in lines:
            data.add_tick(json.loads(line))
        if data.seconds:
            data.started_at = float(min(data.seconds))
            data.stopped_at = float(max(data.seconds) + 1)
        if state is None:
            row["state"] = "lost"
            row["reason"] = ("never started: no worker took its message before the deadline"
                             " (every loadtest worker process busy, or none alive)")
        else:
            row["state"] = "lost"
            row["reason"] = (f"no result by the deadline (last seen {state} on"
                             f" {meta.get('node')}; its worker stopped?); its"
                             f" {len(lines)} checkpointed seconds are kept")
    row["started_at"] = data.started_at
    row["stopped_at"] = data.stopped_at
    row["requests"] = sum(e.requests for e in data.endpoints.values())
    row["failures"] = sum(e.failures for e in data.endpoints.values())
    return data, row


def merge_run(run_id: str, *, now: float | None = None) -> dict[str, Any]:
    """Merge the run's shards into its report (idempotent: a merged run is left alone).

    Runs once every shard has finished, or at the deadline with whatever the shards reported
    (a shard that never reported is ``lost``). Stores the report, the run's status and
    verdict, puts the run at the head of its test's history, writes the HTML page, and flags a
    regression (and writes the ``loadtest.*`` series the ``loadtest_regression`` alert rule
    watches). Returns the summary.
    """
    now = time.time() if now is None else now
    rec = keys.run(run_id)
    if not rec:
        return {"run_id": run_id, "skipped": "unknown run (expired or never recorded)"}
    existing = keys.report(run_id)
    if existing is not None:
        return {"run_id": run_id, "skipped": "already merged",
                "status": existing["verdict"]["status"]}
    count = int(rec["shards"])
    if int(rec.get("done", 0)) < count and now < float(rec["deadline"]):
        return {"run_id": run_id, "skipped": "shards still running; the final merge is due"
                                             " after the deadline",
                "due_at": float(rec["deadline"]) + FINAL_MERGE_DELAY}
    if not keys.merge_lock(run_id, secrets.token_hex(8)):
        return {"run_id": run_id, "skipped": "another merge of this run is running"}
    metas = keys.shards(run_id, count)
    parts: list[stats.RunData] = []
    rows: list[dict[str, Any]] = []
    for i, meta in enumerate(metas):
        data, row = _shard_data(run_id, i, meta)
        parts.append(data)
        rows.append(row)
    merged = stats.merge(parts)
    summary = stats.summarize(merged)
    definition = json.loads(rec["spec"])
    try:
        test = spec.parse(definition, task=names.MERGE, check_files=False)
        judged = report.verdict(test, summary, rows, aborted=rec.get("abort") == "1")
    except InvalidArguments as exc:
        judged = {"status": "failed", "thresholds": [],
                  "reasons": [f"the definition no longer passes this node's settings: {exc}"]}
    starts = [r["started_at"] for r in rows if r["started_at"] is not None]
    doc: dict[str, Any] = {
        "v": report.REPORT_VERSION, "run_id": run_id, "test": rec["test"],
        "created_at": float(rec["created_at"]), "start_at": float(rec["start_at"]),
        "end_at": float(rec["end_at"]), "merged_at": now, "definition": definition,
        **summary, "shards": rows, "verdict": judged,
        "environment": {
            "shards": count,
            "nodes": sorted({str(r["node"]) for r in rows if r["node"]}),
            "orchestrator": rec.get("node"), "merged_by": nodes.current(),
            "start_skew_ms": round((max(starts) - min(starts)) * 1000, 1) if starts else None,
            "versions": _versions(rows),
        },
    }
    previous = _previous_report(str(rec["test"]), run_id)
    doc["regression"] = report.regression(doc, previous,
                                          tolerance=settings.get().loadtest_regression_tolerance)
    status_ = judged["status"]
    keys.record_report(run_id, str(rec["test"]), doc, status=status_)
    html_file = _write_html(run_id, doc)
    _signal_regression(str(rec["test"]), doc, now=now)
    total = doc["total"]
    return {"run_id": run_id, "test": rec["test"], "status": status_,
            "requests": total["requests"], "failures": total["failures"], "rps": total["rps"],
            "p95_ms": total.get("p95_ms"), "shards_finished": sum(
                1 for r in rows if r["state"] == "finished"), "shards": count,
            "regressed": doc["regression"]["regressed"],
            "failed_checks": [c["scope"] + " " + c["metric"] for c in judged["thresholds"]
                              if not c["passed"]],
            "html": str(html_file) if html_file else None}


def _versions(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import celery

    import hms_tasks

    locust = sorted({str(r["locust"]) for r in rows if r.get("locust")})
    return {"hms_tasks": hms_tasks.__version__, "celery": celery.__version__,
            "python": platform.python_version(), "locust": locust[0] if len(locust) == 1
            else (locust or None)}


def _previous_report(test: str, run_id: str) -> dict[str, Any] | None:
    for other in keys.history(test, last=5):
        if other != run_id:
            doc = keys.report(other)
            if doc is not None:
                return doc
    return None


def _write_html(run_id: str, doc: dict[str, Any]) -> Path | None:
    path = html_path(run_id)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(report.render_html(doc), encoding="utf-8")
        tmp.replace(path)
        return path
    except OSError:
        logger.warning("could not write the HTML report of load test %s", run_id, exc_info=True)
        return None


def _signal_regression(test: str, doc: dict[str, Any], *, now: float) -> None:
    """Feed the alerting: ``loadtest.regression{test=...}`` (1 when the run regressed against
    the previous one, else 0: also on a test's first run and when the runs cannot be compared),
    ``loadtest.p95_ms`` and ``loadtest.rps``, then an alert evaluation, so the
    ``loadtest_regression`` rule fires (or resolves) now rather than at the next minute."""
    reg = doc["regression"]
    if reg["regressed"]:
        logger.warning("load test %s regressed against run %s: %s", test, reg["previous_run"],
                       {m: v["change"] for m, v in reg["metrics"].items()})
    try:
        from hms_tasks.celery import app
        from hms_tasks.metrics import store as ts

        labels = {"test": test}
        points: list[tuple[str, float, float]] = [
            (ts.series_id("loadtest.regression", labels), now, 1.0 if reg["regressed"] else 0.0)]
        if doc["total"]["requests"] and doc["verdict"]["status"] != "aborted":
            points.append((ts.series_id("loadtest.rps", labels), now, float(doc["total"]["rps"])))
            if doc["total"].get("p95_ms") is not None:
                points.append((ts.series_id("loadtest.p95_ms", labels), now,
                               float(doc["total"]["p95_ms"])))
        ts.write(points, now=now)
        app.send_task(metrics_names.METRICS_EVALUATE_ALERTS, ignore_result=True)
    except Exception:
        # The report is stored; a metrics store or broker hiccup must not fail the merge.
        logger.warning("could not feed load test %s into the metrics store", test,
                       exc_info=True)
