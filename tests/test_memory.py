"""Memory tiers with a real prefork worker (one pool child, a 256 MiB budget): a leaking task
drives its child through warning, critical and emergency; the child is replaced after the task
(new pid) and the worker keeps serving. Also: the sweep, the SIGUSR2 nudge of an idle child,
a tracemalloc comparison that finds the leaking line, and the tiers in-process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

from hms_tasks import names as queues
from hms_tasks.memory import hooks, settings, snapshot, tiers
from hms_tasks.memory import names as memory_names
from hms_tasks.memory import sweep as sweeping
from tests.helpers import RedisServer, stop, wait_for

REPO = Path(__file__).resolve().parent.parent
NODE = "mem@localhost"
BUDGET_MB = 256
MIB = 1024 * 1024


@pytest.fixture
def prefork_worker(redis_server: RedisServer, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    (tmp_path / "mem_settings.py").write_text(
        "from hms_tasks.demo.settings import *  # noqa\n"
        f"HMS_TASKS_MEMORY_BUDGET_MB = {BUDGET_MB}\n"
        "HMS_TASKS_MEMORY_COOLDOWN = 0\n"
    )
    env = {**os.environ, "REDIS_URL": redis_server.url, "HMS_TASKS_HOME": str(tmp_path),
           "PYTHONPATH": str(tmp_path), "DJANGO_SETTINGS_MODULE": "mem_settings"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "hms_tasks", "worker", "--pool", "prefork",
         "--concurrency", "1", "--include", "tests.tasks_for_tests",
         "-Q", f"{queues.DEFAULT_QUEUE},{queues.CAPABILITY_QUEUES['memory']}", "-n", NODE,
         "--without-mingle", "--without-gossip", "--loglevel", "INFO"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        stop(proc)


def _run(celery_app: Any, name: str, **kwargs: Any) -> dict[str, Any]:
    result: dict[str, Any] = celery_app.send_task(name, kwargs=kwargs).get(timeout=90)
    return result


def _event(pid: int, action: str) -> hooks.MemoryEvent | None:
    return next((e for e in hooks.events(last=1000, pid=pid) if e["action"] == action), None)


def test_leaking_task_drives_its_child_through_the_tiers_and_is_recycled(
        prefork_worker: subprocess.Popen[bytes], celery_app: Any) -> None:
    first = _run(celery_app, "hms.test.whoami")
    pid = first["pid"]
    assert first["rss"] < BUDGET_MB * MIB * 0.8, "the child starts below the warning tier"
    # The child froze the heap it inherited (hms_tasks.base): Django, Celery, the app.
    assert first["frozen"] > 10_000
    start = wait_for(lambda: _event(pid, "child_start"), what="the child's start event")
    assert start["budget"] == pytest.approx(BUDGET_MB * MIB, rel=0.001)

    # Warning (80 %): the young generations are collected after the task.
    assert _run(celery_app, "hms.test.leak_to", mb=int(BUDGET_MB * 0.83))["pid"] == pid
    warning = wait_for(lambda: _event(pid, "gc_young"), what="the warning tier's action")
    assert warning["tier"] == "warning"
    assert warning["trigger"] == "task"
    assert warning["task"] == "hms.test.leak_to"
    assert warning["rss_before"] >= BUDGET_MB * MIB * 0.8
    assert warning["pause_ms"] >= 0
    assert warning["collected"] >= 0

    # The sweep measures the (only) child, finds it over a tier and has it check again.
    swept = _run(celery_app, memory_names.MEMORY_SWEEP)
    assert swept["nodes"] == [NODE]
    assert swept["missing"] == []
    row = wait_for(lambda: _sweep_row(swept["sweep"]), what="the node's sweep row")
    assert [(c["pid"], c["tier"], c["signalled"]) for c in row["children"]] == [
        (pid, "warning", True)]
    # An idle child signalled by a sweep (SIGUSR2) acts at once, from its handler.
    os.kill(pid, signal.SIGUSR2)
    nudged = wait_for(lambda: next((e for e in hooks.events(last=1000, pid=pid)
                                    if e["trigger"] == "sweep"), None),
                      timeout=60, what="the idle child to act on the signal")
    assert nudged["tier"] == "warning"
    assert nudged["action"] == "gc_young"

    # Critical (90 %): full collection, process state cleared, heap trimmed.
    assert _run(celery_app, "hms.test.leak_to", mb=int(BUDGET_MB * 0.92))["pid"] == pid
    critical = wait_for(lambda: _event(pid, "gc_full"), what="the critical tier's action")
    assert critical["tier"] == "critical"
    assert critical["rss_before"] >= BUDGET_MB * MIB * 0.9

    # Emergency (95 %): replaced after the task returned, never during it.
    leaked = _run(celery_app, "hms.test.leak_to", mb=int(BUDGET_MB * 0.97))
    assert leaked["pid"] == pid
    assert leaked["rss"] >= BUDGET_MB * MIB * 0.95
    recycle = wait_for(lambda: _event(pid, "recycle"), what="the emergency tier's action")
    assert recycle["tier"] == "emergency"
    exit_ = wait_for(lambda: _event(pid, "child_exit"), what="the old child to exit")
    assert exit_["exitcode"] == 155  # billiard's EX_RECYCLE

    def new_child() -> dict[str, Any] | None:
        me = _run(celery_app, "hms.test.whoami")
        return me if me["pid"] != pid else None

    fresh = wait_for(new_child, timeout=60, what="a new pool child")
    assert fresh["rss"] < BUDGET_MB * MIB * 0.8
    assert _event(fresh["pid"], "child_start") is not None
    assert prefork_worker.poll() is None  # the worker itself kept serving

    # A tracemalloc comparison on the node finds the line that leaks.
    started = _run(celery_app, memory_names.MEMORY_SNAPSHOT, node=NODE, seconds=2, top=5)
    assert started["node"] == NODE
    assert started["processes_asked"] == 1
    for step in range(1, 4):
        _run(celery_app, "hms.test.leak_to", mb=int(fresh["rss"] / MIB) + 8 * step)
    results = wait_for(lambda: snapshot.results(started["id"]), timeout=60,
                       what="the comparison's result")
    assert [r["pid"] for r in results] == [fresh["pid"]]
    top = results[0]["top"]
    assert "tests/tasks_for_tests.py" in top[0]["site"]
    assert top[0]["size_diff"] >= 16 * MIB


def _sweep_row(sweep_id: str) -> Any:
    import json

    from hms_tasks import store

    raw = store.client().hget(store.key("memory", "sweep", sweep_id), NODE)
    return json.loads(raw) if raw else None


def test_tiers_classify_against_the_budget() -> None:
    with override_settings(HMS_TASKS_MEMORY_BUDGET_MB=1000,
                           HMS_TASKS_MEMORY_TIERS={"warning": 50, "critical": 60,
                                                   "emergency": 70}):
        b = tiers.budget()
        assert b is not None
        assert b.total == 1000 * MIB
        assert (b.warning, b.critical, b.emergency) == (500 * MIB, 600 * MIB, 700 * MIB)
        assert tiers.classify(499 * MIB, b) is None
        assert tiers.classify(500 * MIB, b) == "warning"
        assert tiers.classify(650 * MIB, b) == "critical"
        assert tiers.classify(700 * MIB, b) == "critical"  # billiard's test is strictly above
        assert tiers.classify(700 * MIB + 1024, b) == "emergency"
    with override_settings(HMS_TASKS_MEMORY_BUDGET_MB=0):
        assert tiers.budget() is None
        assert settings.celery_options() == {"worker_max_memory_per_child": None}
    with override_settings(HMS_TASKS_MEMORY_BUDGET_MB=1000,
                           HMS_TASKS_MEMORY_TIERS={"emergency": 92}):
        # Celery's limit is the emergency tier, in KiB; the other tiers keep their defaults.
        assert settings.celery_options() == {
            "worker_max_memory_per_child": 1000 * 1024 * 92 // 100}
        assert settings.get().memory_tiers.warning == 80
        from hms_tasks.celery import celery_defaults

        assert celery_defaults()["worker_max_memory_per_child"] == 1000 * 1024 * 92 // 100
    with override_settings(CELERY_WORKER_MAX_MEMORY_PER_CHILD=95_000):
        b = tiers.budget()
        assert b is not None
        assert b.emergency == 95_000 * 1024
        assert b.total == pytest.approx(100_000 * 1024, rel=1e-6)


def test_check_acts_in_process_with_cooldown_and_escalation() -> None:
    rss = tiers.current_rss()
    # A budget this process is already over by the warning tier only.
    budget_mb = max(64, int(rss / MIB / 0.85))
    with override_settings(HMS_TASKS_MEMORY_BUDGET_MB=budget_mb, HMS_TASKS_MEMORY_COOLDOWN=60):
        hooks.state().last_tier = None
        hooks.state().last_action.clear()
        event = hooks.check(trigger="task", task="hms.test.whoami")
        assert event is not None
        assert event["tier"] in ("warning", "critical")
        assert event["pid"] == os.getpid()
        assert event["rss_before"] > 0
        assert event["rss_after"] > 0
        assert hooks.events(last=1)[0] == event
        # The same tier again within the cooldown does nothing.
        if tiers.classify(tiers.current_rss(), tiers.budget()) == event["tier"]:  # type: ignore[arg-type]
            assert hooks.check(trigger="task") is None
    with override_settings(HMS_TASKS_MEMORY_BUDGET_MB=0):
        assert hooks.check(trigger="task") is None


def test_clear_process_state_runs_registered_hooks() -> None:
    calls: list[int] = []
    tiers.register_cleanup(lambda: calls.append(1))
    try:
        assert tiers.clear_process_state() >= 5
        assert calls == [1]
    finally:
        tiers._cleanups.clear()


def test_sweep_outside_a_pool_measures_this_process() -> None:
    rows, total = sweeping.nudge_siblings(only_over_tier=True)
    assert [r["pid"] for r in rows] == [os.getpid()]
    assert total == tiers.budget().total  # type: ignore[union-attr]


def test_a_long_snapshot_window_is_waited_out_in_hops_below_the_visibility_timeout() -> None:
    """A 10-minute window: the finish phase goes out with the longest countdown allowed and,
    arriving early, sends itself again; once due, it compares."""
    import base64
    import json
    import time
    from datetime import datetime

    from celery.utils.nodenames import worker_direct

    from hms_tasks import nodes, store
    from hms_tasks.celery import max_countdown
    from hms_tasks.memory.tasks import snapshot as snapshot_task

    node = nodes.current()  # this process: the task runs here without forwarding itself
    queue = worker_direct(node).name
    hop = max_countdown(memory_names.MEMORY_SNAPSHOT)
    assert 0 < hop < 600

    def finish_messages() -> list[tuple[dict[str, Any], float]]:
        out = []
        for raw in store.client().lrange(queue, 0, -1):
            msg = json.loads(raw)
            wait = datetime.fromisoformat(msg["headers"]["eta"]).timestamp() - time.time()
            _, kwargs, _ = json.loads(base64.b64decode(msg["body"]))  # [args, kwargs, embed]
            out.append((kwargs, wait))
        store.client().delete(queue)
        return out

    started = snapshot_task.run(node=node, seconds=600)
    [(kwargs, wait)] = finish_messages()
    assert (kwargs["phase"], kwargs["snapshot_id"]) == ("finish", started["id"])
    assert hop - 2 <= wait <= hop

    # The finish phase, early: it sends itself again and compares nothing yet.
    early = snapshot_task.run(node=node, seconds=600, phase="finish",
                              snapshot_id=started["id"])
    assert early["processes_asked"] == 0
    assert early["finish_in_s"] > 600 - hop - 5
    [(kwargs, wait)] = finish_messages()
    assert kwargs["snapshot_id"] == started["id"]
    assert hop - 2 <= wait <= hop

    # Once due (announced as over), it compares and sends nothing more.
    snapshot.announce(started["id"], node=node, seconds=600, now=time.time() - 600)
    done = snapshot_task.run(node=node, seconds=600, phase="finish", snapshot_id=started["id"])
    assert "finish_in_s" not in done
    assert done["phase"] == "finish"
    assert finish_messages() == []
    directive = json.loads(store.client().get(store.key("memory", "trace", node)))
    assert directive["phase"] == "finish"
