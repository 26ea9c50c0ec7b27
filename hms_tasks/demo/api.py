"""JSON API of the demo HMS: plain Django views over small, reusable query functions.

The functions (:func:`patient_page`, :func:`patient_summary`, :func:`practitioner_day`,
:func:`departments_census_of`) do the
work and return JSON-ready TypedDicts; a cache layer can call them directly and store what they
return. The views only parse query parameters, call them and wrap the result in a
:class:`~django.http.JsonResponse`.

Every function runs a fixed number of queries whatever the amount of data (``values()`` with
joins, grouped counts), never one per row.

Bad input raises :class:`BadParameter`, which the views turn into HTTP 400 with
``{"error": ..., "parameter": ..., "allowed": ...}``; so does a query parameter the endpoint
does not take (a typo such as ``?limt=5`` must not silently give the default). The message
names the parameter and what it accepts but never repeats the submitted value: a mistyped query
string may hold patient data, and error bodies end up in logs.

Pagination of ``/api/patients/`` is keyset-based: rows come in ``id`` order and the opaque,
signed cursor carries the last id returned. A row inserted while a client pages gets a larger
id (ids only grow), so it can appear on a later page but never shifts existing rows: no
duplicates, no skips. Cursors are signed with ``SECRET_KEY``: they survive restarts, and a
key rotation turns outstanding ones into HTTP 400 (the client starts over).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date, datetime, time, timedelta
from functools import wraps
from typing import Any, Concatenate, Final, ParamSpec, TypedDict

from django.core import signing
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone

from hms_tasks.cache import cached_response, etag_view, get_or_build_many, set_cache_control
from hms_tasks.demo.models import Appointment, Department, Encounter, Patient, Practitioner
from hms_tasks.errors import HmsTasksError

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_PATIENT_FIELDS",
    "MAX_LIMIT",
    "PATIENT_FIELDS",
    "SUMMARY_FIELDS",
    "BadParameter",
    "DepartmentCensus",
    "PatientPage",
    "PatientSummary",
    "PractitionerDay",
    "decode_cursor",
    "departments_census_of",
    "encode_cursor",
    "parse_date",
    "parse_fields",
    "parse_limit",
    "patient_page",
    "patient_summaries",
    "patient_summary",
    "practitioner_day",
    "practitioner_days",
]

#: Page size when ``?limit=`` is absent, and the most one page returns (larger is clamped).
DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 200

#: Patient columns ``?fields=`` may select on the list: what picks a patient out, and no
#: contact details, allergies or free-text notes (a page of 200 patients' phone numbers is a
#: bulk export). One patient's details come from ``/api/patients/<id>/``. ``id`` is always
#: returned.
PATIENT_FIELDS: Final = (
    "id",
    "mrn",
    "given_name",
    "family_name",
    "birth_date",
    "sex",
    "created_at",
    "updated_at",
)
#: Columns of the list when ``?fields=`` is absent: enough to pick a patient.
DEFAULT_PATIENT_FIELDS: Final = (
    "id",
    "mrn",
    "given_name",
    "family_name",
    "birth_date",
    "sex",
    "updated_at",
)

#: Patient columns of a summary: no contact details, no free-text notes.
SUMMARY_FIELDS: Final = (
    "id",
    "mrn",
    "given_name",
    "family_name",
    "birth_date",
    "sex",
    "allergies",
    "updated_at",
)
_ACTIVE_ENCOUNTER: Final = (Encounter.Status.PLANNED, Encounter.Status.ADMITTED)
_UPCOMING_APPOINTMENT: Final = (Appointment.Status.BOOKED, Appointment.Status.ARRIVED)

# Largest id a BigAutoField holds; larger path ids are simply not found (SQLite and PostgreSQL
# would raise on binding them).
_MAX_ID: Final = 2**63 - 1
_CURSOR_SALT: Final = "hms_tasks.demo.api.patients-cursor"
# Long enough for any cursor we issue; longer input is rejected before any work.
_MAX_CURSOR_CHARS: Final = 200
_MAX_FIELDS_CHARS: Final = 1_000
_DATE_RE: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_DIGITS_RE: Final = re.compile(r"[0-9]+")
# Prefixes of the joined columns that _care_item nests under "department" and "practitioner".
_NESTED: Final = ("department_", "practitioner_")
# A query parameter's name is named back in an error only when it looks like one.
_PARAMETER_NAME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,39}")

Scalar = str | int | float | bool | None
Row = dict[str, Scalar]


class BadParameter(HmsTasksError, ValueError):
    """A query parameter (or the matching function argument) is invalid.

    ``parameter`` names it, ``allowed`` describes what it accepts. The message never contains
    the submitted value.
    """

    def __init__(self, parameter: str, message: str, *, allowed: Scalar | list[str]) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.message = message
        self.allowed = allowed

    def as_json(self) -> dict[str, Scalar | list[str]]:
        return {"error": self.message, "parameter": self.parameter, "allowed": self.allowed}


# --- Result shapes ---------------------------------------------------------------------------


class PatientPage(TypedDict):
    results: list[Row]
    #: Cursor of the next page, or None on the last one.
    next: str | None


class PatientSummary(TypedDict):
    id: int
    #: The patient row's ``updated_at``: how fresh this summary is.
    updated_at: str
    patient: Row
    active_encounters: list[Row]
    upcoming_appointments: list[Row]


class PractitionerDay(TypedDict):
    practitioner: Row
    date: str
    count: int
    appointments: list[dict[str, Scalar | Row]]


class DepartmentCensus(TypedDict):
    id: int
    code: str
    name: str
    kind: str
    beds: int
    #: Inpatient encounters with status ``admitted``: the patients in the beds now.
    admitted_inpatients: int
    #: ``admitted_inpatients / beds`` (3 decimals); None for departments without beds.
    occupancy: float | None
    #: Every encounter of the department counted by kind, then status (zeros included).
    encounters: dict[str, dict[str, int]]


# --- Parameter parsing -----------------------------------------------------------------------


def parse_limit(raw: str | None) -> int:
    """``?limit=``: absent gives :data:`DEFAULT_LIMIT`; above :data:`MAX_LIMIT` is clamped."""
    if raw is None:
        return DEFAULT_LIMIT
    allowed = f"an integer from 1; values above {MAX_LIMIT} are clamped to {MAX_LIMIT}"
    if not _DIGITS_RE.fullmatch(raw):
        raise BadParameter("limit", "limit must be a positive integer", allowed=allowed)
    significant = raw.lstrip("0")
    if not significant:
        raise BadParameter("limit", "limit must be at least 1", allowed=allowed)
    # Compare lengths first: int() refuses strings of more than 4,300 digits.
    if len(significant) > len(str(MAX_LIMIT)):
        return MAX_LIMIT
    return min(int(significant), MAX_LIMIT)


def parse_fields(raw: str | None) -> tuple[str, ...]:
    """``?fields=a,b``: a selection from :data:`PATIENT_FIELDS`, ``id`` first and always."""
    if raw is None:
        return DEFAULT_PATIENT_FIELDS
    allowed = list(PATIENT_FIELDS)
    if len(raw) > _MAX_FIELDS_CHARS:
        raise BadParameter("fields", "fields is too long", allowed=allowed)
    names = [name.strip() for name in raw.split(",") if name.strip()]
    if not names:
        raise BadParameter("fields", "fields must name at least one field", allowed=allowed)
    return _check_fields(names)


def _check_fields(names: Iterable[str]) -> tuple[str, ...]:
    selected = ["id"]
    for name in names:
        if name not in PATIENT_FIELDS:
            raise BadParameter(
                "fields",
                "fields names an unknown field; choose from the allowed ones",
                allowed=list(PATIENT_FIELDS),
            )
        if name not in selected:
            selected.append(name)
    return tuple(selected)


def parse_date(raw: str | None) -> date:
    """``?date=YYYY-MM-DD`` (years 1900-2999); absent gives today in the current time zone."""
    if raw is None:
        return timezone.localdate()
    allowed = "a date as YYYY-MM-DD, years 1900 to 2999"
    if not _DATE_RE.fullmatch(raw):
        raise BadParameter("date", "date must be formatted YYYY-MM-DD", allowed=allowed)
    try:
        day = date.fromisoformat(raw)
    except ValueError:
        raise BadParameter("date", "date is not a calendar date", allowed=allowed) from None
    if not 1900 <= day.year <= 2999:
        raise BadParameter("date", "date is out of range", allowed=allowed)
    return day


def encode_cursor(after_id: int) -> str:
    """The opaque cursor of the page after the row ``after_id``: signed, so clients can't
    forge one that walks into arbitrary positions or fails deep in a query."""
    return signing.Signer(salt=_CURSOR_SALT).sign_object({"after": after_id})


def decode_cursor(token: str) -> int:
    """Inverse of :func:`encode_cursor`; anything else raises :class:`BadParameter`."""
    allowed = "the 'next' value of a previous response"
    if len(token) > _MAX_CURSOR_CHARS:
        raise BadParameter("cursor", "cursor is not a valid cursor", allowed=allowed)
    try:
        payload = signing.Signer(salt=_CURSOR_SALT).unsign_object(token)
    except (signing.BadSignature, ValueError):
        raise BadParameter("cursor", "cursor is not a valid cursor", allowed=allowed) from None
    after = payload.get("after") if isinstance(payload, dict) else None
    if type(after) is not int or not 0 <= after <= _MAX_ID:
        raise BadParameter("cursor", "cursor is not a valid cursor", allowed=allowed)
    return after


# --- Query functions -------------------------------------------------------------------------


def patient_page(
    *,
    cursor: str | None = None,
    limit: int = DEFAULT_LIMIT,
    fields: Sequence[str] | None = None,
    using: str = "default",
) -> PatientPage:
    """One page of patients in ``id`` order, after ``cursor`` (None: the first page).

    ``limit`` above :data:`MAX_LIMIT` is clamped; ``fields`` defaults to
    :data:`DEFAULT_PATIENT_FIELDS`. One query: it fetches ``limit + 1`` rows, the extra one
    only telling whether a next page exists.
    """
    if type(limit) is not int or limit < 1:
        raise BadParameter("limit", "limit must be a positive integer", allowed=f"1..{MAX_LIMIT}")
    limit = min(limit, MAX_LIMIT)
    columns = DEFAULT_PATIENT_FIELDS if fields is None else _check_fields(fields)
    after = 0 if cursor is None else decode_cursor(cursor)
    rows = list(
        Patient.objects.using(using)
        .filter(id__gt=after)
        .order_by("id")
        .values(*columns)[: limit + 1]
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return PatientPage(
        results=[_jsonable(row) for row in rows],
        next=encode_cursor(rows[-1]["id"]) if more else None,
    )


def patient_summary(patient_id: int, *, using: str = "default") -> PatientSummary | None:
    """One patient's summary (see :func:`patient_summaries`), or None."""
    return patient_summaries([patient_id], using=using).get(patient_id)


