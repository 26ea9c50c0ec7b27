"""``hms-tasks loadtest``: run, follow, abort, report and list load tests.

Mounted on the root command by :func:`hms_tasks.cli.mount`. Every command checks its input
the way the worker does before anything is sent (exit 2, nothing published).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

import click

from hms_tasks.console import BAD_INPUT, fail, fmt_time, setup, table

__all__ = ["commands", "follow", "loadtest"]


@click.group()
def loadtest() -> None:
    """Distributed load tests: run, follow, abort, report (see docs/loadtest.md)."""


def _run_id(run_id: str) -> str:
    from hms_tasks.loadtest.orchestrate import valid_run_id

    if not valid_run_id(run_id):
        fail("RUN_ID: expected the id `hms-tasks loadtest run` printed")
    return run_id


def follow(run_id: str, *, timeout: float, task_result: Any = None,
           out: TextIO | None = None, interval: float = 1.0) -> dict[str, Any] | None:
    """Follow a run until its report is stored; return the report (None after ``timeout``).

    On a terminal, a progress bar; anywhere else (a pipe, a CI log), one progress line every
    ``interval`` seconds, so the output shows the run as it goes.
    """
    from hms_tasks.loadtest import keys, orchestrate, text

    out = out or sys.stderr
    deadline = time.monotonic() + timeout
    st = None
    while st is None:  # the run task records the run first
        if task_result is not None and task_result.failed():
            exc = task_result.result
            fail(f"the run was refused: {type(exc).__name__}: {exc}")
        st = orchestrate.status(run_id)
        if st is None:
            if time.monotonic() > deadline:
                fail("no such run (is a worker consuming hms.loadtest?)", 1)
            time.sleep(0.2)
    if not out.isatty():
        next_line = 0.0
        while True:
            st = orchestrate.status(run_id) or st
            doc = keys.report(run_id)
            if doc is not None or time.monotonic() >= next_line:
                click.echo(text.progress_line(st), file=out)
                next_line = time.monotonic() + interval
            if doc is not None or time.monotonic() > deadline:
                return doc
            time.sleep(min(0.5, interval))
    steps = 1000
    with click.progressbar(length=steps, label=f"load test {st['test']}", show_eta=False,
                           item_show_func=lambda s: s, file=out) as progress:
        shown = 0
        while True:
            st = orchestrate.status(run_id) or st
            target = int(text.fraction_done(st) * steps)
            progress.update(target - shown, current_item=text.progress_stats(st))
            shown = target
            doc = keys.report(run_id)
            if doc is not None:
                return doc
            if time.monotonic() > deadline:
                return None
            time.sleep(0.5)


@loadtest.command("run")
@click.argument("test_name", metavar="[TEST]", required=False)
@click.option("--file", "file", metavar="PATH", help="A JSON or YAML test definition.")
@click.option("--name", help="Test name (groups runs for the regression check).")
@click.option("--target", help="Target id from HMS_TASKS_LOADTEST_TARGETS (never a URL).")
@click.option("--scenario", metavar="demo|PATH.py",
              help="The shipped demo locustfile, or a locustfile in the scenarios directory.")
@click.option("--endpoint", "endpoints", multiple=True, metavar="'METHOD /path [WEIGHT]'",
              help="A weighted endpoint (repeatable); replaces the scenario.")
@click.option("--users", type=int, help="Simulated users over all shards.")
@click.option("--spawn-rate", type=float, help="Users started per second.")
@click.option("--ramp-up", type=float, help="Seconds to start every user (instead of a rate).")
@click.option("--duration", type=float, help="Seconds of load.")
@click.option("--shards", type=int, help="Worker processes generating load.")
@click.option("--threshold", "thresholds", multiple=True,
              metavar="[ 'METHOD /path:' ]METRIC=VALUE",
              help="p50_ms, p95_ms, p99_ms, error_rate (0-1) or min_rps; repeatable.")
@click.option("--wait", is_flag=True,
              help="Follow the run (a progress bar, or a line a second off a terminal), print"
                   " its report.")
@click.option("--json", "as_json", is_flag=True, help="With --wait: print the report as JSON.")
def loadtest_run(test_name: str | None, file: str | None, name: str | None,
                 target: str | None, scenario: str | None, endpoints: tuple[str, ...],
                 users: int | None, spawn_rate: float | None, ramp_up: float | None,
                 duration: float | None, shards: int | None, thresholds: tuple[str, ...],
                 wait: bool, as_json: bool) -> None:
    """Start a load test: TEST from HMS_TASKS_LOADTEST_TESTS, a --file, flags, or a mix (flags
    win). Checks the definition and the free loadtest workers before anything is sent."""
    setup()
    from hms_tasks.celery import app
    from hms_tasks.errors import InvalidArguments, LoadTestRefused
    from hms_tasks.loadtest import names, orchestrate, settings, spec, text

    s = settings.get()
    base = None
    if test_name is not None:
        if test_name not in s.loadtest_tests:
            fail(f"unknown test {test_name!r}; defined in HMS_TASKS_LOADTEST_TESTS:"
                  f" {', '.join(sorted(s.loadtest_tests)) or 'none'}")
        base = {"name": test_name, **s.loadtest_tests[test_name]}
    definition, problems = text.definition_from(
        base=base, file=file, name=name, target=target, scenario=scenario,
        endpoints=endpoints, users=users, spawn_rate=spawn_rate, ramp_up=ramp_up,
        duration=duration, shards=shards, thresholds=thresholds)
    if base is None and "name" not in definition:
        definition["name"] = "adhoc"
    try:
        if problems:
            raise InvalidArguments(names.RUN, problems)
        test = spec.parse(definition)
        orchestrate.check_capacity(test)
    except InvalidArguments as exc:
        fail("\n  ".join(["invalid load test; nothing was started:", *exc.problems]))
    except LoadTestRefused as exc:
        fail(str(exc))
    result = app.send_task(names.RUN, kwargs={"test": test.to_json()})
    click.echo(f"started load test {test.name}: run {result.id}"
               f" ({text.count(test.users, 'user')}, {text.count(test.shards, 'shard')},"
               f" {test.duration:g} s)")
    if not wait:
        return
    timeout = s.loadtest_start_delay + test.duration + s.loadtest_grace + 60
    doc = follow(result.id, timeout=timeout, task_result=result)
    if doc is None:
        fail(f"no report within {timeout:g} s; see `hms-tasks loadtest status {result.id}`", 1)
    click.echo(json.dumps(doc, indent=2) if as_json else text.report_text(doc))
    if doc["verdict"]["status"] != "passed":
        sys.exit(1)


@loadtest.command("status")
@click.argument("run_id", metavar="RUN_ID")
@click.option("--follow", "follow_run", is_flag=True,
              help="Follow the run to its end (a progress bar, or a line a second off a"
                   " terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def loadtest_status(run_id: str, follow_run: bool, as_json: bool) -> None:
    """Show a run's progress: elapsed time, users, current RPS, requests and failures, per
    shard too."""
    setup()
    from hms_tasks.loadtest import orchestrate, text

    st = orchestrate.status(_run_id(run_id))
    if st is None:
        fail("no such run (runs are kept HMS_TASKS_LOADTEST_KEEP_DAYS days)")
    if follow_run and st["status"] not in ("passed", "failed", "aborted"):
        follow(run_id, timeout=st["end_at"] - time.time() + 120)
        st = orchestrate.status(run_id) or st
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(f"load test {st['test']}  run {run_id}  target {st['target']}")
    click.echo(text.progress_line(st))
    click.echo(table([[str(r["index"]), r["state"], r["node"] or "-", str(r["users"]),
                        str(r["rps"]), str(r["requests"]), str(r["failures"]),
                        r["reason"] or ""] for r in st["shards"]],
                      ["SHARD", "STATE", "NODE", "USERS", "RPS", "REQUESTS", "FAILURES",
                       "REASON"]))


@loadtest.command("abort")
@click.argument("run_id", metavar="RUN_ID")
def loadtest_abort(run_id: str) -> None:
    """Stop every shard of a run (within 5 s); what they measured is kept and merged."""
    setup()
    from hms_tasks.loadtest import orchestrate

    outcome = orchestrate.abort_run(_run_id(run_id))
    if outcome == "unknown":
        fail("no such run")
    click.echo({"asked": "abort requested: every shard stops within 5 s",
                "already asked": "abort was already requested",
                "over": "the run is already over"}[outcome])


@loadtest.command("report")
@click.argument("run_id", metavar="RUN_ID")
@click.option("--html", "html_path", metavar="PATH", help="Write the HTML report to PATH.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def loadtest_report(run_id: str, html_path: str | None, as_json: bool) -> None:
    """Show a run's report: summary, verdict per threshold, regression, endpoints, shards."""
    setup()
    from hms_tasks.loadtest import keys, report, text

    doc = keys.report(_run_id(run_id))
    if doc is None:
        known = keys.run(run_id)
        fail("the run has no report yet (see `hms-tasks loadtest status`)" if known
              else "no such run", 1 if known else BAD_INPUT)
    if html_path is not None:
        with open(html_path, "w", encoding="utf-8") as out:
            out.write(report.render_html(doc))
        click.echo(f"wrote {html_path}", err=True)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    elif html_path is None:
        click.echo(text.report_text(doc))


