"""``hms-tasks deadletter``: the messages workers refused, newest first (never their bodies)."""

from __future__ import annotations

import json
import time

import click

from hms_tasks import deadletter

__all__ = ["commands", "deadletter_command"]


@click.command("deadletter")
@click.option("--last", type=click.IntRange(1, deadletter.MAX_ENTRIES), default=50,
              show_default=True, help="How many of the newest entries to show.")
@click.option("--json", "as_json", is_flag=True, help="Print entries and the total as JSON.")
def deadletter_command(last: int, as_json: bool) -> None:
    """Show task messages that workers dead-lettered: malformed, unknown task, or a content
    type other than JSON. Entries hold the reason, queue, id and time, never the body."""
    entries = deadletter.entries(last=last)
    total = deadletter.total()
    if as_json:
        click.echo(json.dumps({"total": total, "entries": entries}, indent=2))
        return
    click.echo(f"{total} message(s) dead-lettered in all; newest {len(entries)}:")
    for e in entries:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"]))
        click.echo(f"  {at}  {e['queue'] or '?':<16} {e['id'] or '-':<38} "
                   f"{e['task'] or '-':<28} {e['reason']}")


commands: list[click.Command] = [deadletter_command]