def patient_summaries(ids: Iterable[int], *, using: str = "default") -> dict[int, PatientSummary]:
    """The summary of each patient in ``ids`` (unknown ids left out): the patient's record
    (without contact details and notes), active encounters (planned or admitted, by admission)
    and upcoming appointments (booked or arrived, from today's midnight, by time).

    Three queries for any number of ids; the (patient, status) and (patient, scheduled_at)
    indexes serve them. Departments and practitioners appear by id only, so that a cached
    summary depends on this patient's rows and nothing else (tag ``patient:<id>``). Built for
    throughput: tuples, not model instances or dicts, and only the conversions JSON needs.
    """
    wanted = sorted({i for i in ids if 0 < i <= _MAX_ID})
    if not wanted:
        return {}
    wanted_ids = set(wanted)
    patients: dict[int, dict[str, Scalar]] = {}
    for pid, mrn, given, family, born, sex, allergies, updated in (
        Patient.objects.using(using).filter(_ids_q("id", wanted)).values_list(*SUMMARY_FIELDS)
    ):
        if pid not in wanted_ids:
            continue
        patients[pid] = {
            "id": pid,
            "mrn": mrn,
            "given_name": given,
            "family_name": family,
            "birth_date": born.isoformat(),
            "sex": sex,
            "allergies": allergies,
            "updated_at": updated.isoformat(),
        }
    if not patients:
        return {}
    found = sorted(patients)
    encounters: dict[int, list[Row]] = {pid: [] for pid in found}
    for eid, pid, kind, status, admitted, discharged, department, practitioner in (
        Encounter.objects.using(using)
        .filter(_ids_q("patient_id", found), status__in=_ACTIVE_ENCOUNTER)
        .order_by("admitted_at", "id")
        .values_list(
            "id",
            "patient_id",
            "kind",
            "status",
            "admitted_at",
            "discharged_at",
            "department_id",
            "practitioner_id",
        )
    ):
        if pid not in encounters:
            continue  # a patient between two wanted ids (the dense-range query)
        encounters[pid].append(
            {
                "id": eid,
                "kind": kind,
                "status": status,
                "admitted_at": admitted.isoformat(),
                "discharged_at": discharged.isoformat() if discharged else None,
                "department_id": department,
                "practitioner_id": practitioner,
            }
        )
    since = timezone.make_aware(datetime.combine(timezone.localdate(), time.min))
    appointments: dict[int, list[Row]] = {pid: [] for pid in found}
    for aid, pid, at, minutes, status, department, practitioner in (
        Appointment.objects.using(using)
        .filter(_ids_q("patient_id", found), status__in=_UPCOMING_APPOINTMENT,
                scheduled_at__gte=since)
        .order_by("scheduled_at", "id")
        .values_list(
            "id",
            "patient_id",
            "scheduled_at",
            "duration_minutes",
            "status",
            "department_id",
            "practitioner_id",
        )
    ):
        if pid not in appointments:
            continue
        appointments[pid].append(
            {
                "id": aid,
                "scheduled_at": at.isoformat(),
                "duration_minutes": minutes,
                "status": status,
                "department_id": department,
                "practitioner_id": practitioner,
            }
        )
    return {
        pid: PatientSummary(
            id=pid,
            updated_at=str(patient["updated_at"]),
            patient=patient,
            active_encounters=encounters[pid],
            upcoming_appointments=appointments[pid],
        )
        for pid, patient in patients.items()
    }


