"""What every ``hms-tasks`` command shares: Django set-up, bad-input exits, plain tables.

Exit codes of every command: 0 ok, 1 a task or service failed, 2 bad input (nothing was
published or written). Capabilities' ``cli.py`` modules import these, never ``hms_tasks.cli``
(which mounts them).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click

__all__ = ["BAD_INPUT", "SECONDS", "fail", "fmt_time", "redis_needed", "setup", "table"]

BAD_INPUT = 2


def fail(message: str, code: int = BAD_INPUT) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with ``code`` (2: bad input)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def setup() -> None:
    """Set Django up, on the demo settings (with a warning) unless the HMS names its own."""
    import django

    from hms_tasks import conf

    conf.default_settings_module()
    django.setup()


def fmt_time(ts: float | None) -> str:
    """A local ``YYYY-MM-DD HH:MM:SS``, or ``-``."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def table(rows: list[list[str]], header: list[str]) -> str:
    """Left-aligned columns two spaces apart, the header first."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))
             for r in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


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


#: A finite number of seconds (``--timeout``, ``--countdown``).
SECONDS = _Seconds()


@contextmanager
def redis_needed() -> Iterator[None]:
    """Turn an unreachable Redis into a one-line error (exit 1) instead of a traceback."""
    import redis

    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        fail(f"Redis is unreachable ({type(exc).__name__}); check REDIS_URL", 1)
