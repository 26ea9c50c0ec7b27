"""``hms-tasks``: the command line of hms-tasks.

Commands are thin: they parse invocation knobs and call the same functions the tasks use.
Exit codes: 0 ok, 1 a task or service failed, 2 bad input (nothing was published or written).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import click

__all__ = ["main"]

BAD_INPUT = 2


def _fail(message: str, code: int = BAD_INPUT) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _setup() -> None:
    import django

    # As `celery -A hms_tasks` does: the demo settings unless the HMS names its own.
    from hms_tasks import conf

    conf.default_settings_module()
    django.setup()


def _plugin_commands() -> dict[str, Any]:
    """Entry points of the group ``hms_tasks.commands``, by command name (not loaded)."""
    from importlib.metadata import entry_points

    return {entry.name: entry for entry in entry_points(group="hms_tasks.commands")}


class _RootGroup(click.Group):
    """The root command: the core's commands, every capability's (``hms_tasks.<capability>.
    cli.commands``, mounted on first use), and commands of installed packages (entry point
    group ``hms_tasks.commands``: the demo's ``run`` and ``seed`` come this way), loaded only
    when one is called or listed, so the library never imports the demo."""

    _mounted = False

    def _mount(self) -> None:
        if not self._mounted:
            self._mounted = True
            mount(self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._mount()
        return sorted({*super().list_commands(ctx), *_plugin_commands()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._mount()
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in (plugins := _plugin_commands()):
            command = plugins[cmd_name].load()
            self.add_command(command, cmd_name)
        return command


@click.group(cls=_RootGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """hms-tasks: Celery workers that keep a Django HMS fast."""


def hms_tasks_registry() -> dict[str, Any]:
    """Registered hms tasks by name (importing every capability's task module)."""
    from hms_tasks.celery import app, load_tasks

    load_tasks(app)
    return {n: t for n, t in app.tasks.items() if n.startswith("hms.")}


def build_kwargs(task: Any, pairs: Sequence[str], raw_json: str | None) -> dict[str, Any]:
    """Arguments from ``--arg k=v`` pairs and a ``--json`` object, coerced by the task's
    parameter annotations and checked against its signature (raises InvalidArguments)."""
    from hms_tasks.errors import InvalidArguments
    from hms_tasks.params import coerce_text

    sig = task.hms_signature
    params = sig.by_name()
    kwargs: dict[str, Any] = {}
    problems: list[str] = []
    if raw_json is not None:
        try:
            loaded = json.loads(raw_json)
        except ValueError:
            loaded = None
        if not isinstance(loaded, dict):
            problems.append("--json: expected a JSON object of argument names to values")
        else:
            kwargs.update(loaded)
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            problems.append("--arg: expected NAME=VALUE")
            continue
        if name in kwargs:
            problems.append(f"{name}: given twice")
            continue
        kwargs[name] = coerce_text(text, params[name].annotation) if name in params else text
    problems += sig.problems((), kwargs)
    if problems:
        raise InvalidArguments(sig.task, problems)
    return kwargs


#: The longest ``dispatch --wait`` (a day): results expire after an hour by default anyway.
MAX_WAIT = 86_400


class _Seconds(click.ParamType[float]):
    """A finite number of seconds: click's FLOAT takes ``nan`` and ``inf``, which pass every
    range check written as comparisons (``nan <= 0`` is False) and make no sense as a wait.
    The error names the option (click adds it) and never echoes the value."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, float) and math.isfinite(value):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            self.fail("expected a finite number of seconds", param, ctx)
        return number


_SECONDS = _Seconds()


@cli.command()
@click.argument("task_name", metavar="TASK")
@click.option("--arg", "pairs", multiple=True, metavar="NAME=VALUE", help="A task argument.")
@click.option("--json", "raw_json", metavar="OBJECT", help="Task arguments as a JSON object.")
@click.option("--queue", help="Publish to this queue instead of the task's own.")
@click.option("--countdown", type=_SECONDS, help="Run no sooner than this many seconds from now.")
@click.option("--wait", is_flag=True, help="Wait for the result and print its summary.")
@click.option("--timeout", type=_SECONDS, default=60.0, show_default=True,
              help="With --wait: give up after this many seconds.")
def dispatch(
    task_name: str,
    pairs: tuple[str, ...],
    raw_json: str | None,
    queue: str | None,
    countdown: float | None,
    wait: bool,
    timeout: float,
) -> None:
    """Run TASK now (or after --countdown), with arguments checked before anything is sent."""
    _setup()
    from hms_tasks import conf, tls
    from hms_tasks.celery import app
    from hms_tasks.errors import ConfigurationError, InvalidArguments

    # Publishing connects to the broker: not over a rediss:// URL that skips verification.
    try:
        problems = tls.problems(app.conf)
    except ConfigurationError as exc:  # a setting out of range: `hms-tasks check` lists all
        problems = str(exc).split("; ")
    if problems:
        _fail("\n  ".join(["configuration (see `hms-tasks check`):", *problems]))
    tasks = hms_tasks_registry()
    if task_name not in tasks:
        _fail(f"unknown task {task_name!r}; known tasks:\n  " + "\n  ".join(sorted(tasks)))
    task = tasks[task_name]
    try:
        kwargs = build_kwargs(task, pairs, raw_json)
    except InvalidArguments as exc:
        _fail("\n  ".join([f"invalid arguments for {task_name}:", *exc.problems]))
    if queue is not None:
        known = sorted(q.name for q in app.conf.task_queues or ())
        if queue not in known:
            _fail(f"--queue: unknown queue {queue!r}; allowed: {', '.join(known)}")
    if countdown is not None:
        vt = conf.get().visibility_timeout
        if not 0 <= countdown < vt:
            _fail(f"--countdown: must be from 0 to below the visibility timeout ({vt} s)")
    if not 0 < timeout <= MAX_WAIT:
        _fail(f"--timeout: must be a number of seconds above 0 and at most {MAX_WAIT}")
    options: dict[str, Any] = {}
    if queue:
        options["queue"] = queue
    if countdown:
        options["countdown"] = countdown
    result = task.apply_async(kwargs=kwargs, **options)
    click.echo(f"sent {task_name} id={result.id}")
    if not wait:
        return
    try:
        value = result.get(timeout=timeout, propagate=False, interval=0.1)
    except Exception as exc:  # celery.exceptions.TimeoutError and connection errors
        _fail(f"no result within {timeout:g} s ({type(exc).__name__}); the task may still run", 1)
    if result.failed():
        # hms tasks fail with hms-tasks errors whose messages carry no data (see base.py).
        _fail(f"{task_name} failed: {type(value).__name__}: {value}", 1)
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def _fmt_time(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _summary_text(summary: dict[str, Any] | None, width: int = 60) -> str:
    if not summary:
        return "-"
    parts = [f"{k}={v}" for k, v in summary.items() if isinstance(v, (int, float, str, bool))]
    text = " ".join(parts) or f"{len(summary)} fields"
    return text if len(text) <= width else text[: width - 1] + "…"


@cli.command()
@click.argument("task_name", metavar="[TASK]", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--last", type=click.IntRange(1, 10_000), default=10, show_default=True,
              help="With TASK: how many recent runs.")
def report(task_name: str | None, as_json: bool, last: int) -> None:
    """Show run reports: the latest run of every task, or the last runs of TASK."""
    _setup()
    from hms_tasks import reports

    if task_name is None:
        runs = [r for n in reports.task_names() if (r := reports.latest(n))]
    else:
        runs = reports.history(task_name, last=last)
        if not runs and task_name not in hms_tasks_registry():
            _fail(f"unknown task {task_name!r}; see `hms-tasks report` for tasks with reports")
    if as_json:
        click.echo(json.dumps(runs, indent=2, sort_keys=True))
        return
    if not runs:
        click.echo("no run reports yet")
        return
    rows = [
        [r["task"], r["outcome"], r["node"], _fmt_time(r["finished_at"]),
         f"{r['duration_ms']:.1f}", r["error"] or _summary_text(r["summary"])]
        for r in runs
    ]
    click.echo(_table(rows, ["TASK", "OUTCOME", "NODE", "FINISHED", "MS", "SUMMARY"]))


@cli.command()
def check() -> None:
    """Run the start-up checks a worker and beat run (settings, schedule, time limits,
    serializers, Redis TLS): one line per problem, exit 2 if there is any."""
    _setup()
    from hms_tasks import capabilities, conf
    from hms_tasks.errors import ConfigurationError

    # Settings first, every section (importing the settings modules registers them): the
    # Celery configuration is built from them, so with one out of range nothing further can
    # be checked; each problem is one line, never a traceback.
    capabilities.modules("settings")
    problems = conf.check_all()
    if not problems:
        from hms_tasks.celery import app, startup_problems

        try:
            problems = startup_problems(app)
        except ConfigurationError as exc:  # a check that reads a section raises on its own
            problems = str(exc).split("; ")
    for p in problems:
        click.echo(f"error: {p}", err=True)
    if problems:
        sys.exit(BAD_INPUT)
    click.echo("ok")


@cli.group()
def loadtest() -> None:
    """Distributed load tests: run, follow, abort, report (see the README)."""


def _run_id(run_id: str) -> str:
    from hms_tasks.loadtest.orchestrate import valid_run_id

    if not valid_run_id(run_id):
        _fail("RUN_ID: expected the id `hms-tasks loadtest run` printed")
    return run_id


def _follow(run_id: str, *, timeout: float, task_result: Any = None) -> dict[str, Any] | None:
    """Show a progress bar until the run's report is stored; return the report."""
    from hms_tasks.loadtest import keys, orchestrate, text

    deadline = time.monotonic() + timeout
    st = None
    while st is None:  # the run task records the run first
        if task_result is not None and task_result.failed():
            exc = task_result.result
            _fail(f"the run was refused: {type(exc).__name__}: {exc}")
        st = orchestrate.status(run_id)
        if st is None:
            if time.monotonic() > deadline:
                _fail("no such run (is a worker consuming hms.loadtest?)", 1)
            time.sleep(0.2)
    steps = 1000
    with click.progressbar(length=steps, label=f"load test {st['test']}", show_eta=False,
                           item_show_func=lambda s: s, file=sys.stderr) as progress:
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
@click.option("--wait", is_flag=True, help="Follow the run with a progress bar, print its report.")
@click.option("--json", "as_json", is_flag=True, help="With --wait: print the report as JSON.")
def loadtest_run(test_name: str | None, file: str | None, name: str | None,
                 target: str | None, scenario: str | None, endpoints: tuple[str, ...],
                 users: int | None, spawn_rate: float | None, ramp_up: float | None,
                 duration: float | None, shards: int | None, thresholds: tuple[str, ...],
                 wait: bool, as_json: bool) -> None:
    """Start a load test: TEST from HMS_TASKS_LOADTEST_TESTS, a --file, flags, or a mix (flags
    win). Checks the definition and the free loadtest workers before anything is sent."""
    _setup()
    from hms_tasks import conf, names
    from hms_tasks.celery import app
    from hms_tasks.errors import InvalidArguments, LoadTestRefused
    from hms_tasks.loadtest import orchestrate, spec, text

    s = conf.get()
    base = None
    if test_name is not None:
        if test_name not in s.loadtest_tests:
            _fail(f"unknown test {test_name!r}; defined in HMS_TASKS_LOADTEST_TESTS:"
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
            raise InvalidArguments(names.LOADTEST_RUN, problems)
        test = spec.parse(definition)
        orchestrate.check_capacity(test)
    except InvalidArguments as exc:
        _fail("\n  ".join(["invalid load test; nothing was started:", *exc.problems]))
    except LoadTestRefused as exc:
        _fail(str(exc))
    result = app.send_task(names.LOADTEST_RUN, kwargs={"test": test.to_json()})
    click.echo(f"started load test {test.name}: run {result.id}"
               f" ({test.users} users, {test.shards} shards, {test.duration:g} s)")
    if not wait:
        return
    timeout = s.loadtest_start_delay + test.duration + s.loadtest_grace + 60
    doc = _follow(result.id, timeout=timeout, task_result=result)
    if doc is None:
        _fail(f"no report within {timeout:g} s; see `hms-tasks loadtest status {result.id}`", 1)
    click.echo(json.dumps(doc, indent=2) if as_json else text.report_text(doc))
    if doc["verdict"]["status"] != "passed":
        sys.exit(1)


@loadtest.command("status")
@click.argument("run_id", metavar="RUN_ID")
@click.option("--follow", is_flag=True, help="Follow the run with a progress bar to its end.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def loadtest_status(run_id: str, follow: bool, as_json: bool) -> None:
    """Show a run's progress: elapsed time, users, current RPS, requests and failures, per
    shard too."""
    _setup()
    from hms_tasks.loadtest import orchestrate, text

    st = orchestrate.status(_run_id(run_id))
    if st is None:
        _fail("no such run (runs are kept HMS_TASKS_LOADTEST_KEEP_DAYS days)")
    if follow and st["status"] not in ("passed", "failed", "aborted"):
        _follow(run_id, timeout=st["end_at"] - time.time() + 120)
        st = orchestrate.status(run_id) or st
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(f"load test {st['test']}  run {run_id}  target {st['target']}")
    click.echo(text.progress_line(st))
    click.echo(_table([[str(r["index"]), r["state"], r["node"] or "-", str(r["users"]),
                        str(r["rps"]), str(r["requests"]), str(r["failures"]),
                        r["reason"] or ""] for r in st["shards"]],
                      ["SHARD", "STATE", "NODE", "USERS", "RPS", "REQUESTS", "FAILURES",
                       "REASON"]))


@loadtest.command("abort")
@click.argument("run_id", metavar="RUN_ID")
def loadtest_abort(run_id: str) -> None:
    """Stop every shard of a run (within 5 s); what they measured is kept and merged."""
    _setup()
    from hms_tasks.loadtest import orchestrate

    outcome = orchestrate.abort_run(_run_id(run_id))
    if outcome == "unknown":
        _fail("no such run")
    click.echo({"asked": "abort requested: every shard stops within 5 s",
                "already asked": "abort was already requested",
                "over": "the run is already over"}[outcome])


@loadtest.command("report")
@click.argument("run_id", metavar="RUN_ID")
@click.option("--html", "html_path", metavar="PATH", help="Write the HTML report to PATH.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def loadtest_report(run_id: str, html_path: str | None, as_json: bool) -> None:
    """Show a run's report: summary, verdict per threshold, regression, endpoints, shards."""
    _setup()
    from hms_tasks.loadtest import keys, report, text

    doc = keys.report(_run_id(run_id))
    if doc is None:
        known = keys.run(run_id)
        _fail("the run has no report yet (see `hms-tasks loadtest status`)" if known
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
    _setup()
    from hms_tasks import conf
    from hms_tasks.errors import InvalidArguments
    from hms_tasks.loadtest import keys, spec

    tests: list[dict[str, Any]] = []
    for name in sorted(conf.get().loadtest_tests):
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
    click.echo(_table([[t["name"], str(t.get("target", "-")), str(t.get("users", "-")),
                        str(t.get("duration", "-")), str(t.get("shards", "-")),
                        "; ".join(t["problems"]) or "ok"] for t in tests],
                      ["TEST", "TARGET", "USERS", "DURATION", "SHARDS", "CHECK"])
               if tests else "no tests in HMS_TASKS_LOADTEST_TESTS")
    click.echo("")
    click.echo(_table([[r["run_id"], str(r["test"]), str(r["status"]),
                        _fmt_time(r["created_at"])] for r in runs],
                      ["RUN", "TEST", "STATUS", "CREATED"]) if runs else "no runs yet")


def mount(group: click.Group) -> None:
    """Add every capability's commands (``hms_tasks.<capability>.cli.commands``)."""
    from hms_tasks import capabilities, deadletter_cli

    for command in deadletter_cli.commands:
        group.add_command(command)
    for module in capabilities.modules("cli"):
        for command in module.commands:
            group.add_command(command)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``hms-tasks`` console script."""
    mount(cli)
    cli.main(args=list(argv) if argv is not None else None, prog_name="hms-tasks")
