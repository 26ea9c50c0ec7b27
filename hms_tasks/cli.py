"""``hms-tasks``: the command line of hms-tasks.

Commands are thin: they parse invocation knobs and call the same functions the tasks use.
Exit codes: 0 ok, 1 a task or service failed, 2 bad input (nothing was published or written).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import date
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
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hms_tasks.demo.settings")
    django.setup()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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


@cli.command()
@click.argument("task_name", metavar="TASK")
@click.option("--arg", "pairs", multiple=True, metavar="NAME=VALUE", help="A task argument.")
@click.option("--json", "raw_json", metavar="OBJECT", help="Task arguments as a JSON object.")
@click.option("--queue", help="Publish to this queue instead of the task's own.")
@click.option("--countdown", type=float, help="Run no sooner than this many seconds from now.")
@click.option("--wait", is_flag=True, help="Wait for the result and print its summary.")
@click.option("--timeout", type=float, default=60.0, show_default=True,
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
    from hms_tasks import conf
    from hms_tasks.celery import app
    from hms_tasks.errors import InvalidArguments

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
    if timeout <= 0:
        _fail("--timeout: must be a positive number of seconds")
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
@click.option("--patients", type=int, required=True, help="How many synthetic patients.")
@click.option("--seed", "seed_value", type=int, default=42, show_default=True,
              help="Random seed: the same patients, seed and --today give the same rows.")
@click.option("--today", type=click.DateTime(formats=["%Y-%m-%d"]), default=None,
              help="Anchor date of encounters and appointments (default: today).")
@click.option("--force", is_flag=True, help="Replace the demo rows of a non-empty database.")
@click.option("--if-empty", is_flag=True,
              help="Seed only an empty database; otherwise say so and exit 0 (for start-up).")
def seed(patients: int, seed_value: int, today: Any, force: bool, if_empty: bool) -> None:
    """Migrate the demo HMS database and fill it with deterministic synthetic data."""
    _setup()
    from hms_tasks.demo import seed as seeding

    if force and if_empty:
        _fail("--force and --if-empty exclude each other")
    anchor: date | None = today.date() if today else None
    try:
        counts = seeding.seed(patients=patients, seed=seed_value, today=anchor, force=force)
    except seeding.SeedRefused as exc:
        if if_empty:
            click.echo("the demo database already has rows; not seeding it again")
            return
        _fail(str(exc))
    except seeding.SeedArgumentError as exc:
        _fail(str(exc))
    click.echo(json.dumps(counts, sort_keys=True))


@cli.command()
def check() -> None:
    """Run the start-up checks a worker and beat run (schedule, time limits, serializers)."""
    _setup()
    from hms_tasks.celery import app, startup_problems

    problems = startup_problems(app)
    for p in problems:
        click.echo(f"error: {p}", err=True)
    if problems:
        sys.exit(1)
    click.echo("ok")


@cli.command()
@click.option("--patients", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Synthetic patients to seed into an empty demo database.")
@click.option("--seed/--no-seed", "seed_demo", default=True, show_default=True,
              help="Seed the demo database when it is empty (it is migrated either way).")
@click.option("--api-port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="Port of the demo HMS JSON API (gunicorn).")
@click.option("--flower-port", type=click.IntRange(1, 65535), default=5555, show_default=True,
              help="Port of Flower.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the API and Flower listen on; beyond loopback Flower needs "
                   "FLOWER_BASIC_AUTH=user:password.")
def run(patients: int, seed_demo: bool, api_port: int, flower_port: int, host: str) -> None:
    """Run the demo stack until Ctrl-C: Redis (found or started), worker, beat, Flower, API."""
    from hms_tasks import supervisor

    sys.exit(supervisor.run(patients=patients, seed=seed_demo, api_port=api_port,
                            flower_port=flower_port, host=host))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``hms-tasks`` console script."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="hms-tasks")