def _ids_q(field: str, ids: Sequence[int]) -> Q:
    """``field IN ids``, or for a dense run of ids the range that holds them (the caller drops
    the rows in between): a thousand-parameter ``IN`` costs Django more than the query."""
    low, high = min(ids), max(ids)
    if high - low + 1 <= 2 * len(ids):
        return Q(**{f"{field}__gte": low, f"{field}__lte": high})
    return Q(**{f"{field}__in": ids})


def _care_item(row: Mapping[str, Any], *, drop: Sequence[str] = ()) -> dict[str, Scalar | Row]:
    """Fold the joined department and practitioner columns into nested objects."""
    item: dict[str, Scalar | Row] = {
        key: value
        for key, value in _jsonable(row).items()
        if not key.startswith(_NESTED) and key not in drop
    }
    item["department"] = {
        "id": row["department_id"],
        "code": row["department_code"],
        "name": row["department_name"],
    }
    item["practitioner"] = {
        "id": row["practitioner_id"],
        "staff_number": row["practitioner_staff_number"],
        "given_name": row["practitioner_given_name"],
        "family_name": row["practitioner_family_name"],
    }
    return item


def practitioner_day(
    practitioner_id: int, day: date, *, using: str = "default"
) -> PractitionerDay | None:
    """The appointments of one practitioner on ``day`` (midnight to midnight in the current
    time zone) in time order; None if no such practitioner.

    Patients appear by id only: a cached schedule must not go stale when a patient's record
    changes (that change invalidates the patient's own payload, not every schedule they are
    in). Two queries; the (practitioner, scheduled_at) index serves the second.
    """
    return practitioner_days([practitioner_id], day, using=using).get(practitioner_id)


