"""The demo HMS's query probes: one per API endpoint and one per cache builder.

Registered from the demo's ``AppConfig.ready`` through the public API, as a real HMS would::

    from hms_tasks.queries import register_probe

Each probe picks its subject (the lowest patient, practitioner or department id) with one
query of its own, counted in its budget. Endpoints are requested through Django's test
``Client`` (the whole middleware stack); the endpoints that read through the hms-tasks cache
have their key deleted first, so the probe always exercises the database path (a hit would
run no query and say nothing). Budgets are the statements each path runs today: a change that
adds one makes the audit report the probe over budget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.core.cache import caches
from django.test import Client
from django.utils import timezone

from hms_tasks.demo import cache as demo_cache
from hms_tasks.demo.models import Department, Patient, Practitioner
from hms_tasks.queries import register_probe

__all__ = ["register"]

# The endpoints answer to these hosts only (ALLOWED_HOSTS).
_HOST = "localhost"


def _first(model: Any) -> int:
    found = model.objects.order_by("id").values_list("id", flat=True).first()
    if found is None:
        raise LookupError(f"no {model.__name__} rows: seed the demo first")
    return int(found)


def _get(path: str) -> None:
    response = Client(HTTP_HOST=_HOST).get(path)
    if response.status_code != 200:
        raise RuntimeError(f"{response.status_code} from a probed endpoint")


def _uncached(kind: str, ids: list[int]) -> None:
    day = timezone.localdate().isoformat()
    dated = kind in ("patient", "schedule")
    caches["hms"].delete_many([f"{kind}:{i}:{day}" if dated else f"{kind}:{i}" for i in ids])


def _patient() -> None:
    pid = _first(Patient)
    _uncached("patient", [pid])
    _get(f"/api/patients/{pid}/")


def _practitioner_today() -> None:
    pid = _first(Practitioner)
    _uncached("schedule", [pid])
    _get(f"/api/practitioners/{pid}/appointments/today/")


def _practitioner_other_day() -> None:
    pid = _first(Practitioner)
    _get(f"/api/practitioners/{pid}/appointments/today/?date=2000-01-03")


def _department() -> None:
    did = _first(Department)
    _uncached("census", [did])
    _get(f"/api/departments/{did}/census/")


def _departments() -> None:
    ids = list(Department.objects.order_by("id").values_list("id", flat=True))
    _uncached("census", ids)
    _get("/api/departments/census/")


def _builder(build: Callable[[list[int]], Any],
             hot: Callable[[int], list[int]]) -> Callable[[], None]:
    def probe() -> None:
        build(hot(200))

    return probe


def register() -> None:
    """Register the demo's probes (budgets: statements each path runs, plus slack for time)."""
    register_probe("api.patients", lambda: _get("/api/patients/?limit=200"), queries=1, ms=2000)
    register_probe("api.patient", _patient, queries=4, ms=2000)
    register_probe("api.practitioner_today", _practitioner_today, queries=3, ms=2000)
    register_probe("api.practitioner_day", _practitioner_other_day, queries=3, ms=2000)
    register_probe("api.department_census", _department, queries=3, ms=2000)
    register_probe("api.departments_census", _departments, queries=4, ms=5000)
    register_probe("builder.patient", _builder(demo_cache.build_patients,
                                               demo_cache.hot_patients), queries=5, ms=5000)
    register_probe("builder.schedule", _builder(demo_cache.build_schedules,
                                                demo_cache.hot_practitioners), queries=3, ms=5000)
    register_probe("builder.census", _builder(demo_cache.build_census,
                                              demo_cache.hot_departments), queries=3, ms=5000)
