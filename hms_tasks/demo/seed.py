"""Deterministic synthetic data for the demo HMS.

:func:`seed` fills the ``hms`` tables with a hospital's worth of made-up rows: about twenty
departments, one practitioner per 200 patients (at least ten), and per patient about two
encounters and three appointments spread around ``today`` (a few percent today and tomorrow,
and inpatients still in their beds). Names, addresses and phone numbers come from small built-in
lists and reserved ranges (``example.org``, ``555-01xx``): nothing belongs to a real person.

Determinism: the same ``patients``, ``seed`` and ``today`` (and time zone setting) give the same
rows, ids included. One :class:`random.Random` is consumed in a fixed order, patient by patient,
so batching does not change the draw; ids are assigned here rather than by the database, so they
do not depend on what a sequence handed out before.

Speed: rows are generated in batches and written with ``bulk_create`` inside one transaction;
100,000 patients (about 600,000 rows) take well under a minute on SQLite.

Errors::

    SeedError (HmsTasksError)
    ├── SeedArgumentError (ValueError)   an argument is out of range; names it
    └── SeedRefused                      demo rows exist and ``force`` was not given

Nothing here logs or prints a patient field; only counts.
"""

from __future__ import annotations

import logging
import random
import time as monotonic_clock
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, tzinfo
from typing import Final, TypedDict

from django.core.management import call_command
from django.core.management.color import no_style
from django.db import connections, models, transaction
from django.db.models import F
from django.utils import timezone

from hms_tasks.cache import changed_everything
from hms_tasks.demo.models import Appointment, Department, Encounter, Patient, Practitioner
from hms_tasks.errors import HmsTasksError

__all__ = [
    "MAX_PATIENTS",
    "SeedArgumentError",
    "SeedError",
    "SeedRefused",
    "SeedSummary",
    "seed",
]

logger = logging.getLogger(__name__)

#: Upper bound of ``patients``: beyond it SQLite files and seeding times stop being a demo.
MAX_PATIENTS: Final = 5_000_000

# Patients generated before a flush to the database. Bounded so memory stays flat (about
# 30,000 model instances at a time) whatever ``patients`` is; it does not affect the rows.
_PATIENTS_PER_FLUSH: Final = 5_000
# Rows per INSERT statement. SQLite's backend lowers it further to fit its 999-variable limit.
_INSERT_BATCH: Final = 2_000

# SQLite page cache while seeding, negative: in KiB (256 MiB).
_SQLITE_CACHE_KIB: Final = -262_144

# Demo tables, parents first: the order rows are inserted in.
_MODELS: Final[tuple[type[models.Model], ...]] = (
    Department,
    Practitioner,
    Patient,
    Encounter,
    Appointment,
)


class SeedError(HmsTasksError):
    """Base class of the seeder's errors."""


class SeedArgumentError(SeedError, ValueError):
    """An argument of :func:`seed` is invalid; the message names it (never its value)."""


class SeedRefused(SeedError):
    """The database already holds demo rows and ``force`` was not given."""


class SeedSummary(TypedDict):
    """Counts of what :func:`seed` wrote (and deleted first, with ``force``)."""

    departments: int
    practitioners: int
    patients: int
    encounters: int
    appointments: int
    #: Inpatient encounters still ``admitted`` at noon of ``today``.
    admitted_inpatients: int
    #: Appointments scheduled on ``today``.
    appointments_today: int
    #: Demo rows deleted first (``force=True`` only).
    deleted: int
    seconds: float


# --- Built-in vocabularies -------------------------------------------------------------------

