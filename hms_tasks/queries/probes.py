"""The probes an HMS registers: named callables that exercise one code path each.

A probe is a function taking no argument (a view called through Django's test ``Client`` or
``RequestFactory``, a queryset function, a cache builder) with an optional budget: at most
``queries`` statements and ``ms`` milliseconds. An HMS registers its probes from its
``AppConfig.ready``, as it registers its cache kinds::

    register_probe("api.patients", lambda: Client().get("/api/patients/"), queries=2)

The registry is per process and holds configuration, never data: names are shown in reports,
errors and Flower, so they are short lower-case identifiers.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hms_tasks.errors import InvalidArguments

__all__ = ["Probe", "get", "names", "register_probe", "unregister_probe"]

_NAME_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Probe:
    """One registered probe."""

    name: str
    fn: Callable[[], Any]
    #: Most statements one run may take (None: no budget).
    queries: int | None = None
    #: Most milliseconds one run may take (None: no budget).
    ms: float | None = None


_probes: dict[str, Probe] = {}
_lock = threading.Lock()


def register_probe(name: str, fn: Callable[[], Any], *, queries: int | None = None,
                   ms: float | None = None) -> Probe:
    """Register (or replace) probe ``name``: ``fn()`` exercises one code path.

    ``name``: 1-64 lower-case letters, digits, ``_``, ``.`` or ``-``, starting with a letter
    (it labels a metric series). ``queries``: a budget of statements (an int >= 0);
    ``ms``: a budget of milliseconds (a number > 0). Bad arguments raise
    :class:`~hms_tasks.errors.InvalidArguments` naming the field; nothing is registered.
    """
    problems = []
    if not isinstance(name, str) or not _NAME_RE.match(name):
        problems.append("name: 1-64 lower-case letters, digits, '_', '.' or '-', starting"
                        " with a letter")
    if not callable(fn):
        problems.append("fn: must be a callable taking no argument")
    if queries is not None and (type(queries) is not int or queries < 0):
        problems.append("queries: must be an integer of at least 0, or None")
    if ms is not None and (isinstance(ms, bool) or not isinstance(ms, (int, float))
                           or not 0 < ms < 1e9):
        problems.append("ms: must be a number of milliseconds above 0, or None")
    if problems:
        raise InvalidArguments("queries.register_probe", problems)
    probe = Probe(name=name, fn=fn, queries=queries, ms=None if ms is None else float(ms))
    with _lock:
        _probes[name] = probe
    return probe


def unregister_probe(name: str) -> None:
    """Forget probe ``name`` (nothing if it is not registered)."""
    with _lock:
        _probes.pop(name, None)


def names() -> list[str]:
    """The registered probes' names, sorted."""
    with _lock:
        return sorted(_probes)


def get(name: str) -> Probe:
    """The probe ``name``; an unknown one raises :class:`InvalidArguments` listing the known
    names (configuration) without repeating the one given."""
    with _lock:
        probe = _probes.get(name)
    if probe is None:
        raise InvalidArguments("queries.audit", [
            "probe: unknown probe (allowed: " + (", ".join(names()) or "none") + ")"])
    return probe