def practitioner_days(
    ids: Iterable[int], day: date, *, using: str = "default"
) -> dict[int, PractitionerDay]:
    """:func:`practitioner_day` of each practitioner in ``ids``: two queries for any number."""
    wanted = sorted({i for i in ids if 0 < i <= _MAX_ID})
    if not wanted:
        return {}
    practitioners = {
        p["id"]: p
        for p in Practitioner.objects.using(using)
        .filter(id__in=wanted)
        .values("id", "staff_number", "given_name", "family_name", "role", "department_id")
    }
    if not practitioners:
        return {}
    try:
        start = timezone.make_aware(datetime.combine(day, time.min))
        # The next day's midnight, not start + 24 h: days around DST changes are 23 or 25 h.
        end = timezone.make_aware(datetime.combine(day + timedelta(days=1), time.min))
    except OverflowError:
        raise BadParameter("date", "date is out of range", allowed="YYYY-MM-DD") from None
    appointments: dict[int, list[dict[str, Scalar | Row]]] = {pid: [] for pid in practitioners}
    for row in (
        Appointment.objects.using(using)
        .filter(
            practitioner_id__in=list(practitioners), scheduled_at__gte=start, scheduled_at__lt=end
        )
        .order_by("scheduled_at", "id")
        .values(
            "id",
            "practitioner_id",
            "scheduled_at",
            "duration_minutes",
            "status",
            "department_id",
            "patient_id",
        )
    ):
        item: dict[str, Scalar | Row] = {
            k: v for k, v in _jsonable(row).items() if k not in ("patient_id", "practitioner_id")
        }
        item["patient"] = {"id": row["patient_id"]}
        appointments[row["practitioner_id"]].append(item)
    return {
        pid: PractitionerDay(
            practitioner=_jsonable(p),
            date=day.isoformat(),
            count=len(appointments[pid]),
            appointments=appointments[pid],
        )
        for pid, p in practitioners.items()
    }



