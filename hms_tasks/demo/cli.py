"""``hms-tasks seed``: fill the demo database (entry point ``hms_tasks.commands:seed``).

Also runnable as ``python -m hms_tasks.demo.cli`` with the same options.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import date, datetime
from typing import NoReturn

import click

__all__ = ["seed"]

_BAD_INPUT = 2


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(_BAD_INPUT)


@click.command()
@click.option("--patients", type=int, required=True, help="How many synthetic patients.")
@click.option("--seed", "seed_value", type=int, default=42, show_default=True,
              help="Random seed: the same patients, seed and --today give the same rows.")
@click.option("--today", type=click.DateTime(formats=["%Y-%m-%d"]), default=None,
              help="Anchor date of encounters and appointments (default: today).")
@click.option("--force", is_flag=True, help="Replace the demo rows of a non-empty database.")
@click.option("--if-empty", is_flag=True,
              help="Seed only an empty database; otherwise say so and exit 0 (for start-up).")
def seed(
    patients: int, seed_value: int, today: datetime | None, force: bool, if_empty: bool
) -> None:
    """Migrate the demo HMS database and fill it with deterministic synthetic data."""
    if force and if_empty:
        _fail("--force and --if-empty exclude each other")
    import django

    # The demo's own command: its settings are the natural default here.
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hms_tasks.demo.settings")
    django.setup()
    from hms_tasks.demo import seed as seeding

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


if __name__ == "__main__":
    seed(prog_name="hms-tasks seed")
