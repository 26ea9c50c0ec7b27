"""How the demo HMS uses the hms-tasks cache: its payload kinds, their builders, and the models
whose changes invalidate them. A real HMS does the same from its own ``AppConfig.ready``.

Kinds (tags in brackets):

``patient``   a patient summary: the patient, active encounters, appointments from today on
              (key ``patient:<id>:<date>``) [``patient:<id>``]
``schedule``  a practitioner's appointments today (key ``schedule:<id>:<date>``)
              [``practitioner:<id>``]
``census``    a department's census [``department:<id>``]

A payload that depends on the date carries it in its key (``timezone.localdate()``, the same
"today" its builder uses): after midnight a read asks for a new key and misses, instead of
being served yesterday's list of appointments until the TTL.

A payload embeds only columns whose changes reach its tags: the schedule names patients by id,
not by name, because renaming a patient invalidates ``patient:<id>``, not the schedules the
patient appears in. Every builder runs a constant number of queries for any number of ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date, datetime, time, timedelta
from typing import Any

from django.utils import timezone

from hms_tasks.cache import register_kind, register_model
from hms_tasks.demo import api
from hms_tasks.demo.models import Appointment, Department, Encounter, Patient, Practitioner

__all__ = ["build_census", "build_patients", "build_schedules", "register"]

_ACTIVE = (Encounter.Status.PLANNED, Encounter.Status.ADMITTED)
_UPCOMING = (Appointment.Status.BOOKED, Appointment.Status.ARRIVED)


def _day_bounds(day: date) -> tuple[datetime, datetime]:
    start = timezone.make_aware(datetime.combine(day, time.min))
    return start, timezone.make_aware(datetime.combine(day + timedelta(days=1), time.min))


def build_patients(ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Patient summaries (the API's ``/api/patients/<id>/``) for ``ids``: three queries."""
    return {pid: dict(summary) for pid, summary in api.patient_summaries(ids).items()}


def build_schedules(ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Today's schedule of each practitioner in ``ids``: two queries."""
    # Practitioners and appointments keep no change time: the build time stands in.
    now = timezone.now().isoformat()
    return {
        pid: {"id": pid, "updated_at": now, **day}
        for pid, day in api.practitioner_days(ids, timezone.localdate()).items()
    }


def build_census(ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The census of each department in ``ids``: two queries."""
    now = timezone.now().isoformat()
    return {c["id"]: {**c, "updated_at": now} for c in api.departments_census_of(ids)}


def hot_patients(limit: int) -> list[int]:
    """Patients with a booked appointment today or tomorrow, and admitted inpatients."""
    start, _ = _day_bounds(timezone.localdate())
    end = start + timedelta(days=2)
    booked = (
        Appointment.objects.filter(
            scheduled_at__gte=start, scheduled_at__lt=end, status__in=_UPCOMING
        )
        .order_by("scheduled_at")
        .values_list("patient_id", flat=True)[:limit]
    )
    admitted = (
        Encounter.objects.filter(status=Encounter.Status.ADMITTED, kind=Encounter.Kind.INPATIENT)
        .order_by("-admitted_at")
        .values_list("patient_id", flat=True)[:limit]
    )
    return list(dict.fromkeys([*booked, *admitted]))[:limit]


def hot_practitioners(limit: int) -> list[int]:
    """Practitioners with appointments today."""
    start, end = _day_bounds(timezone.localdate())
    return list(
        Appointment.objects.filter(scheduled_at__gte=start, scheduled_at__lt=end)
        .order_by()
        .values_list("practitioner_id", flat=True)
        .distinct()[:limit]
    )


def hot_departments(limit: int) -> list[int]:
    """Every department: there are few, and the census is read all day."""
    return list(Department.objects.order_by("id").values_list("id", flat=True)[:limit])


def _dated(kind: str) -> Callable[[int], str]:
    """Keys ``<kind>:<id>:<today>`` for a kind whose payload lists today's things."""
    return lambda i: f"{kind}:{i}:{timezone.localdate().isoformat()}"


def register() -> None:
    """Register the demo's kinds and models with the hms-tasks cache."""
    register_kind(
        "patient",
        build_many=build_patients,
        tags=lambda i: [f"patient:{i}"],
        hot_ids=hot_patients,
        key_of=_dated("patient"),
    )
    register_kind(
        "schedule",
        build_many=build_schedules,
        tags=lambda i: [f"practitioner:{i}"],
        hot_ids=hot_practitioners,
        key_of=_dated("schedule"),
    )
    register_kind(
        "census",
        build_many=build_census,
        tags=lambda i: [f"department:{i}"],
        hot_ids=hot_departments,
    )
    register_model(Patient, tags=lambda p: [f"patient:{p.pk}"])
    register_model(Practitioner, tags=lambda p: [f"practitioner:{p.pk}"])
    register_model(Department, tags=lambda d: [f"department:{d.pk}"])
    register_model(
        Encounter,
        fields=("patient_id", "department_id"),
        tags=lambda e: [f"patient:{e.patient_id}", f"department:{e.department_id}"],
    )
    register_model(
        Appointment,
        fields=("patient_id", "practitioner_id"),
        tags=lambda a: [f"patient:{a.patient_id}", f"practitioner:{a.practitioner_id}"],
    )
