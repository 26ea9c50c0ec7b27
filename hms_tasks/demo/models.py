"""Models of the demo HMS (app label ``hms``): departments, staff, patients and their care.

The shapes follow what a hospital's own system keeps, reduced to the columns that the demo API,
the cache warmers and the load tests read. Indexes exist for those queries and no others, because
every extra index slows the bulk seeding and each write of a real HMS:

* ``Patient.updated_at``: "patients changed since" scans (cache invalidation, warming).
* ``Encounter (patient, status)``: a patient's chart; ``(department, status, kind)``: the census,
  whose per-kind/per-status counts the index covers on its own.
* ``Appointment (practitioner, scheduled_at)``: a practitioner's day; ``(scheduled_at)``: the
  hospital's day. ``(patient, scheduled_at)``: a patient's chart.

A foreign key whose column leads one of those composite indexes has ``db_index=False``: the
composite index serves lookups by that key alone too, so a separate one would only cost writes.
Two foreign keys no query here filters on have no index at all (``Encounter.practitioner``,
``Appointment.department``): each index on these big tables slows seeding by seconds. Add one
with a migration when a query needs it (deleting a practitioner or department then scans).
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from hms_tasks.cache import InvalidatingQuerySet

__all__ = ["Appointment", "Department", "Encounter", "Patient", "Practitioner"]


class Department(models.Model):
    """A ward, clinic or the emergency department; ``beds`` is zero where nobody stays."""

    # Bulk updates invalidate the hms-tasks cache like saves do.
    objects = InvalidatingQuerySet.as_manager()

    class Kind(models.TextChoices):
        WARD = "ward", "Ward"
        CLINIC = "clinic", "Clinic"
        EMERGENCY = "emergency", "Emergency"

    code = models.CharField(max_length=16, unique=True)
    name = models.CharField(max_length=120)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    beds = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ("code",)

    def __str__(self) -> str:
        return self.code


class Practitioner(models.Model):
    """A member of the clinical staff, attached to a home department."""

    # Bulk updates invalidate the hms-tasks cache like saves do.
    objects = InvalidatingQuerySet.as_manager()

    class Role(models.TextChoices):
        PHYSICIAN = "physician", "Physician"
        SURGEON = "surgeon", "Surgeon"
        NURSE = "nurse", "Nurse"
        MIDWIFE = "midwife", "Midwife"
        THERAPIST = "therapist", "Therapist"

    staff_number = models.CharField(max_length=16, unique=True)
    given_name = models.CharField(max_length=80)
    family_name = models.CharField(max_length=80)
    role = models.CharField(max_length=16, choices=Role.choices)
    department = models.ForeignKey(
        Department, on_delete=models.PROTECT, related_name="practitioners"
    )

    def __str__(self) -> str:
        # The staff number, not the name: model reprs end up in logs and error reports.
        return self.staff_number


class Patient(models.Model):
    """A registered patient. Every column but ``id`` is patient data (PHI): never log it."""

    # Bulk updates invalidate the hms-tasks cache like saves do.
    objects = InvalidatingQuerySet.as_manager()

    class Sex(models.TextChoices):
        FEMALE = "female", "Female"
        MALE = "male", "Male"
        OTHER = "other", "Other"
        UNKNOWN = "unknown", "Unknown"

    mrn = models.CharField("medical record number", max_length=20, unique=True)
    given_name = models.CharField(max_length=80)
    family_name = models.CharField(max_length=80)
    birth_date = models.DateField()
    sex = models.CharField(max_length=8, choices=Sex.choices, default=Sex.UNKNOWN)
    phone = models.CharField(max_length=32, blank=True)
    email = models.EmailField(blank=True)
    address = models.CharField(max_length=200, blank=True)
    allergies = models.TextField(blank=True)
    notes = models.TextField(blank=True)
    # A default rather than auto_now_add, so that imports (and the seeder) can keep the real
    # registration time.
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True, db_index=True)

    def __str__(self) -> str:
        # Only the primary key: the MRN and the names are PHI and reprs reach logs.
        return f"Patient #{self.pk}"


class Encounter(models.Model):
    """A stay or visit. ``admitted_at`` is the (planned) start; ``discharged_at`` is null while
    the patient is still there and for planned or cancelled encounters."""

    # Bulk updates invalidate the hms-tasks cache like saves do.
    objects = InvalidatingQuerySet.as_manager()

    class Kind(models.TextChoices):
        INPATIENT = "inpatient", "Inpatient"
        OUTPATIENT = "outpatient", "Outpatient"
        EMERGENCY = "emergency", "Emergency"

    class Status(models.TextChoices):
        PLANNED = "planned", "Planned"
        ADMITTED = "admitted", "Admitted"
        DISCHARGED = "discharged", "Discharged"
        CANCELLED = "cancelled", "Cancelled"

    patient = models.ForeignKey(
        Patient, on_delete=models.PROTECT, related_name="encounters", db_index=False
    )
    practitioner = models.ForeignKey(
        Practitioner, on_delete=models.PROTECT, related_name="encounters", db_index=False
    )
    department = models.ForeignKey(
        Department, on_delete=models.PROTECT, related_name="encounters", db_index=False
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    status = models.CharField(max_length=16, choices=Status.choices)
    admitted_at = models.DateTimeField()
    discharged_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = (
            models.Index(fields=("patient", "status"), name="hms_enc_patient_status"),
            models.Index(fields=("department", "status", "kind"), name="hms_enc_dept_status_kind"),
        )

    def __str__(self) -> str:
        return f"Encounter #{self.pk}"


class Appointment(models.Model):
    """A booked slot with a practitioner in a department."""

    # Bulk updates invalidate the hms-tasks cache like saves do.
    objects = InvalidatingQuerySet.as_manager()

    class Status(models.TextChoices):
        BOOKED = "booked", "Booked"
        ARRIVED = "arrived", "Arrived"
        COMPLETED = "completed", "Completed"
        CANCELLED = "cancelled", "Cancelled"
        NO_SHOW = "no_show", "No show"

    patient = models.ForeignKey(
        Patient, on_delete=models.PROTECT, related_name="appointments", db_index=False
    )
    practitioner = models.ForeignKey(
        Practitioner, on_delete=models.PROTECT, related_name="appointments", db_index=False
    )
    department = models.ForeignKey(
        Department, on_delete=models.PROTECT, related_name="appointments", db_index=False
    )
    scheduled_at = models.DateTimeField()
    duration_minutes = models.PositiveSmallIntegerField(default=15)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.BOOKED)

    class Meta:
        indexes = (
            models.Index(
                fields=("practitioner", "scheduled_at"), name="hms_appt_practitioner_time"
            ),
            models.Index(fields=("scheduled_at",), name="hms_appt_time"),
            models.Index(fields=("patient", "scheduled_at"), name="hms_appt_patient_time"),
        )

    def __str__(self) -> str:
        return f"Appointment #{self.pk}"