# (code, name, kind, bed weight). Bed weights are relative ward sizes; beds scale with patients.
_DEPARTMENTS: Final[tuple[tuple[str, str, str, int], ...]] = (
    ("ED", "Emergency Department", Department.Kind.EMERGENCY, 0),
    ("MED", "General Medicine", Department.Kind.WARD, 40),
    ("SURG", "General Surgery", Department.Kind.WARD, 36),
    ("CARD", "Cardiology", Department.Kind.WARD, 28),
    ("ORTH", "Orthopaedics", Department.Kind.WARD, 28),
    ("PAED", "Paediatrics", Department.Kind.WARD, 24),
    ("MAT", "Maternity", Department.Kind.WARD, 24),
    ("ONC", "Oncology", Department.Kind.WARD, 20),
    ("NEUR", "Neurology", Department.Kind.WARD, 20),
    ("ICU", "Intensive Care", Department.Kind.WARD, 12),
    ("GER", "Geriatrics", Department.Kind.WARD, 30),
    ("PSY", "Psychiatry", Department.Kind.WARD, 20),
    ("RESP", "Respiratory Medicine", Department.Kind.WARD, 24),
    ("DERM", "Dermatology Clinic", Department.Kind.CLINIC, 0),
    ("ENT", "Ear, Nose and Throat Clinic", Department.Kind.CLINIC, 0),
    ("OPH", "Ophthalmology Clinic", Department.Kind.CLINIC, 0),
    ("ENDO", "Diabetes and Endocrinology Clinic", Department.Kind.CLINIC, 0),
    ("RHEU", "Rheumatology Clinic", Department.Kind.CLINIC, 0),
    ("URO", "Urology Clinic", Department.Kind.CLINIC, 0),
    ("GAST", "Gastroenterology Clinic", Department.Kind.CLINIC, 0),
)

# fmt: off
_FEMALE_NAMES: Final = (
    "Ada", "Alice", "Amara", "Anna", "Aoife", "Beatrice", "Chloe", "Clara", "Daria", "Elena",
    "Emma", "Eva", "Fatima", "Freya", "Grace", "Hana", "Ines", "Isla", "Ivy", "Julia", "Keiko",
    "Layla", "Lea", "Lina", "Lucia", "Maya", "Mei", "Mila", "Nadia", "Nora", "Olivia", "Priya",
    "Rosa", "Sara", "Sofia", "Talia", "Vera", "Yara", "Zoe", "Zuri",
)
_MALE_NAMES: Final = (
    "Aarav", "Adam", "Ahmed", "Arjun", "Ben", "Carlos", "Daniel", "David", "Elias", "Ethan",
    "Felix", "Finn", "Hamza", "Hugo", "Ivan", "Jonas", "Kenji", "Leo", "Liam", "Luca", "Luis",
    "Marco", "Mateo", "Milan", "Noah", "Omar", "Oscar", "Pablo", "Ravi", "Rui", "Samir", "Theo",
    "Tomas", "Victor", "Wei", "Yusuf", "Zain", "Anton", "Caleb", "Dario",
)
_FAMILY_NAMES: Final = (
    "Abbott", "Achterberg", "Adeyemi", "Alvarez", "Andersen", "Baker", "Banerjee", "Bauer",
    "Bianchi", "Brennan", "Castillo", "Chen", "Costa", "Dalton", "Delacroix", "Dubois", "Eriksen",
    "Fischer", "Fontaine", "Garcia", "Gruber", "Haddad", "Hansen", "Hughes", "Ibrahim", "Ito",
    "Jansen", "Kaplan", "Kowalski", "Kruger", "Larsen", "Lindqvist", "Lopez", "Maddox", "Marino",
    "Meyer", "Moreau", "Nakamura", "Novak", "Okafor", "Olsen", "Park", "Petrov", "Quinn", "Rahman",
    "Rossi", "Sato", "Schmidt", "Silva", "Sorensen", "Tanaka", "Torres", "Ueda", "Vance", "Varga",
    "Weber", "Wiśniewski", "Yilmaz", "Zhang", "Zimmermann",
)
_STREETS: Final = (
    "Oak", "Maple", "Cedar", "Willow", "Elm", "Birch", "Chestnut", "Linden", "Poplar", "Rowan",
    "Hawthorn", "Aspen", "Alder", "Juniper",
)
# fmt: on
_STREET_KINDS: Final = ("Street", "Road", "Avenue", "Lane", "Close", "Way")
_CITIES: Final = ("Northbridge", "Eastfield", "Westmoor", "Southholm", "Riverton", "Lakeside")
_ALLERGIES: Final = (
    "penicillin",
    "latex",
    "peanuts",
    "shellfish",
    "sulfonamides",
    "aspirin",
    "iodinated contrast",
)
_NOTES: Final = (
    "Prefers morning appointments.",
    "Interpreter requested.",
    "Lives alone; check transport before discharge.",
    "Hearing impaired; face the patient when speaking.",
    "Registered with a community nurse.",
)
_ROLES_BY_KIND: Final[dict[str, tuple[str, ...]]] = {
    Department.Kind.WARD: ("physician", "physician", "surgeon", "nurse", "nurse", "therapist"),
    Department.Kind.CLINIC: ("physician", "physician", "nurse", "therapist"),
    Department.Kind.EMERGENCY: ("physician", "physician", "nurse"),
}

