"""``hms-tasks``: the command line of hms-tasks.

Commands are thin: they parse invocation knobs and call the same functions the tasks use.
Exit codes: 0 ok, 1 a task or service failed, 2 bad input (nothing was published or written).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import click

from hms_tasks.console import BAD_INPUT, SECONDS, fail, fmt_time, setup, table

__all__ = ["main"]

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


#: The longest ``dispatch --wait`` (a day): results expire after an hour by default anyway.
MAX_WAIT = 86_400




@cli.command()
@click.argument("task_name", metavar="TASK")
@click.option("--arg", "pairs", multiple=True, metavar="NAME=VALUE", help="A task argument.")
@click.option("--json", "raw_json", metavar="OBJECT", help="Task arguments as a JSON object.")
@click.option("--queue", help="Publish to this queue instead of the task's own.")
@click.option("--countdown", type=SECONDS, help="Run no sooner than this many seconds from now.")
@click.option("--wait", is_flag=True, help="Wait for the result and print its summary.")
@click.option("--timeout", type=SECONDS, default=60.0, show_default=True,
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
    setup()
    from hms_tasks import tls
    from hms_tasks.celery import app
    from hms_tasks.errors import ConfigurationError, InvalidArguments
    from hms_tasks.params import call_arguments

    # Publishing connects to the broker: not over a rediss:// URL that skips verification.
    try:
        problems = tls.problems(app.conf)
    except ConfigurationError as exc:  # a setting out of range: `hms-tasks check` lists all
        problems = str(exc).split("; ")
    if problems:
        fail("\n  ".join(["configuration (see `hms-tasks check`):", *problems]))
    tasks = hms_tasks_registry()
    if task_name not in tasks:
        fail(f"unknown task {task_name!r}; known tasks:\n  " + "\n  ".join(sorted(tasks)))
    task = tasks[task_name]
    try:
        kwargs = call_arguments(task, pairs, raw_json)
    except InvalidArguments as exc:
        fail("\n  ".join([f"invalid arguments for {task_name}:", *exc.problems]))
    if queue is not None:
        known = sorted(q.name for q in app.conf.task_queues or ())
        if queue not in known:
            fail(f"--queue: unknown queue {queue!r}; allowed: {', '.join(known)}")
    if countdown is not None:
        from hms_tasks.celery import max_countdown

        cap = max_countdown(task_name)
        if not 0 <= countdown <= cap:
            fail(f"--countdown: must be from 0 to below the visibility timeout less {task_name}'s"
                 f" hard time limit and a 10 s margin (at most {max(cap, 0):g} s)")
    if not 0 < timeout <= MAX_WAIT:
        fail(f"--timeout: must be a number of seconds above 0 and at most {MAX_WAIT}")
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
        fail(f"no result within {timeout:g} s ({type(exc).__name__}); the task may still run", 1)
    if result.failed():
        # hms tasks fail with hms-tasks errors whose messages carry no data (see base.py).
        fail(f"{task_name} failed: {type(value).__name__}: {value}", 1)
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


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
    setup()
    from hms_tasks import reports

    if task_name is None:
        runs = [r for n in reports.task_names() if (r := reports.latest(n))]
    else:
        runs = reports.history(task_name, last=last)
        if not runs and task_name not in hms_tasks_registry():
            fail(f"unknown task {task_name!r}; see `hms-tasks report` for tasks with reports")
    if as_json:
        click.echo(json.dumps(runs, indent=2, sort_keys=True))
        return
    if not runs:
        click.echo("no run reports yet")
        return
    rows = [
        [r["task"], r["outcome"], r["node"], fmt_time(r["finished_at"]),
         f"{r['duration_ms']:.1f}", r["error"] or _summary_text(r["summary"])]
        for r in runs
    ]
    click.echo(table(rows, ["TASK", "OUTCOME", "NODE", "FINISHED", "MS", "SUMMARY"]))


@cli.command()
def check() -> None:
    """Run the start-up checks a worker and beat run (settings, schedule, time limits,
    serializers, Redis TLS): one line per problem, exit 2 if there is any."""
    setup()
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
    cli.main(args=list(argv) if argv is not None else None, prog_name="hms-tasks")