def departments_census_of(ids: Iterable[int], *, using: str = "default") -> list[DepartmentCensus]:
    """The census of each department in ``ids`` (unknown ids are left out), by code.

    Two queries, however many ids: the batch form a cache warmer wants.
    """
    wanted = sorted({i for i in ids if 0 < i <= _MAX_ID})
    if not wanted:
        return []
    return _census(Department.objects.using(using).filter(id__in=wanted), wanted, using=using)



def _census(
    departments: QuerySet[Department], ids: list[int] | None, *, using: str
) -> list[DepartmentCensus]:
    """Census rows of ``departments``; ``ids`` (None: all) narrows the encounter count."""
    rows = list(departments.order_by("code").values("id", "code", "name", "kind", "beds"))
    if not rows:
        return []
    counts = Encounter.objects.using(using)
    if ids is not None:
        counts = counts.filter(department_id__in=ids)
    matrix: dict[int, dict[str, dict[str, int]]] = {
        row["id"]: {
            kind: dict.fromkeys(Encounter.Status.values, 0) for kind in Encounter.Kind.values
        }
        for row in rows
    }
    # One grouped count; the (department, status, kind) index covers it.
    grouped = counts.order_by().values("department_id", "kind", "status").annotate(n=Count("*"))
    for group in grouped:
        by_kind = matrix.get(group["department_id"])
        if by_kind is not None:
            by_kind.setdefault(group["kind"], {})[group["status"]] = group["n"]
    result: list[DepartmentCensus] = []
    for row in rows:
        encounters = matrix[row["id"]]
        admitted = encounters[Encounter.Kind.INPATIENT][Encounter.Status.ADMITTED]
        beds = row["beds"]
        result.append(
            DepartmentCensus(
                id=row["id"],
                code=row["code"],
                name=row["name"],
                kind=row["kind"],
                beds=beds,
                admitted_inpatients=admitted,
                occupancy=round(admitted / beds, 3) if beds else None,
                encounters=encounters,
            )
        )
    return result


def _jsonable(row: Mapping[str, Any]) -> Row:
    """Dates and datetimes as ISO 8601 strings; other values unchanged."""
    return {
        key: value.isoformat() if isinstance(value, date) else value for key, value in row.items()
    }


# --- Views -----------------------------------------------------------------------------------

_P = ParamSpec("_P")
_View = Callable[Concatenate[HttpRequest, _P], HttpResponse]


def _accepts(*parameters: str) -> Callable[[_View[_P]], _View[_P]]:
    """Declare the query parameters a view takes (below :func:`_json_get`); none by default."""

    def mark(view: _View[_P]) -> _View[_P]:
        view.query_parameters = parameters  # type: ignore[attr-defined]
        return view

    return mark


def _check_query(request: HttpRequest, allowed: Sequence[str]) -> None:
    """Refuse a query parameter the view does not take, naming it (only if it looks like a
    parameter name: the query string may hold anything) and the allowed ones."""
    for name in request.GET:
        if name not in allowed:
            shown = name if _PARAMETER_NAME_RE.fullmatch(name) else "?"
            raise BadParameter(
                shown,
                "unknown query parameter; "
                + (f"this endpoint takes {', '.join(allowed)}" if allowed else
                   "this endpoint takes none"),
                allowed=list(allowed),
            )