# The moment "now" of the generated hospital: seeded data describes noon of ``today``, so it
# does not depend on the hour the seeder runs.
_NOON: Final = time(12, 0)


# --- The generator ---------------------------------------------------------------------------


@dataclass(kw_only=True)
class _Batch:
    """Rows generated and not yet written."""

    patients: list[Patient] = field(default_factory=list)
    encounters: list[Encounter] = field(default_factory=list)
    appointments: list[Appointment] = field(default_factory=list)


@dataclass(kw_only=True)
class _Hospital:
    """Departments and staff, and the counters the per-patient draw advances."""

    departments: list[Department]
    practitioners: list[Practitioner]
    staff_by_department: dict[int, list[int]]
    wards: list[Department]
    ward_weights: list[int]
    clinics: list[Department]
    emergency: Department
    # Beds each ward may have occupied at noon today, and how many are.
    bed_targets: dict[int, int]
    occupied: dict[int, int]
    next_encounter_id: int = 1
    next_appointment_id: int = 1
    appointments_today: int = 0


class _Generator:
    """Draws rows from one :class:`random.Random`, in an order fixed by the patient number."""

    def __init__(self, *, rng: random.Random, today: date, tz: tzinfo) -> None:
        self.rng = rng
        self.today = today
        self.tz = tz
        self.now = datetime.combine(today, _NOON, tzinfo=tz)

    def at(self, day: date, hour: int, minute: int) -> datetime:
        return datetime.combine(day, time(hour, minute), tzinfo=self.tz)

    # Departments and staff ---------------------------------------------------------------

    def hospital(self, *, patients: int) -> _Hospital:
        rng = self.rng
        # About 7.5 beds per 1,000 registered patients, and never fewer than 4 per ward, so a
        # small test database still has a census to look at.
        scale = patients / 40_000
        departments = [
            Department(
                id=number,
                code=code,
                name=name,
                kind=kind,
                beds=max(4, round(weight * scale)) if kind == Department.Kind.WARD else 0,
            )
            for number, (code, name, kind, weight) in enumerate(_DEPARTMENTS, start=1)
        ]
        wards = [d for d in departments if d.kind == Department.Kind.WARD]
        # Target occupancy per ward between 65% and 97%: full wards are realistic, but a census
        # where every ward reads 100% would hide mistakes.
        bed_targets = {d.id: round(d.beds * rng.uniform(0.65, 0.97)) for d in wards}

        practitioners: list[Practitioner] = []
        staff_by_department: dict[int, list[int]] = {d.id: [] for d in departments}
        for number in range(1, max(10, patients // 200) + 1):
            # Round-robin, so every department has staff once there are twenty or more.
            department = departments[(number - 1) % len(departments)]
            practitioners.append(
                Practitioner(
                    id=number,
                    staff_number=f"S{number:06d}",
                    given_name=rng.choice(_FEMALE_NAMES if rng.random() < 0.5 else _MALE_NAMES),
                    family_name=rng.choice(_FAMILY_NAMES),
                    role=rng.choice(_ROLES_BY_KIND[department.kind]),
                    department_id=department.id,
                )
            )
            staff_by_department[department.id].append(number)
        return _Hospital(
            departments=departments,
            practitioners=practitioners,
            staff_by_department=staff_by_department,
            wards=wards,
            ward_weights=[weight for *_, weight in _DEPARTMENTS if weight],
            clinics=[d for d in departments if d.kind == Department.Kind.CLINIC],
            emergency=next(d for d in departments if d.kind == Department.Kind.EMERGENCY),
            bed_targets=bed_targets,
            occupied=dict.fromkeys(bed_targets, 0),
        )

    def practitioner_for(self, hospital: _Hospital, department: Department) -> int:
        """A practitioner of ``department``; any practitioner when it has no staff (fewer
        practitioners than departments: visiting staff cover it)."""
        staff = hospital.staff_by_department[department.id]
        if staff:
            return self.rng.choice(staff)
        return self.rng.randrange(len(hospital.practitioners)) + 1

    # Patients ----------------------------------------------------------------------------

    def patient(self, number: int) -> Patient:
        rng = self.rng
        roll = rng.random()
        if roll < 0.49:
            sex, given = Patient.Sex.FEMALE, rng.choice(_FEMALE_NAMES)
        elif roll < 0.98:
            sex, given = Patient.Sex.MALE, rng.choice(_MALE_NAMES)
        else:
            sex = Patient.Sex.OTHER if roll < 0.99 else Patient.Sex.UNKNOWN
            given = rng.choice(_FEMALE_NAMES + _MALE_NAMES)
        family = rng.choice(_FAMILY_NAMES)
        age_days = rng.randrange(95 * 365)
        # Registered within the last ten years, and not before birth.
        registered_days_ago = 1 + rng.randrange(min(3650, age_days + 1))
        created_at = self.at(
            self.today - timedelta(days=registered_days_ago),
            rng.randrange(7, 20),
            rng.randrange(60),
        )
        allergies = ""
        if rng.random() < 0.2:
            allergies = ", ".join(sorted(rng.sample(_ALLERGIES, rng.randint(1, 2))))
        notes = rng.choice(_NOTES) if rng.random() < 0.1 else ""
        return Patient(
            id=number,
            mrn=f"MRN{number:08d}",
            given_name=given,
            family_name=family,
            birth_date=self.today - timedelta(days=age_days),
            sex=sex,
            # 555-0100..0199 are reserved for fiction in the North American numbering plan.
            phone=f"+1-{rng.randint(201, 989)}-555-01{rng.randrange(100):02d}",
            email=_email(f"{given}.{family}.{number}") if rng.random() < 0.7 else "",
            address=(
                f"{rng.randint(1, 250)} {rng.choice(_STREETS)} {rng.choice(_STREET_KINDS)}, "
                f"{rng.choice(_CITIES)}"
            ),
            allergies=allergies,
            notes=notes,
            created_at=created_at,
            # Overwritten by auto_now on insert; _finish() sets it to created_at afterwards.
            updated_at=created_at,
        )

    # Encounters ---------------------------------------------------------------------------

    def encounter(self, hospital: _Hospital, patient_id: int) -> Encounter:
        rng = self.rng
        roll = rng.random()
        if roll < 0.55:
            kind = Encounter.Kind.OUTPATIENT
            department = (
                rng.choice(hospital.clinics) if rng.random() < 0.8 else rng.choice(hospital.wards)
            )
        elif roll < 0.75:
            kind, department = Encounter.Kind.EMERGENCY, hospital.emergency
        else:
            kind = Encounter.Kind.INPATIENT
            department = rng.choices(hospital.wards, weights=hospital.ward_weights)[0]
        practitioner_id = self.practitioner_for(hospital, department)
        status, admitted_at, discharged_at = self._encounter_times(hospital, kind, department)
        encounter_id = hospital.next_encounter_id
        hospital.next_encounter_id += 1
        return Encounter(
            id=encounter_id,
            patient_id=patient_id,
            practitioner_id=practitioner_id,
            department_id=department.id,
            kind=kind,
            status=status,
            admitted_at=admitted_at,
            discharged_at=discharged_at,
        )

    def _encounter_times(
        self, hospital: _Hospital, kind: str, department: Department
    ) -> tuple[str, datetime, datetime | None]:
        rng = self.rng
        roll = rng.random()
        if roll < 0.05:
            # Planned: an elective admission or a visit in the next four weeks.
            day = self.today + timedelta(days=rng.randint(1, 28))
            return Encounter.Status.PLANNED, self.at(day, rng.randrange(8, 17), 0), None
        if kind == Encounter.Kind.INPATIENT:
            # A third of admissions in the last fortnight, so wards have current patients.
            days_ago = rng.randrange(14) if rng.random() < 0.33 else rng.randint(14, 1095)
            admitted_at = self.now - timedelta(days=days_ago, minutes=rng.randrange(1, 24 * 60))
            stay = timedelta(days=rng.randint(1, 14), hours=rng.randrange(24))
            if roll < 0.08:
                return Encounter.Status.CANCELLED, admitted_at, None
            if admitted_at + stay > self.now:
                ward = department.id
                if hospital.occupied[ward] < hospital.bed_targets[ward]:
                    hospital.occupied[ward] += 1
                    return Encounter.Status.ADMITTED, admitted_at, None
                # No bed to spare: this stay ended early instead.
                stay = (self.now - admitted_at) * rng.uniform(0.2, 0.9)
            return Encounter.Status.DISCHARGED, admitted_at, admitted_at + stay
        days_ago = rng.randint(1, 1095)
        if kind == Encounter.Kind.EMERGENCY:
            admitted_at = self.now - timedelta(days=days_ago, minutes=rng.randrange(24 * 60))
            length = timedelta(minutes=rng.randint(60, 8 * 60))
        else:
            admitted_at = self.at(
                self.today - timedelta(days=days_ago), rng.randrange(8, 17), 15 * rng.randrange(4)
            )
            length = timedelta(minutes=rng.randint(15, 90))
        if roll < 0.08:
            return Encounter.Status.CANCELLED, admitted_at, None
        return Encounter.Status.DISCHARGED, admitted_at, admitted_at + length

    # Appointments ------------------------------------------------------------------------

    def appointment(self, hospital: _Hospital, patient_id: int) -> Appointment:
        rng = self.rng
        department = (
            rng.choice(hospital.clinics) if rng.random() < 0.8 else rng.choice(hospital.wards)
        )
        practitioner_id = self.practitioner_for(hospital, department)
        roll = rng.random()
        if roll < 0.03:
            day = self.today
            hospital.appointments_today += 1
        elif roll < 0.06:
            day = self.today + timedelta(days=1)
        elif roll < 0.70:
            day = self.today - timedelta(days=rng.randint(1, 365))
        else:
            day = self.today + timedelta(days=rng.randint(2, 60))
        scheduled_at = self.at(day, rng.randrange(8, 18), 15 * rng.randrange(4))
        appointment_id = hospital.next_appointment_id
        hospital.next_appointment_id += 1
        return Appointment(
            id=appointment_id,
            patient_id=patient_id,
            practitioner_id=practitioner_id,
            department_id=department.id,
            scheduled_at=scheduled_at,
            duration_minutes=rng.choice((15, 15, 15, 30, 30, 45)),
            status=self._appointment_status(scheduled_at),
        )

    def _appointment_status(self, scheduled_at: datetime) -> str:
        roll = self.rng.random()
        if scheduled_at >= self.now:
            return Appointment.Status.CANCELLED if roll < 0.08 else Appointment.Status.BOOKED
        if scheduled_at.date() == self.today and roll < 0.15:
            # This morning's patients still in the building.
            return Appointment.Status.ARRIVED
        if roll < 0.85:
            return Appointment.Status.COMPLETED
        return Appointment.Status.NO_SHOW if roll < 0.92 else Appointment.Status.CANCELLED


def _email(local_part: str) -> str:
    # ASCII only: a few family names carry diacritics that many mail systems reject.
    ascii_part = local_part.lower().encode("ascii", "ignore").decode("ascii")
    return f"{ascii_part}@example.org"


# --- The public entry point ------------------------------------------------------------------


def seed(
    *,
    patients: int,
    seed: int = 42,
    today: date | None = None,
    force: bool = False,
    using: str = "default",
) -> SeedSummary:
    """Fill the demo tables of database ``using`` with synthetic, deterministic data.

    Applies migrations first. Refuses with :class:`SeedRefused` if any demo table has rows,
    unless ``force``: then those rows are deleted first (in the same transaction, so a failure
    leaves the old data in place). ``today`` (default: the current local date) anchors every
    date; the data describe noon of that day. The same ``patients``, ``seed`` and ``today``
    always give the same rows, ids included.

    Raises :class:`SeedArgumentError` naming the argument at fault.
    """
    _check_arguments(patients=patients, seed=seed, today=today, using=using)
    started = monotonic_clock.perf_counter()
    call_command("migrate", database=using, verbosity=0, interactive=False)
    day = today if today is not None else timezone.localdate()
    generator = _Generator(rng=random.Random(seed), today=day, tz=timezone.get_default_timezone())
    with _bulk_load_tuning(using), transaction.atomic(using=using):
        existing = sum(model._default_manager.using(using).count() for model in _MODELS)
        if existing and not force:
            raise SeedRefused(
                f"database {using!r} already holds {existing} demo rows; pass force=True "
                "(--force) to delete them and seed again"
            )
        if existing:
            _delete_demo_rows(using)
        summary = _write(generator, patients=patients, using=using)
        # Rows were replaced wholesale behind the ORM's signals (bulk inserts on the base
        # manager, raw flushes): everything cached about the old ones is wrong now.
        changed_everything(using=using)
    summary["deleted"] = existing
    summary["seconds"] = round(monotonic_clock.perf_counter() - started, 3)
    logger.info(
        "seeded %d departments, %d practitioners, %d patients, %d encounters, "
        "%d appointments in %.1f s (deleted first: %d rows)",
        summary["departments"],
        summary["practitioners"],
        summary["patients"],
        summary["encounters"],
        summary["appointments"],
        summary["seconds"],
        existing,
    )
    return summary


def _check_arguments(*, patients: int, seed: int, today: date | None, using: str) -> None:
    # bool is an int subclass: seed(patients=True) is a mistake, not one patient.
    if type(patients) is not int or not 1 <= patients <= MAX_PATIENTS:
        raise SeedArgumentError(f"patients must be an integer from 1 to {MAX_PATIENTS:,}")
    if type(seed) is not int:
        raise SeedArgumentError("seed must be an integer")
    # datetime is a date subclass, but a datetime would smuggle in a time and a zone.
    if today is not None and (type(today) is not date):
        raise SeedArgumentError("today must be a datetime.date (not a datetime)")
    if using not in connections.settings:
        raise SeedArgumentError("using must name a database in settings.DATABASES")


@contextmanager
def _bulk_load_tuning(using: str) -> Iterator[None]:
    """On SQLite, a 256 MiB page cache while seeding, restored afterwards.

    The default 2 MiB cache cannot hold the appointment indexes, whose random-order inserts
    then spill pages to the WAL over and over: the larger cache makes seeding about a third
    faster. The setting belongs to this connection only; nothing else is affected.
    """
    connection = connections[using]
    if connection.vendor != "sqlite":
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA cache_size")
        previous = int(cursor.fetchone()[0])
        cursor.execute(f"PRAGMA cache_size = {_SQLITE_CACHE_KIB}")
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"PRAGMA cache_size = {previous}")


def _delete_demo_rows(using: str) -> None:
    """Empty the demo tables and restart their id sequences (TRUNCATE ... RESTART IDENTITY on
    PostgreSQL): deleting through the ORM would load every row to honour ``PROTECT``."""
    connection = connections[using]
    # Children first: deleting a parent row makes SQLite look for rows referencing it, and
    # some foreign keys have no index (see models), so parents first would scan per row.
    tables = [model._meta.db_table for model in reversed(_MODELS)]
    statements = connection.ops.sql_flush(no_style(), tables, reset_sequences=True)
    if connection.vendor == "postgresql":
        # PostgreSQL refuses TRUNCATE while deferred foreign-key checks are pending, as they are
        # when the caller's transaction inserted demo rows before (tests do). Running them now
        # clears them; afterwards the constraints go back to Django's INITIALLY DEFERRED.
        statements = [
            "SET CONSTRAINTS ALL IMMEDIATE",
            *statements,
            "SET CONSTRAINTS ALL DEFERRED",
        ]
    connection.ops.execute_sql_flush(statements)


def _write(generator: _Generator, *, patients: int, using: str) -> SeedSummary:
    hospital = generator.hospital(patients=patients)
    Department._base_manager.using(using).bulk_create(
        hospital.departments, batch_size=_INSERT_BATCH
    )
    Practitioner._base_manager.using(using).bulk_create(
        hospital.practitioners, batch_size=_INSERT_BATCH
    )

    batch = _Batch()
    counts = {"encounters": 0, "appointments": 0}
    rng = generator.rng
    for number in range(1, patients + 1):
        batch.patients.append(generator.patient(number))
        # 0-4 encounters (mean 2) and 0-6 appointments (mean 3) per patient.
        for _ in range(rng.randint(0, 4)):
            batch.encounters.append(generator.encounter(hospital, number))
        for _ in range(rng.randint(0, 6)):
            batch.appointments.append(generator.appointment(hospital, number))
        if len(batch.patients) >= _PATIENTS_PER_FLUSH or number == patients:
            counts["encounters"] += len(batch.encounters)
            counts["appointments"] += len(batch.appointments)
            _flush(batch, using=using)
            batch = _Batch()
            logger.debug("seeded %d of %d patients", number, patients)

    # auto_now stamped every patient with the insert time; restore the generated one.
    Patient._base_manager.using(using).update(updated_at=F("created_at"))
    _reset_sequences(using)
    return SeedSummary(
        departments=len(hospital.departments),
        practitioners=len(hospital.practitioners),
        patients=patients,
        encounters=counts["encounters"],
        appointments=counts["appointments"],
        admitted_inpatients=sum(hospital.occupied.values()),
        appointments_today=hospital.appointments_today,
        deleted=0,
        seconds=0.0,
    )


def _flush(batch: _Batch, *, using: str) -> None:
    Patient._base_manager.using(using).bulk_create(batch.patients, batch_size=_INSERT_BATCH)
    Encounter._base_manager.using(using).bulk_create(batch.encounters, batch_size=_INSERT_BATCH)
    Appointment._base_manager.using(using).bulk_create(batch.appointments, batch_size=_INSERT_BATCH)


def _reset_sequences(using: str) -> None:
    """Move id sequences past the ids assigned here, so later ORM inserts do not collide.

    PostgreSQL needs this (explicit ids do not advance a sequence); SQLite returns no
    statements, as it tracks the largest id itself.
    """
    connection = connections[using]
    statements = connection.ops.sequence_reset_sql(no_style(), list(_MODELS))
    if statements:
        with connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
