"""``hms-tasks memory``: what the memory tiers did, and the results of tracemalloc
comparisons. Mounted on the root CLI by :func:`hms_tasks.cli.mount`.

Exit codes: 0 ok (results shown, or a comparison still running), 1 Redis unreachable or a
comparison that ended without results, 2 bad input (an id that is malformed or unknown).
"""

from __future__ import annotations

import json
import time

import click

from hms_tasks.console import fail, fmt_time, redis_needed, setup, table

__all__ = ["commands", "memory"]


@click.command()
@click.option("--events", "last", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="How many recent memory events (tier actions, child starts and exits).")
@click.option("--snapshot", "snapshot_id", metavar="ID",
              help="Show the results of tracemalloc comparison ID instead.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def memory(last: int, snapshot_id: str | None, as_json: bool) -> None:
    """Show what the memory tiers did (RSS before and after, objects collected, pause), or the
    results of a tracemalloc comparison started with hms.memory.snapshot."""
    setup()
    with redis_needed():
        if snapshot_id is not None:
            _snapshot(snapshot_id, as_json)
        else:
            _events(last, as_json)


def _snapshot(snapshot_id: str, as_json: bool) -> None:
    from hms_tasks.memory import snapshot

    if not snapshot.ID_RE.match(snapshot_id):
        fail("--snapshot: expected the id hms.memory.snapshot returned (8 to 32 lower-case"
              " hex digits)")
    results = snapshot.results(snapshot_id)
    if not results:
        asked = snapshot.meta(snapshot_id)
        if asked is None:
            fail("--snapshot: no tracemalloc comparison has that id (results are kept 7"
                  " days; start one with hms.memory.snapshot)")
        if time.time() > asked["finish_at"] + snapshot.GRACE:
            fail(f"comparison {snapshot_id} on {asked['node']} ended without results (no"
                  " pool child of the node reported: was it restarted?)", 1)
        if as_json:
            click.echo("[]")
        else:
            click.echo(f"comparison {snapshot_id} on {asked['node']} is running; results are"
                       f" due at {fmt_time(asked['finish_at'])}")
        return
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        click.echo(f"pid {r['pid']} on {r['node']}: traced {r['traced_before']:,} ->"
                   f" {r['traced_after']:,} bytes over {r['seconds']:g} s")
        click.echo(table([[s["site"], f"{s['size_diff']:+,}", f"{s['count_diff']:+,}"]
                           for s in r["top"]], ["SITE", "BYTES", "BLOCKS"]))


def _events(last: int, as_json: bool) -> None:
    from hms_tasks.memory import hooks

    events = hooks.events(last=last)
    if as_json:
        click.echo(json.dumps(events, indent=2))
        return
    if not events:
        click.echo("no memory events yet")
        return
    mib = 1024 * 1024
    click.echo(table([[fmt_time(e["at"]), e["node"], str(e["pid"]), e["tier"], e["action"],
                        f"{e['rss_before'] / mib:.1f}", f"{e['rss_after'] / mib:.1f}",
                        f"{e['budget'] / mib:.0f}", str(e["collected"]), f"{e['pause_ms']:.1f}"]
                       for e in events],
                      ["AT", "NODE", "PID", "TIER", "ACTION", "RSS MiB", "AFTER", "BUDGET",
                       "OBJECTS", "PAUSE ms"]))


#: Mounted on ``hms-tasks`` (replacing the core's command of the same name).
commands: list[click.Command] = [memory]