@loadtest.command("list")
@click.option("--last", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="How many recent runs.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def loadtest_list(last: int, as_json: bool) -> None:
    """List the tests of HMS_TASKS_LOADTEST_TESTS (with any problem) and the recent runs."""
    setup()
    from hms_tasks.errors import InvalidArguments
    from hms_tasks.loadtest import keys, settings, spec

    tests: list[dict[str, Any]] = []
    for name in sorted(settings.get().loadtest_tests):
        try:
            t = spec.configured(name)
            tests.append({"name": name, "target": t.target, "users": t.users,
                          "duration": t.duration, "shards": t.shards, "problems": []})
        except InvalidArguments as exc:
            tests.append({"name": name, "problems": exc.problems})
    runs: list[dict[str, Any]] = []
    for rid in keys.recent_runs(last=last):
        rec = keys.run(rid)
        if rec:
            runs.append({"run_id": rid, "test": rec.get("test"), "status": rec.get("status"),
                         "created_at": float(rec.get("created_at", 0))})
    if as_json:
        click.echo(json.dumps({"tests": tests, "runs": runs}, indent=2))
        return
    click.echo(table([[t["name"], str(t.get("target", "-")), str(t.get("users", "-")),
                        str(t.get("duration", "-")), str(t.get("shards", "-")),
                        "; ".join(t["problems"]) or "ok"] for t in tests],
                      ["TEST", "TARGET", "USERS", "DURATION", "SHARDS", "CHECK"])
               if tests else "no tests in HMS_TASKS_LOADTEST_TESTS")
    click.echo("")
    click.echo(table([[r["run_id"], str(r["test"]), str(r["status"]),
                        fmt_time(r["created_at"])] for r in runs],
                      ["RUN", "TEST", "STATUS", "CREATED"]) if runs else "no runs yet")


commands: list[click.Command] = [loadtest]
