"""``hms-tasks health``: each service's last status, breaker, latency and availability.

Mounted on the ``hms-tasks`` command line by :func:`hms_tasks.cli.mount`. Exit codes: 0 every
service up or degraded (or not checked yet) and no breaker open, 1 a service down or a breaker
open, 2 bad input (an unknown service; nothing contacted).
"""

from __future__ import annotations

import json
import sys

import click

from hms_tasks.console import fail, setup, table
from hms_tasks.console import fmt_time as _time

__all__ = ["commands", "health"]

def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--sweep", "sweep_first", is_flag=True,
              help="Check the services from this process first (registered instances only).")
@click.option("--service", "selected", multiple=True, metavar="NAME",
              help="Only this service (repeatable).")
def health(as_json: bool, sweep_first: bool, selected: tuple[str, ...]) -> None:
    """Each service's last status, breaker, latency and availability (5 min, 1 h, 24 h).

    Reads what the sweeps stored; exit code 1 when a service is down or its breaker open.
    """
    setup()
    from hms_tasks.errors import UnknownService
    from hms_tasks.health import registry, report, sweep

    names_given = list(selected) or None
    try:
        for name in names_given or ():
            registry.get(name)
        if sweep_first:
            if names_given:
                for name in names_given:
                    sweep.check_service(name)
            else:
                sweep.sweep()
        rows = report.status(names_given)
    except UnknownService as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
    elif not rows:
        click.echo("no services in HMS_TASKS_SERVICES (docs/health.md says how to add them)")
    else:
        cells = [
            [r["service"], r["status"], r["breaker"],
             f"{sum(i['status'] in ('up', 'degraded') for i in r['instances'])}"
             f"/{len(r['instances'])}",
             _ms(r["latency_ms"]), _percent(r["windows"]["5m"]["availability"]),
             _percent(r["windows"]["1h"]["availability"]),
             _percent(r["windows"]["24h"]["availability"]), _ms(r["windows"]["1h"]["p95_ms"]),
             _time(r["checked_at"])]
            for r in rows
        ]
        click.echo(table(cells, ["SERVICE", "STATUS", "BREAKER", "INSTANCES", "LAST_MS",
                                  "AVAIL_5M", "AVAIL_1H", "AVAIL_24H", "P95_1H_MS", "CHECKED"]))
    if any(r["status"] == "down" or r["breaker"] == "open" for r in rows):
        sys.exit(1)


#: Mounted on ``hms-tasks`` (replacing a same-named command of the core).
commands: list[click.Command] = [health]
