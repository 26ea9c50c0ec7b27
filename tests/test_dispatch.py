"""`hms-tasks dispatch` and `hms-tasks report`: checks before publishing, exit codes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner

from hms_tasks import names, store
from hms_tasks.cli import cli
from hms_tasks.metrics import names as metrics_names
from tests import tasks_for_tests  # noqa: F401  (registers hms.test.*)


def run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def queued() -> int:
    client = store.client()
    return sum(int(client.llen(q)) for q in names.ALL_QUEUES)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["hms.nope.task"], "unknown task 'hms.nope.task'"),
        (["hms.test.echo", "--arg", "ids=1,2"], "count: missing (expected int)"),
        (["hms.test.echo", "--arg", "count=three", "--arg", "ids=1"], "count: expected int"),
        (["hms.test.echo", "--arg", "count=1", "--arg", "ids=1", "--arg", "colour=red"],
         "colour: unknown argument (allowed: count, ids, mode, note)"),
        (["hms.test.echo", "--arg", "count=1", "--arg", "ids=1", "--arg", "mode=slow"],
         'mode: expected one of "fast", "full"'),
        (["hms.test.echo", "--json", "[1, 2]"], "--json: expected a JSON object"),
        (["hms.test.echo", "--json", '{"count": 1, "ids": [1]}', "--arg", "count=2"],
         "count: given twice"),
        (["hms.test.echo", "--arg", "count=1", "--arg", "ids=1", "--queue", "elsewhere"],
         "--queue: unknown queue 'elsewhere'; allowed: hms.assets, hms.cache"),
        (["hms.test.echo", "--arg", "count=1", "--arg", "ids=1", "--countdown", "99999"],
         "--countdown: must be from 0 to below the visibility timeout"),
        (["hms.test.echo", "--arg", "count"], "--arg: expected NAME=VALUE"),
        *[(["hms.test.echo", "--arg", "count=1", "--arg", "ids=1", "--wait",
            f"--timeout={value}"], "'--timeout'")
          for value in ("nan", "NaN", "inf", "-inf", "ten")],
        *[(["hms.test.echo", "--arg", "count=1", "--arg", "ids=1", "--wait",
            f"--timeout={value}"], "--timeout: must be a number of seconds above 0")
          for value in ("0", "-1", "1e9")],
        *[(["hms.test.echo", "--arg", "count=1", "--arg", "ids=1", f"--countdown={value}"],
           "'--countdown'") for value in ("nan", "inf", "-inf")],
        (["hms.test.echo", "--arg", "count=1", "--arg", "ids=1", "--countdown=-1"],
         "--countdown: must be from 0 to below the visibility timeout"),
    ],
)
def test_bad_input_exits_2_and_publishes_nothing(args: list[str], message: str) -> None:
    result = run("dispatch", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert queued() == 0


def test_unknown_task_lists_known_tasks() -> None:
    result = run("dispatch", "hms.metrics.collect_everything")
    assert result.exit_code == 2
    assert metrics_names.METRICS_COLLECT_HOST in result.output


def test_valid_dispatch_publishes_one_message() -> None:
    result = run("dispatch", "hms.test.echo", "--arg", "count=2", "--arg", "ids=[1,2]")
    assert result.exit_code == 0, result.output
    assert "sent hms.test.echo id=" in result.output
    assert store.client().llen(names.DEFAULT_QUEUE) == 1


def test_queue_option_routes_message() -> None:
    result = run("dispatch", "hms.test.echo", "--json", '{"count": 1, "ids": []}',
                 "--queue", "hms.metrics")
    assert result.exit_code == 0, result.output
    assert store.client().llen("hms.metrics") == 1
    assert store.client().llen(names.DEFAULT_QUEUE) == 0


def test_dispatch_wait_prints_summary_and_report_shows_it(worker: Any) -> None:
    result = run("dispatch", "hms.test.echo", "--arg", "count=4", "--arg", "ids=7,8,9",
                 "--arg", "mode=full", "--wait", "--timeout", "30")
    assert result.exit_code == 0, result.output
    # stdout alone: the in-process worker logs to stderr, which CliRunner also captures.
    summary = json.loads(result.stdout.split("\n", 1)[1])
    assert summary == {"count": 4, "ids": 3, "mode": "full", "noted": False}

    table = run("report")
    assert table.exit_code == 0
    line = next(ln for ln in table.stdout.splitlines() if ln.startswith("hms.test.echo"))
    assert "success" in line
    assert "count=4" in line

    as_json = json.loads(run("report", "hms.test.echo", "--json", "--last", "5").stdout)
    assert [r["summary"] for r in as_json] == [summary]


def test_dispatch_wait_fails_when_task_fails(worker: Any) -> None:
    result = run("dispatch", "hms.test.boom", "--arg", "row=3", "--wait", "--timeout", "30")
    assert result.exit_code == 1
    # The in-process worker logs to the same stream; the CLI's own words are its error line.
    (error,) = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert "TaskFailed: RuntimeError" in error
    assert "Jane" not in error


def test_report_of_unknown_task_is_refused() -> None:
    result = run("report", "hms.nope.task")
    assert result.exit_code == 2
    assert "unknown task 'hms.nope.task'" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["hms.cache.warm_hot", "--arg", "limit=-5"], "limit: expected int from 1 to 100000"),
        (["hms.cache.stats", "--arg", "window_minutes=0"],
         "window_minutes: expected int from 1 to 1440"),
        (["hms.cache.warm_patients", "--arg", "ids=0,3"],
         "ids: every id must be a positive integer"),
        (["hms.cache.invalidate_tags", "--arg", "tags=[]"],
         "tags: expected list of str with 1 to 10000 items"),
        (["hms.cache.invalidate_tags", "--arg", "tags=Patient 7"], "tags: every tag must look"),
        (["hms.health.check_service", "--arg", "name=radiology"],
         "name: unknown service (allowed: "),
        (["hms.memory.snapshot", "--arg", "node=w1@db-1", "--arg", "seconds=9999"],
         "seconds: expected int from 1 to 600"),
        (["hms.memory.snapshot", "--arg", "node=w1 db"],
         "node: expected a worker node name like name@host"),
        (["hms.memory.sweep_node", "--arg", "sweep=XYZ"], "sweep: expected a sweep id or null"),
        (["hms.metrics.collect_node", "--arg", "sweep=a-b"], "sweep: expected a sweep id"),
        (["hms.loadtest.shard", "--arg", "run_id=r1", "--arg", "index=1000"],
         "index: expected int from 0 to 999"),
        (["hms.loadtest.merge", "--arg", "run_id=a/b"], "run_id: expected a run id"),
        (["hms.loadtest.run", "--arg", "test=no-such-test"], "test: "),
        (["hms.loadtest.run", "--json", '{"test": {"name": "x", "target": "http://10.0.0.1",'
                                        ' "users": 1, "duration": 1}}'], "target"),
    ],
)
def test_dispatch_runs_the_workers_whole_check(args: list[str], message: str) -> None:
    # Ranges and known names live in the tasks' signatures, so the CLI refuses what the worker
    # would: exit 2, the field and what is allowed, nothing published.
    result = run("dispatch", *args)
    assert result.exit_code == 2, result.output
    assert f"invalid arguments for {args[0]}:" in result.output
    assert message in result.output
    assert queued() == 0
