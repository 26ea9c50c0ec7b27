"""The demo seeder against a real database (SQLite or PostgreSQL): determinism, refusal,
shapes, argument checks, and that it never logs patient data."""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import date, datetime, time, timedelta

import pytest
from django.db.models import Count, F, Model
from django.utils import timezone

from hms_tasks.demo.models import Appointment, Department, Encounter, Patient, Practitioner
from hms_tasks.demo.seed import SeedArgumentError, SeedRefused, seed
from tests.demo_fixtures import sqlite_test_directory  # noqa: F401  (autouse)

MODELS: tuple[type[Model], ...] = (Department, Practitioner, Patient, Encounter, Appointment)
DAY = date(2024, 3, 1)


def _digest() -> str:
    """A hash of every column of every demo row, ids included, in id order."""
    digest = hashlib.sha256()
    for model in MODELS:
        columns = [field.attname for field in model._meta.concrete_fields]
        digest.update(model._meta.label.encode())
        for row in model._default_manager.order_by("pk").values_list(*columns):
            digest.update(repr(row).encode())
    return digest.hexdigest()


def _row_counts() -> dict[str, int]:
    return {model._meta.model_name or "": model._default_manager.count() for model in MODELS}


# --- Determinism -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_same_arguments_give_identical_rows() -> None:
    first = seed(patients=150, seed=3, today=DAY)
    digest = _digest()
    again = seed(patients=150, seed=3, today=DAY, force=True)
    assert _digest() == digest
    assert {k: v for k, v in again.items() if k not in ("deleted", "seconds")} == {
        k: v for k, v in first.items() if k not in ("deleted", "seconds")
    }
    assert again["deleted"] == sum(_row_counts().values())


@pytest.mark.django_db
def test_other_seed_or_day_gives_other_rows() -> None:
    seed(patients=150, seed=3, today=DAY)
    digest = _digest()
    seed(patients=150, seed=4, today=DAY, force=True)
    other_seed = _digest()
    seed(patients=150, seed=3, today=DAY + timedelta(days=1), force=True)
    other_day = _digest()
    assert len({digest, other_seed, other_day}) == 3


@pytest.mark.django_db
def test_timestamps_are_generated_not_taken_from_the_clock() -> None:
    seed(patients=120, seed=5, today=DAY)
    assert not Patient.objects.exclude(updated_at=F("created_at")).exists()
    start_of_day = timezone.make_aware(datetime.combine(DAY, time.min))
    assert not Patient.objects.filter(created_at__gte=start_of_day).exists()


# --- Refusal and force -----------------------------------------------------------------------


@pytest.mark.django_db
def test_refuses_a_database_with_demo_rows() -> None:
    seed(patients=100, seed=1, today=DAY)
    digest = _digest()
    with pytest.raises(SeedRefused, match="--force"):
        seed(patients=100, seed=2, today=DAY)
    assert _digest() == digest


@pytest.mark.django_db
def test_refuses_when_only_a_department_exists() -> None:
    Department.objects.create(code="X", name="Existing", kind=Department.Kind.CLINIC)
    with pytest.raises(SeedRefused, match="--force"):
        seed(patients=10, today=DAY)
    assert Department.objects.count() == 1
    assert not Patient.objects.exists()


@pytest.mark.django_db
def test_force_replaces_previous_rows() -> None:
    seed(patients=300, seed=1, today=DAY)
    summary = seed(patients=50, seed=1, today=DAY, force=True)
    counts = _row_counts()
    assert counts["patient"] == 50
    assert counts["encounter"] == summary["encounters"]
    assert counts["appointment"] == summary["appointments"]
    assert summary["deleted"] > 300
    # Later ORM inserts (a real HMS registering a patient) must not collide with seeded ids.
    created = Patient.objects.create(
        mrn="T-after-seed", given_name="A", family_name="B", birth_date=DAY
    )
    assert created.id > 50


# --- Shapes ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_summary_and_shapes() -> None:
    summary = seed(patients=400, seed=9, today=DAY)
    counts = _row_counts()
    assert summary["patients"] == counts["patient"] == 400
    assert summary["departments"] == counts["department"] == 20
    # One practitioner per 200 patients, at least ten.
    assert summary["practitioners"] == counts["practitioner"] == 10
    assert summary["encounters"] == counts["encounter"]
    assert summary["appointments"] == counts["appointment"]
    assert 1.5 <= counts["encounter"] / 400 <= 2.5
    assert 2.5 <= counts["appointment"] / 400 <= 3.5

    today = Appointment.objects.filter(scheduled_at__date=DAY).count()
    assert today == summary["appointments_today"] > 0
    assert Appointment.objects.filter(scheduled_at__date=DAY + timedelta(days=1)).exists()

    admitted = Encounter.objects.filter(status=Encounter.Status.ADMITTED)
    assert admitted.count() == summary["admitted_inpatients"] > 0
    assert not admitted.exclude(kind=Encounter.Kind.INPATIENT).exists()
    assert not admitted.filter(discharged_at__isnull=False).exists()
    assert not Encounter.objects.filter(
        status=Encounter.Status.DISCHARGED, discharged_at__lte=F("admitted_at")
    ).exists()
    for row in admitted.values("department_id", "department__beds").annotate(n=Count("id")):
        assert row["n"] <= row["department__beds"]
    assert Patient.objects.values("mrn").distinct().count() == 400


# --- Arguments -------------------------------------------------------------------------------
# No django_db mark: arguments are checked before the database is touched (pytest-django
# would fail the test on any query).


@pytest.mark.parametrize("patients", [0, -1, 5_000_001, True, 10.0, "100", None])
def test_patients_out_of_range_is_rejected(patients: object) -> None:
    with pytest.raises(SeedArgumentError, match="patients") as caught:
        seed(patients=patients)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValueError)


def test_today_must_be_a_date() -> None:
    with pytest.raises(SeedArgumentError, match="today"):
        seed(patients=10, today=datetime(2024, 1, 1, tzinfo=timezone.get_default_timezone()))


def test_unknown_database_is_rejected() -> None:
    with pytest.raises(SeedArgumentError, match="using"):
        seed(patients=10, using="no-such-database")


# --- No patient data in logs or output -------------------------------------------------------


@pytest.mark.django_db
def test_logs_and_output_carry_counts_only(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    seed(patients=60, seed=2, today=DAY)
    captured = capsys.readouterr()
    text = caplog.text + captured.out + captured.err
    assert "60 patients" in caplog.text
    for mrn, email, phone, address in Patient.objects.values_list(
        "mrn", "email", "phone", "address"
    ):
        for value in (mrn, email, phone, address):
            if value:
                assert value not in text


# --- The `hms-tasks seed` command (the demo's, mounted through an entry point) -----------------


@pytest.mark.django_db
def test_seed_command_seeds_then_refuses_or_skips() -> None:
    from click.testing import CliRunner

    from hms_tasks.demo.cli import seed as seed_command

    runner = CliRunner()
    first = runner.invoke(seed_command, ["--patients", "30", "--today", "2024-03-01"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout.splitlines()[-1])["patients"] == 30
    assert Patient.objects.count() == 30

    again = runner.invoke(seed_command, ["--patients", "30"])
    assert again.exit_code == 2
    skipped = runner.invoke(seed_command, ["--patients", "30", "--if-empty"])
    assert skipped.exit_code == 0
    assert "not seeding it again" in skipped.output
    both = runner.invoke(seed_command, ["--patients", "30", "--force", "--if-empty"])
    assert both.exit_code == 2
    assert "exclude each other" in both.output
    assert Patient.objects.count() == 30
