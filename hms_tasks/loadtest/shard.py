"""One shard of a load test: a Locust subprocess, supervised from the worker.

The shard task (``hms.loadtest.shard``) claims its slot of the run in Redis, re-checks the
run's definition against this node's own settings (the target's URL comes from *this* node's
``HMS_TASKS_LOADTEST_TARGETS``: a message never carries a URL), starts
``python -m hms_tasks.loadtest.runner`` with its share of the users and the run's common start
instant, and then, until the runner is gone:

- reads the runner's per-second lines and folds them into its statistics;
- once a second, in one MULTI: stores its progress (elapsed, users, current RPS, requests,
  failures), appends the new lines to the run's checkpoint list, and reads the abort flag;
- on abort: SIGTERM to the runner (which stops its users at once and still reports what it
  measured), SIGKILL 3 s later if it is still there;
- at ``end_at`` + ``HMS_TASKS_LOADTEST_GRACE`` the same, whatever happens: a runner never
  outlives its run's bound (and the runner enforces the same bound on itself, and stops when
  its parent dies).

Then it records its result and reason atomically with the run's count of finished shards; the
last shard to finish queues ``hms.loadtest.merge``. A runner that died (killed, crashed) fails
its shard with a reason naming the signal or exit code, and keeps the seconds it reported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hms_tasks
from hms_tasks import nodes
from hms_tasks.errors import ConfigurationError, InvalidArguments
from hms_tasks.loadtest import containment, keys, names, settings, spec
from hms_tasks.loadtest.stats import RunData

__all__ = ["run_shard", "runner_env"]

logger = logging.getLogger(__name__)

#: Seconds between SIGTERM and SIGKILL of a runner that was asked to stop.
KILL_AFTER = 3.0
#: Seconds between progress checkpoints (and abort-flag reads).
CHECKPOINT_EVERY = 1.0
#: Environment variables a runner inherits; secrets (Redis and database URLs, keys) do not.
_ENV_KEPT = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "VIRTUAL_ENV",
             "SYSTEMROOT", "PYTHONPATH")


def runner_env() -> dict[str, str]:
    """The runner's environment: a few harmless variables, and this ``hms_tasks`` importable."""
    env = {k: v for k, v in os.environ.items() if k in _ENV_KEPT}
    root = str(Path(hms_tasks.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


def run_shard(run_id: str, index: int, *,
              on_progress: Callable[[keys.ShardProgress], None] | None = None) -> dict[str, Any]:
    """Run shard ``index`` of run ``run_id`` to its end; returns its summary (state, counts,
    reason). Never raises for a failed load generator: the failure is the shard's result."""
    node = nodes.current()
    now = time.time()
    claim = keys.claim_shard(run_id, index, node=node, now=now)
    if claim == "aborted":
        return _end(run_id, index, state="aborted", data=RunData(), node=node,
                    reason="the run was aborted before this shard started")
    if claim != "ok":
        return {"run_id": run_id, "shard": index, "state": claim}
    record = keys.run(run_id)
    try:
        definition = json.loads(record["spec"])
        test = spec.parse(definition, task=names.SHARD)
        plan = test.plan()[index]
        base_url = spec.target_url(test.target)
        scenario = test.scenario
        locustfile = (str(spec.DEMO_LOCUSTFILE) if isinstance(scenario, spec.DemoScenario)
                      else str(spec.resolve_locustfile(scenario.locustfile))
                      if isinstance(scenario, spec.LocustfileScenario) else None)
    except (InvalidArguments, ConfigurationError, ValueError, KeyError, IndexError) as exc:
        reason = (f"this node's settings refuse the run: {exc}"
                  if isinstance(exc, (InvalidArguments, ConfigurationError))
                  else "this node cannot run the scenario (its locustfile is missing here)")
        return _end(run_id, index, state="failed", data=RunData(), reason=reason, node=node)
    start_at = float(record["start_at"])
    end_at = float(record["end_at"])
    deadline = end_at + settings.get().loadtest_grace
    if now >= end_at:
        return _end(run_id, index, state="missed", data=RunData(), node=node,
                    reason="its message reached a worker after the run's end (every loadtest"
                           " worker process was busy)")
    raw_path: str | None = None
    if settings.get().loadtest_keep_raw:
        workdir = Path(settings.get().loadtest_reports_dir) / run_id
        workdir.mkdir(parents=True, exist_ok=True)
        raw_path = str(workdir / f"shard-{index}.raw")
    config: dict[str, Any] = {
        "run_id": run_id, "shard": index, "host": base_url,
        "scenario": {"kind": test.scenario.kind, **(
            test.scenario.model_dump(mode="json", by_alias=True, exclude_none=True)
            if isinstance(test.scenario, spec.EndpointsScenario) else {})},
        "locustfile": locustfile, "users": plan.users, "spawn_rate": plan.spawn_rate,
        "start_at": start_at, "end_at": end_at, "hard_deadline": deadline,
        "stop_timeout": min(10.0, settings.get().loadtest_grace / 2), "raw_path": raw_path,
    }
    contain = _containment(run_id, index, base_url)
    if isinstance(contain, str):
        return _end(run_id, index, state="failed", data=RunData(), node=node, reason=contain,
                    contained=False)
    return _supervise(run_id, index, config=config, node=node, users=plan.users,
                      start_at=start_at, end_at=end_at, deadline=deadline,
                      on_progress=on_progress, contain=contain)


def _containment(run_id: str, index: int, base_url: str) -> _Contained | str | None:
    """How this shard's runner is contained (HMS_TASKS_LOADTEST_CONTAINMENT): its namespace
    command and target, ``None`` for the Python-level guard only, or why the shard must fail."""
    mode = settings.get().loadtest_containment
    if mode == "off":
        logger.info("load test %s shard %d: HMS_TASKS_LOADTEST_CONTAINMENT is 'off': only the"
                    " runner's Python-level connect guard holds", run_id, index)
        return None
    prefix, why = containment.namespace_command()
    if prefix is None:
        if mode == "required":
            return ("HMS_TASKS_LOADTEST_CONTAINMENT is 'required' and this node cannot contain"
                    f" the load generator: {why}")
        logger.warning("load test %s shard %d: containment is off (%s): only the runner's"
                       " Python-level connect guard holds, which a locustfile using _socket or"
                       " a C extension bypasses", run_id, index, why)
        return None
    try:
        target = containment.target_of(base_url)
    except OSError:
        return "the target's host name does not resolve on this node"
    return _Contained(prefix, target)


@dataclass(frozen=True)
class _Contained:
    prefix: list[str]
    target: containment.Target


def _supervise(run_id: str, index: int, *, config: dict[str, Any], node: str, users: int,
               start_at: float, end_at: float, deadline: float,
               on_progress: Callable[[keys.ShardProgress], None] | None,
               contain: _Contained | None) -> dict[str, Any]:
    data = RunData()
    pending: list[str] = []
    final: dict[str, Any] | None = None
    setup_error: str | None = None
    stop_reason: str | None = None  # why *we* stopped it: "aborted" or "deadline"
    term_at: float | None = None
    killed = False
    dead_at: float | None = None
    last_second: tuple[int, int] = (0, 0)
    runner_pid: int | None = None
    locust_version: str | None = None
    read_fd, write_fd = os.pipe()
    log = tempfile.TemporaryFile()  # noqa: SIM115  (closed in finally)
    command = [sys.executable, "-m", "hms_tasks.loadtest.runner"]
    pass_fds: tuple[int, ...] = (write_fd,)
    connector: containment.Connector | None = None
    theirs: socket.socket | None = None
    if contain is not None:
        # The runner asks for its connections to the target over this pair (see containment).
        ours, theirs = containment.socket_pair()
        connector = containment.Connector(ours, contain.target)
        config = {**config, "connect_fd": theirs.fileno()}  # the same number in the runner
        setup = {**contain.target.to_json(), "out_fd": write_fd}
        command = [*contain.prefix, sys.executable, "-m", "hms_tasks.loadtest.containment",
                   json.dumps(setup)]
        pass_fds = (write_fd, theirs.fileno())
    try:
        proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=log, stderr=log, pass_fds=pass_fds,
            start_new_session=True, env=runner_env(), close_fds=True)
    except OSError as exc:
        os.close(read_fd)
        os.close(write_fd)
        log.close()
        if connector is not None:
            connector.channel.close()
        return _end(run_id, index, state="failed", data=data, node=node,
                    reason=f"the load generator could not be started ({type(exc).__name__})",
                    contained=contain is not None)
    finally:
        if theirs is not None:
            theirs.close()
    if connector is not None:
        connector.start()
    os.close(write_fd)
    assert proc.stdin is not None
    try:
        proc.stdin.write(json.dumps({**config, "out_fd": write_fd}).encode() + b"\n")
        proc.stdin.close()
    except OSError:
        pass  # it died at once; the exit code says why
    keys.save_progress(run_id, index, progress=None, tick_lines=[],
                       fields={"runner_pid": proc.pid, "users": users,
                               "contained": int(contain is not None)})
    selector = selectors.DefaultSelector()
    selector.register(read_fd, selectors.EVENT_READ)
    buffer = b""
    eof = False
    next_checkpoint = time.time() + CHECKPOINT_EVERY
    try:
        while True:
            for _ in selector.select(timeout=0.2):
                chunk = os.read(read_fd, 1 << 16)
                if not chunk:
                    eof = True
                    selector.unregister(read_fd)
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    if not raw.strip():
                        continue
                    try:
                        doc = json.loads(raw)
                    except ValueError:
                        continue
                    kind = doc.get("type")
                    if kind == "tick":
                        data.add_tick(doc)
                        pending.append(raw.decode())
                        n = sum(int(r[0]) for r in doc.get("e", {}).values())
                        last_second = (int(doc.get("u", 0)), n)
                    elif kind == "final":
                        final = doc
                    elif kind == "error":
                        setup_error = str(doc.get("error", "unknown error"))[:300]
                    elif kind == "ready":
                        runner_pid = int(doc.get("pid", proc.pid))
                        locust_version = str(doc.get("locust", ""))[:32] or None
            now = time.time()
            alive = proc.poll() is None
            if eof and not alive:
                break
            if now >= next_checkpoint or (eof and pending):
                total = data.endpoints.values()
                progress: keys.ShardProgress = {
                    "v": keys.RUN_VERSION, "at": now,
                    "elapsed_s": round(max(0.0, now - start_at), 1),
                    "users": last_second[0], "rps": last_second[1],
                    "requests": sum(e.requests for e in total),
                    "failures": sum(e.failures for e in total)}
                fields = {"state": "running"} if now >= start_at and final is None else None
                abort = keys.save_progress(run_id, index, progress=progress, tick_lines=pending,
                                           fields=fields)
                pending = []
                next_checkpoint = now + CHECKPOINT_EVERY
                if on_progress is not None:
                    with contextlib.suppress(Exception):
                        on_progress(progress)
                if abort and stop_reason is None and alive:
                    stop_reason = "aborted"
            if stop_reason is None and alive and now >= deadline:
                stop_reason = "deadline"
            if stop_reason is not None and alive and term_at is None:
                term_at = now
                _send(proc, signal.SIGTERM)
            if term_at is not None and alive and now >= term_at + KILL_AFTER and not killed:
                killed = True
                _send(proc, signal.SIGKILL)
            if not alive and dead_at is None:
                dead_at = now
            if dead_at is not None and now >= dead_at + KILL_AFTER:
                break  # a grandchild holds the pipe open; the runner itself is gone
    finally:
        if proc.poll() is None:  # a time limit or a bug got us here: leave nothing behind
            _send(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        selector.close()
        os.close(read_fd)
        if connector is not None:
            connector.close()
        tail = _tail(log)
        log.close()
    code = proc.wait()
    stopped_at = time.time()
    if pending:
        keys.save_progress(run_id, index, progress=None, tick_lines=pending)
    if final is not None:
        data.started_at = float(final["started_at"])
        data.stopped_at = float(final["stopped_at"])
        data.blocked = int(final.get("blocked", data.blocked))
    else:
        seconds = sorted(data.seconds)
        data.started_at = start_at if seconds else None
        data.stopped_at = min(stopped_at, float(seconds[-1] + 1)) if seconds else None
    check = _check_against_locust(data, final)
    state: keys.ShardState
    if setup_error is not None:
        state, reason = "failed", f"the load generator could not start: {setup_error}"
    elif stop_reason == "aborted":
        state, reason = "aborted", "aborted on request"
    elif final is not None and final.get("reason") == "done" and code == 0:
        state, reason = "finished", "ran its duration"
    elif stop_reason == "deadline":
        state, reason = "failed", (f"still running {settings.get().loadtest_grace} s after the"
                                   " run's end (HMS_TASKS_LOADTEST_GRACE): stopped")
    elif code < 0:
        load = max(0.0, stopped_at - max(start_at, data.started_at or start_at))
        state, reason = "failed", (f"the load generator (pid {runner_pid or proc.pid}) was"
                                   f" killed by {_signal_name(-code)} after {load:.1f} s of"
                                   " load; the seconds it reported are kept")
    else:
        state, reason = "failed", f"the load generator exited with code {code}"
    if state == "failed" and tail:
        logger.warning("load test %s shard %d: %s; runner log tail:\n%s", run_id, index, reason,
                       tail)
    extra = {"stop_requested_at": term_at, "locust": locust_version}
    return _end(run_id, index, state=state, data=data, reason=reason, node=node,
                check=check, stopped_at=stopped_at, contained=contain is not None, **extra)


def _send(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # its own session: users' subprocesses too
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)


def _tail(log: Any, size: int = 4000) -> str:
    try:
        log.seek(0, os.SEEK_END)
        end = log.tell()
        log.seek(max(0, end - size))
        return str(log.read().decode(errors="replace"))
    except OSError:
        return ""


def _check_against_locust(data: RunData, final: dict[str, Any] | None) -> str:
    """``ok`` when the per-second lines add up to Locust's own cumulative counters and
    histograms, ``partial`` without a final line, ``mismatch`` otherwise (logged)."""
    if final is None:
        return "partial"
    own = final.get("locust") or {}
    for key, ep in data.endpoints.items():
        theirs = own.get(key)
        if theirs is None or int(theirs["n"]) != ep.requests or int(theirs["f"]) != ep.failures \
                or {int(b): int(c) for b, c in theirs["hist"].items()} != ep.hist:
            logger.error("load test shard statistics differ from Locust's for %s", key)
            return "mismatch"
    if set(own) - set(data.endpoints):
        return "mismatch"
    return "ok"


def _end(run_id: str, index: int, *, state: keys.ShardState, data: RunData, reason: str,
         node: str, check: str = "partial", stopped_at: float | None = None,
         contained: bool | None = None, **extra: Any) -> dict[str, Any]:
    requests = sum(e.requests for e in data.endpoints.values())
    failures = sum(e.failures for e in data.endpoints.values())
    result = {**data.to_json(), "check": check}
    fields: dict[str, Any] = {"result": json.dumps(result, separators=(",", ":")),
                              "reason": reason, "stopped_at": stopped_at or time.time(),
                              "requests": requests, "failures": failures, **{
                                  k: v for k, v in extra.items() if v is not None}}
    if contained is not None:
        fields["contained"] = int(contained)
    if keys.finish_shard(run_id, index, state=state, fields=fields, now=time.time()) == 1:
        _queue_merge(run_id)
    return {"run_id": run_id, "shard": index, "node": node, "state": state,
            "requests": requests, "failures": failures, "reason": reason, "check": check,
            "contained": contained}


def _queue_merge(run_id: str) -> None:
    from hms_tasks.celery import app

    app.send_task(names.MERGE, kwargs={"run_id": run_id}, ignore_result=True)
