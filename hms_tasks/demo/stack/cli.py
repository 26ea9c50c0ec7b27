"""``hms-tasks run``: the demo stack until Ctrl-C (entry point ``hms_tasks.commands:run``).

Also runnable as ``python -m hms_tasks.demo.stack.cli`` with the same options.
"""

from __future__ import annotations

import sys

import click

__all__ = ["run"]


@click.command()
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
    from hms_tasks.demo.stack import supervisor

    sys.exit(supervisor.run(patients=patients, seed=seed_demo, api_port=api_port,
                            flower_port=flower_port, host=host))


if __name__ == "__main__":
    run(prog_name="hms-tasks run")
