"""The one validation layer: pydantic v2 models and types, and error lines that never quote values.

Settings (``HMS_TASKS_*``), task parameters and load-test definitions are all checked by pydantic
models; :func:`problems` turns a :class:`pydantic.ValidationError` into one line per fault,
naming where it is (``HMS_TASKS_ALERT_RULES['cpu_high']['threshold']``, ``limit``) and what is
allowed. pydantic's own ``str(exc)`` quotes the input value, and a value might be patient data or
a secret, so nothing here ever reads ``input``; a mapping key that is not a plain identifier is
shown as ``[…]`` for the same reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import ValidationError

__all__ = ["describe", "location", "problems"]

_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# Error types whose message pydantic builds from the input (a tag, a JSON fragment): their
# message is replaced by the type alone.
_QUOTING_TYPES = {"union_tag_invalid", "json_invalid", "url_syntax_violation", "url_parsing"}
_PREFIXES = ("Value error, ", "Assertion failed, ")


def location(loc: Iterable[Any]) -> str:
    """``('rules', 'cpu_high', 0)`` -> ``['rules']['cpu_high'][0]`` (keys that could be data
    hidden)."""
    out = []
    for part in loc:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif isinstance(part, str) and _PLAIN_KEY.match(part):
            out.append(f"[{part!r}]")
        else:
            out.append("[…]")
    return "".join(out)


def _message(err: Any) -> str:
    kind = err.get("type", "")
    if kind in _QUOTING_TYPES:
        return f"invalid ({kind})"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required"
    msg = str(err.get("msg", kind))
    for prefix in _PREFIXES:
        msg = msg.removeprefix(prefix)
    return msg


def problems(
    exc: ValidationError, *, name: Callable[[tuple[Any, ...]], str] | None = None
) -> list[str]:
    """One line per error of ``exc``: ``<where>: <what is wrong or allowed>``.

    ``name`` renders an error's location (default: the first part as is, the rest as
    subscripts); errors are deduplicated and keep pydantic's order.
    """
    lines: list[str] = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = tuple(err.get("loc", ()))
        if name is not None:
            where = name(loc)
        elif loc:
            head = loc[0] if isinstance(loc[0], str) and _PLAIN_KEY.match(loc[0]) else "…"
            where = f"{head}{location(loc[1:])}"
        else:
            where = ""
        line = f"{where}: {_message(err)}" if where else _message(err)
        if line not in lines:
            lines.append(line)
    return lines


def describe(exc: ValidationError, **kw: Any) -> str:
    """:func:`problems` joined into one message (``; ``-separated)."""
    return "; ".join(problems(exc, **kw))
