"""Queries: probes audited for N+1 patterns, duplicates, plans and budgets; live N+1 sampling.

The public API for HMS code::

    from hms_tasks.queries import register_probe, audit

    register_probe("api.patients", lambda: Client().get("/api/patients/"), queries=2, ms=200)
    report = audit("api.patients")      # runs it now, in a rolled-back transaction

and, opt-in, the middleware ``hms_tasks.queries.middleware.QuerySamplingMiddleware`` with
``HMS_TASKS_QUERIES_SAMPLE_RATE``. Manual: ``docs/queries.md``. Modules: :mod:`.settings`,
:mod:`.names` (task names), :mod:`.probes` (the registry), :mod:`.fingerprint` (statement
shapes and call sites), :mod:`.audits` (audits, plans, advice, reports in Redis), :mod:`.live`
and :mod:`.middleware` (live sampling), :mod:`.tasks` (Celery), :mod:`.cli` (``hms-tasks
queries``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hms_tasks.capabilities import lazy_exports as _lazy_exports

if TYPE_CHECKING:
    from hms_tasks.queries.audits import ProbeFailed, Report, audit
    from hms_tasks.queries.probes import Probe, register_probe, unregister_probe

__all__ = [
    "Probe",
    "ProbeFailed",
    "Report",
    "audit",
    "register_probe",
    "unregister_probe",
]

_HOME = {
    "Probe": "probes",
    "ProbeFailed": "audits",
    "Report": "audits",
    "audit": "audits",
    "register_probe": "probes",
    "unregister_probe": "probes",
}


__getattr__ = _lazy_exports(__name__, _HOME)