def _json_get(view: _View[_P]) -> _View[_P]:
    """Answer only GET/HEAD, refuse unknown query parameters (those not declared with
    :func:`_accepts`), and turn :class:`BadParameter` into HTTP 400."""
    allowed: tuple[str, ...] = getattr(view, "query_parameters", ())

    @wraps(view)
    def wrapper(request: HttpRequest, /, *args: _P.args, **kwargs: _P.kwargs) -> HttpResponse:
        if request.method not in ("GET", "HEAD"):
            response = JsonResponse({"error": "method not allowed"}, status=405)
            response["Allow"] = "GET, HEAD"
            return response
        try:
            _check_query(request, allowed)
            return view(request, *args, **kwargs)
        except BadParameter as error:
            return JsonResponse(error.as_json(), status=400)

    return wrapper


def _not_found(what: str) -> JsonResponse:
    return JsonResponse({"error": f"{what} not found"}, status=404)


@_json_get
def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness of the web process: no database or Redis round trip."""
    return JsonResponse({"status": "ok"})


@_json_get
@_accepts("cursor", "limit", "fields")
def patients(request: HttpRequest) -> JsonResponse:
    """``GET /api/patients/?cursor=&limit=&fields=``: patient data, so ``Cache-Control`` of
    the kind ``patient``; no ETag (the page is not a cached payload)."""
    page = patient_page(
        cursor=request.GET.get("cursor"),
        limit=parse_limit(request.GET.get("limit")),
        fields=parse_fields(request.GET.get("fields")),
    )
    return set_cache_control(JsonResponse(page), "patient")


@_json_get
@etag_view("patient")
def patient(request: HttpRequest, patient_id: int) -> HttpResponse:
    """``GET /api/patients/<id>/``: the patient's summary, read through the hms-tasks cache
    (kind ``patient``), with an ETag: ``If-None-Match`` of it answers 304 from Redis alone
    until the summary changes."""
    response = cached_response(request, "patient", patient_id) if 0 < patient_id <= _MAX_ID \
        else None
    return _not_found("patient") if response is None else response


@_json_get
@_accepts("date")
@etag_view("schedule")
def practitioner_appointments_today(request: HttpRequest, practitioner_id: int) -> HttpResponse:
    """``GET /api/practitioners/<id>/appointments/today/?date=YYYY-MM-DD``: today's schedule
    reads through the cache (kind ``schedule``, with an ETag); other days come from the
    database, in the same shape (``id`` and ``updated_at``, the time it was read, included),
    without one."""
    day = parse_date(request.GET.get("date"))
    response: HttpResponse | None
    if not 0 < practitioner_id <= _MAX_ID:
        response = None
    elif day == timezone.localdate():
        # The payload is the same with or without ?date= of today: one ETag covers both.
        response = cached_response(request, "schedule", practitioner_id)
    else:
        other = practitioner_day(practitioner_id, day)
        response = None if other is None else set_cache_control(JsonResponse(
            {"id": practitioner_id, "updated_at": timezone.now().isoformat(), **other}),
            "schedule")
    return _not_found("practitioner") if response is None else response


@_json_get
@etag_view("census")
def department(request: HttpRequest, department_id: int) -> HttpResponse:
    """``GET /api/departments/<id>/census/``: read through the cache (kind ``census``), with
    an ETag."""
    response = (cached_response(request, "census", department_id)
                if 0 < department_id <= _MAX_ID else None)
    return _not_found("department") if response is None else response


@_json_get
def departments(request: HttpRequest) -> JsonResponse:
    """``GET /api/departments/census/``: every department's census, each through the cache."""
    ids = list(Department.objects.order_by("code").values_list("id", flat=True))
    census = get_or_build_many("census", ids) if ids else {}
    return set_cache_control(
        JsonResponse({"results": [census[i] for i in ids if i in census]}), "census")


def may_revalidate(request: HttpRequest, kind: str, id_: int) -> bool:
    """``HMS_TASKS_CACHE_NOT_MODIFIED_ALLOW`` of the demo: its API has no authentication (it
    serves generated data), so whoever may GET a payload may revalidate it. A real HMS keeps
    the default (an authenticated user) or checks its own permissions here."""
    return True


def bad_request(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    """``handler400`` (a disallowed Host header, for one): JSON without details."""
    return JsonResponse({"error": "bad request"}, status=400)


def not_found(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    """``handler404``: JSON rather than Django's HTML page, for unknown paths too."""
    return _not_found("resource")


def server_error(request: HttpRequest) -> JsonResponse:
    """``handler500``: a JSON body without details (they are in the server log)."""
    return JsonResponse({"error": "internal server error"}, status=500)
