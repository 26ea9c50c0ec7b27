"""The demo HMS JSON API against a real, seeded database (SQLite or PostgreSQL).

Expected values come from independent ORM queries over the same rows, never from the API's own
query functions. ``client`` is pytest-django's test client.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.core import signing
from django.db import connection
from django.db.models import Count
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from hms_tasks.demo.api import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    PATIENT_FIELDS,
    departments_census_of,
    encode_cursor,
)
from hms_tasks.demo.models import Appointment, Department, Encounter, Patient, Practitioner
from hms_tasks.demo.seed import SeedSummary, seed
from tests.demo_fixtures import sqlite_test_directory  # noqa: F401  (autouse)

pytestmark = pytest.mark.django_db

# More than MAX_LIMIT, so a limit=200 page is full and a next page exists.
PATIENTS = 240


@pytest.fixture
def hospital() -> SeedSummary:
    return seed(patients=PATIENTS, seed=11)


def _get(client: Client, url: str, **params: str) -> Any:
    return client.get(url, params)


def _assert_bad_parameter(response: Any, parameter: str, submitted: str) -> dict[str, Any]:
    assert response.status_code == 400
    body: dict[str, Any] = response.json()
    assert body["parameter"] == parameter
    assert body["error"]
    assert body["allowed"]
    # The submitted value may be patient data: it must not come back in the error body.
    assert submitted not in response.content.decode()
    return body


def _new_patient(tag: str) -> Patient:
    return Patient.objects.create(
        mrn=f"T-{tag}", given_name="Test", family_name="Inserted", birth_date="1990-01-01"
    )


# --- /healthz and routing --------------------------------------------------------------------


def test_healthz_answers_ok(client: Client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_unknown_path_answers_json_404(client: Client) -> None:
    response = client.get("/api/nothing-here/")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert "error" in response.json()


def test_writes_are_refused(client: Client, hospital: SeedSummary) -> None:
    response = client.post("/api/patients/", {})
    assert response.status_code == 405
    assert "GET" in response["Allow"]


# --- /api/patients/ --------------------------------------------------------------------------


def test_cursor_pagination_visits_every_row_once_despite_inserts(
    client: Client, hospital: SeedSummary
) -> None:
    existing = set(Patient.objects.values_list("id", flat=True))
    assert len(existing) == PATIENTS
    seen: list[int] = []
    inserted: set[int] = set()
    cursor: str | None = None
    pages = 0
    while True:
        params = {"limit": "7"} if cursor is None else {"limit": "7", "cursor": cursor}
        response = _get(client, "/api/patients/", **params)
        assert response.status_code == 200
        body = response.json()
        seen.extend(row["id"] for row in body["results"])
        pages += 1
        # Rows registered while the client pages, before it asks for the next page.
        if pages % 2:
            inserted.add(_new_patient(f"p{pages}").id)
        cursor = body["next"]
        if cursor is None:
            break
        assert pages < 200, "pagination does not terminate"
    assert len(seen) == len(set(seen)), "a row came twice"
    assert existing <= set(seen), "an existing row was skipped"
    assert seen == sorted(seen)
    # Inserted rows got larger ids, so they show up on later pages rather than shifting rows;
    # only the one added after the last page can be missing.
    assert set(seen) - existing <= inserted
    assert len(inserted - set(seen)) <= 1


def test_first_page_has_default_limit_and_fields(client: Client, hospital: SeedSummary) -> None:
    body = client.get("/api/patients/").json()
    assert len(body["results"]) == DEFAULT_LIMIT
    first = Patient.objects.order_by("id").first()
    assert first is not None
    row = body["results"][0]
    assert row["id"] == first.id
    assert row["mrn"] == first.mrn
    assert row["birth_date"] == first.birth_date.isoformat()
    # The free-text columns stay out of the list unless asked for.
    assert "notes" not in row
    assert "allergies" not in row
    assert body["next"]


def test_limit_above_cap_is_clamped(client: Client, hospital: SeedSummary) -> None:
    for raw in ("201", "100000", "9" * 40):
        body = _get(client, "/api/patients/", limit=raw).json()
        assert len(body["results"]) == MAX_LIMIT
        assert body["next"] is not None


def test_last_page_has_no_next(client: Client, hospital: SeedSummary) -> None:
    last_id = Patient.objects.order_by("-id").values_list("id", flat=True)[1]
    body = _get(client, "/api/patients/", cursor=encode_cursor(last_id), limit="5").json()
    assert [row["id"] for row in body["results"]] == [
        Patient.objects.order_by("-id").values_list("id", flat=True)[0]
    ]
    assert body["next"] is None


def test_page_query_count_does_not_grow_with_limit(client: Client, hospital: SeedSummary) -> None:
    counts = []
    for limit in ("5", "200"):
        with CaptureQueriesContext(connection) as queries:
            response = _get(client, "/api/patients/", limit=limit, fields=",".join(PATIENT_FIELDS))
        assert response.status_code == 200
        assert len(response.json()["results"]) == int(limit)
        counts.append(len(queries))
    assert counts[0] == counts[1] == 1


def test_fields_selects_columns_and_always_includes_id(
    client: Client, hospital: SeedSummary
) -> None:
    body = _get(client, "/api/patients/", fields="family_name, created_at", limit="20").json()
    expected = {
        p.id: (p.family_name, p.created_at.isoformat())
        for p in Patient.objects.order_by("id")[:20].only("family_name", "created_at")
    }
    assert len(body["results"]) == 20
    for row in body["results"]:
        assert list(row) == ["id", "family_name", "created_at"]
        assert (row["family_name"], row["created_at"]) == expected[row["id"]]


@pytest.mark.parametrize("field", ["phone", "email", "address", "allergies", "notes"])
def test_the_list_offers_no_sensitive_field(
    client: Client, hospital: SeedSummary, field: str
) -> None:
    body = _assert_bad_parameter(
        _get(client, "/api/patients/", fields=f"mrn,{field}"), "fields", "ZQX41"
    )
    assert field not in body["allowed"]
    assert field not in PATIENT_FIELDS


@pytest.mark.parametrize("fields", ["mrn,ssn_ZQX41", "password_ZQX41", "id,MRN_ZQX41"])
def test_unknown_field_is_rejected_with_the_allowed_list(
    client: Client, hospital: SeedSummary, fields: str
) -> None:
    body = _assert_bad_parameter(_get(client, "/api/patients/", fields=fields), "fields", "ZQX41")
    assert body["allowed"] == list(PATIENT_FIELDS)


def test_empty_fields_is_rejected(client: Client, hospital: SeedSummary) -> None:
    _assert_bad_parameter(_get(client, "/api/patients/", fields=" , "), "fields", "ZQX41")


@pytest.mark.parametrize("limit", ["ZQX-limit", "-73921", "00000", "12.5", "1e3", "", " 7"])
def test_bad_limit_is_rejected_without_echo(
    client: Client, hospital: SeedSummary, limit: str
) -> None:
    response = _get(client, "/api/patients/", limit=limit)
    _assert_bad_parameter(response, "limit", limit if len(limit) > 2 else "ZQX")


def test_bad_cursor_is_rejected_without_echo(client: Client, hospital: SeedSummary) -> None:
    genuine = client.get("/api/patients/", {"limit": "3"}).json()["next"]
    forged_payload = signing.Signer(salt="another-purpose").sign_object({"after": 3})
    tampered = genuine[:-1] + ("A" if genuine[-1] != "A" else "B")
    for cursor in ("ZQXnot-a-cursor", tampered, forged_payload, "x" * 5000):
        response = _get(client, "/api/patients/", cursor=cursor)
        _assert_bad_parameter(response, "cursor", cursor)


# --- /api/patients/<id>/ ---------------------------------------------------------------------


def test_patient_summary_matches_the_database(client: Client, hospital: SeedSummary) -> None:
    busiest = (
        Patient.objects.annotate(n=Count("appointments", distinct=True))
        .order_by("-n", "id")
        .values_list("id", flat=True)
        .first()
    )
    assert busiest is not None
    patient = Patient.objects.get(id=busiest)
    body = client.get(f"/api/patients/{busiest}/").json()
    assert body["id"] == busiest
    assert body["updated_at"] == patient.updated_at.isoformat()
    assert body["patient"]["mrn"] == patient.mrn
    assert body["patient"]["allergies"] == patient.allergies
    assert "notes" not in body["patient"]  # free text stays out of summaries
    active = Encounter.objects.filter(
        patient_id=busiest, status__in=("planned", "admitted")
    ).order_by("admitted_at", "id")
    assert [e["id"] for e in body["active_encounters"]] == [e.id for e in active]
    for item, encounter in zip(body["active_encounters"], active, strict=True):
        assert item["status"] == encounter.status
        assert item["department_id"] == encounter.department_id
        assert item["practitioner_id"] == encounter.practitioner_id
    midnight = timezone.make_aware(
        datetime.combine(timezone.localdate(), datetime.min.time())
    )
    upcoming = Appointment.objects.filter(
        patient_id=busiest, status__in=("booked", "arrived"), scheduled_at__gte=midnight
    ).order_by("scheduled_at", "id")
    assert [a["id"] for a in body["upcoming_appointments"]] == [a.id for a in upcoming]
    assert body["upcoming_appointments"], "the busiest patient has something upcoming"


def test_summaries_of_ids_with_gaps_leave_out_the_patients_between(
        hospital: SeedSummary) -> None:
    """Ids dense enough to be read as one range (every other one, here): the encounters and
    appointments of the patients in between belong to nobody asked for (a KeyError before)."""
    from hms_tasks.demo.api import patient_summaries

    ids = list(Patient.objects.order_by("id").values_list("id", flat=True))
    every_other = ids[::2]
    summaries = patient_summaries(every_other)
    assert sorted(summaries) == every_other
    for pid, summary in summaries.items():
        assert [e["id"] for e in summary["active_encounters"]] == list(
            Encounter.objects.filter(patient_id=pid, status__in=("planned", "admitted"))
            .order_by("admitted_at", "id").values_list("id", flat=True))


def test_patient_summary_query_count_is_constant(client: Client, hospital: SeedSummary) -> None:
    history = Patient.objects.annotate(
        n=Count("encounters", distinct=True) + Count("appointments", distinct=True)
    ).order_by("n", "id")
    quiet, busy = history.first(), history.last()
    assert quiet is not None
    assert busy is not None
    assert busy.n > quiet.n
    counts = []
    for patient in (quiet, busy):
        with CaptureQueriesContext(connection) as queries:
            assert client.get(f"/api/patients/{patient.id}/").status_code == 200
        counts.append(len(queries))
    assert counts[0] == counts[1] == 3


def test_missing_patient_is_json_404(client: Client, hospital: SeedSummary) -> None:
    missing = Patient.objects.order_by("-id").values_list("id", flat=True)[0] + 1000
    for patient_id in (missing, 2**70):
        response = client.get(f"/api/patients/{patient_id}/")
        assert response.status_code == 404
        assert response.json() == {"error": "patient not found"}


# --- /api/practitioners/<id>/appointments/today/ ----------------------------------------------


def _busiest_practitioner_on(day: Any) -> int:
    top = (
        Appointment.objects.filter(scheduled_at__date=day)
        .values("practitioner_id")
        .annotate(n=Count("id"))
        .order_by("-n", "practitioner_id")
        .first()
    )
    assert top is not None, "the seed has no appointments that day"
    return int(top["practitioner_id"])


def test_practitioner_today_lists_todays_appointments(
    client: Client, hospital: SeedSummary
) -> None:
    today = timezone.localdate()
    practitioner_id = _busiest_practitioner_on(today)
    expected = list(
        Appointment.objects.filter(practitioner_id=practitioner_id, scheduled_at__date=today)
        .order_by("scheduled_at", "id")
        .values_list("id", "patient_id")
    )
    with CaptureQueriesContext(connection) as queries:
        body = client.get(f"/api/practitioners/{practitioner_id}/appointments/today/").json()
    assert len(queries) == 2
    assert body["date"] == today.isoformat()
    assert body["count"] == len(expected) > 0
    # Patients by id only: a cached schedule must not carry patient columns (see api.py).
    assert [(a["id"], a["patient"]) for a in body["appointments"]] == [
        (i, {"id": p}) for i, p in expected
    ]


def test_practitioner_day_with_explicit_date(client: Client, hospital: SeedSummary) -> None:
    tomorrow = timezone.localdate() + timedelta(days=1)
    practitioner_id = _busiest_practitioner_on(tomorrow)
    expected = set(
        Appointment.objects.filter(
            practitioner_id=practitioner_id, scheduled_at__date=tomorrow
        ).values_list("id", flat=True)
    )
    body = _get(
        client,
        f"/api/practitioners/{practitioner_id}/appointments/today/",
        date=tomorrow.isoformat(),
    ).json()
    assert body["date"] == tomorrow.isoformat()
    assert {a["id"] for a in body["appointments"]} == expected
    assert expected


@pytest.mark.parametrize(
    "day", ["ZQX-day", "2024-02-30", "24-01-01", "2024-01-01T00:00", "20240101", "0999-01-01", ""]
)
def test_bad_date_is_rejected_without_echo(client: Client, hospital: SeedSummary, day: str) -> None:
    practitioner = Practitioner.objects.order_by("id").first()
    assert practitioner is not None
    response = _get(client, f"/api/practitioners/{practitioner.id}/appointments/today/", date=day)
    _assert_bad_parameter(response, "date", day if day else "ZQX")


def test_missing_practitioner_is_json_404(client: Client, hospital: SeedSummary) -> None:
    missing = Practitioner.objects.order_by("-id").values_list("id", flat=True)[0] + 1
    response = client.get(f"/api/practitioners/{missing}/appointments/today/")
    assert response.status_code == 404
    assert response.json() == {"error": "practitioner not found"}


# --- /api/departments/census/ ----------------------------------------------------------------


def test_census_matches_an_independent_count(client: Client, hospital: SeedSummary) -> None:
    with CaptureQueriesContext(connection) as queries:
        body = client.get("/api/departments/census/").json()
    # The department ids, then one batch build of every census (the cache was cold) ...
    assert len(queries) == 3
    with CaptureQueriesContext(connection) as queries:
        again = client.get("/api/departments/census/").json()
    # ... and only the ids once the censuses are cached.
    assert len(queries) == 1
    assert again == body
    census = {row["code"]: row for row in body["results"]}
    assert set(census) == set(Department.objects.values_list("code", flat=True))

    counted = Counter(Encounter.objects.values_list("department__code", "kind", "status"))
    for department in Department.objects.all():
        row = census[department.code]
        admitted = Encounter.objects.filter(
            department=department,
            kind=Encounter.Kind.INPATIENT,
            status=Encounter.Status.ADMITTED,
            discharged_at__isnull=True,
        ).count()
        assert row["admitted_inpatients"] == admitted
        assert row["beds"] == department.beds
        if department.beds:
            assert row["occupancy"] == round(admitted / department.beds, 3)
            assert admitted <= department.beds
        else:
            assert row["occupancy"] is None
        for kind, statuses in row["encounters"].items():
            for status, n in statuses.items():
                assert n == counted[(department.code, kind, status)]
    assert sum(r["admitted_inpatients"] for r in census.values()) == hospital["admitted_inpatients"]
    assert hospital["admitted_inpatients"] > 0
    total = sum(n for r in census.values() for s in r["encounters"].values() for n in s.values())
    assert total == Encounter.objects.count()


def test_single_department_census_equals_its_row_in_the_list(
    client: Client, hospital: SeedSummary
) -> None:
    fullest = (
        Encounter.objects.filter(status=Encounter.Status.ADMITTED)
        .values("department_id")
        .annotate(n=Count("id"))
        .order_by("-n", "department_id")
        .first()
    )
    assert fullest is not None
    ward = Department.objects.get(id=fullest["department_id"])
    listed = next(
        row
        for row in client.get("/api/departments/census/").json()["results"]
        if row["id"] == ward.id
    )
    with CaptureQueriesContext(connection) as queries:
        single = client.get(f"/api/departments/{ward.id}/census/").json()
    assert len(queries) == 0  # the list call cached it
    assert single == listed
    assert single["admitted_inpatients"] > 0


def test_census_of_some_departments_equals_their_rows_in_the_list(
    client: Client, hospital: SeedSummary
) -> None:
    listed = {row["id"]: row for row in client.get("/api/departments/census/").json()["results"]}
    wanted = sorted(listed)[::3]
    missing = max(listed) + 1
    with CaptureQueriesContext(connection) as queries:
        census = departments_census_of([*wanted, missing, wanted[0]])
    assert len(queries) == 2
    assert sorted(row["id"] for row in census) == wanted
    for row in census:
        # The cached rows carry when they were built; the rest is the same census.
        assert row == {k: v for k, v in listed[row["id"]].items() if k != "updated_at"}


def test_missing_department_is_json_404(client: Client, hospital: SeedSummary) -> None:
    response = client.get("/api/departments/999999/census/")
    assert response.status_code == 404
    assert response.json() == {"error": "department not found"}


# --- Unknown query parameters ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("/api/patients/", ["cursor", "limit", "fields"]),
        ("/api/patients/{patient}/", []),
        ("/api/practitioners/{practitioner}/appointments/today/", ["date"]),
        ("/api/departments/census/", []),
        ("/api/departments/{department}/census/", []),
        ("/healthz", []),
    ],
)
def test_unknown_query_parameter_is_refused_naming_it(
    client: Client, hospital: SeedSummary, url: str, allowed: list[str]
) -> None:
    path = url.format(
        patient=Patient.objects.values_list("id", flat=True).first(),
        practitioner=Practitioner.objects.values_list("id", flat=True).first(),
        department=Department.objects.values_list("id", flat=True).first(),
    )
    response = _get(client, path, limt="ZQX41-Jane-Doe")
    body = _assert_bad_parameter(response, "limt", "ZQX41") if allowed else None
    if body is None:
        assert response.status_code == 400
        body = response.json()
        assert body["parameter"] == "limt"
        assert "ZQX41" not in response.content.decode()
    assert body["allowed"] == allowed
    for name in allowed:
        assert name in body["error"]


def test_a_parameter_name_that_is_not_a_name_is_not_echoed(
    client: Client, hospital: SeedSummary
) -> None:
    response = client.get("/api/patients/?Jane%20Doe%201961-04-02=1")
    assert response.status_code == 400
    assert response.json()["parameter"] == "?"
    assert "Jane" not in response.content.decode()


def test_known_parameters_still_pass(client: Client, hospital: SeedSummary) -> None:
    assert _get(client, "/api/patients/", limit="2", fields="mrn").status_code == 200


# --- A schedule has one shape, whatever the date ------------------------------------------------


def test_schedule_of_another_day_has_the_shape_of_today(
    client: Client, hospital: SeedSummary
) -> None:
    today = timezone.localdate()
    practitioner_id = _busiest_practitioner_on(today)
    url = f"/api/practitioners/{practitioner_id}/appointments/today/"
    current = _get(client, url).json()
    other = _get(client, url, date=(today + timedelta(days=1)).isoformat()).json()
    assert set(other) == set(current)
    assert other["id"] == current["id"] == practitioner_id
    assert datetime.fromisoformat(other["updated_at"]).tzinfo is not None
