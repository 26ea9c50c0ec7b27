"""A payload that depends on the date is not served on another date.

"Today" is ``django.utils.timezone.localdate()``, what both the demo's builders and its keys
use. The test moves it without mocking anything: a time zone 12 hours behind UTC and one 14
hours ahead are always on different dates, so a summary built under the first was built
"yesterday" as seen from the second. Real Redis, real database, no worker (no invalidation
runs: only the key can keep yesterday's summary from being served).
"""

from __future__ import annotations

from datetime import datetime, time

import pytest
from django.utils import timezone

from hms_tasks.cache import get_or_build
from hms_tasks.cache.core import backend
from hms_tasks.cache.registry import get_kind
from hms_tasks.demo import api
from hms_tasks.demo.models import Appointment, Patient
from hms_tasks.demo.seed import seed
from tests.helpers import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

YESTERDAY = "Etc/GMT+12"  # UTC-12 (the sign of Etc/ zones is inverted)
TODAY = "Pacific/Kiritimati"  # UTC+14


def _midnight(zone: str) -> datetime:
    with timezone.override(zone):
        return timezone.make_aware(datetime.combine(timezone.localdate(), time.min))


def test_a_summary_built_yesterday_is_not_served_today() -> None:
    seed(patients=20, seed=3, force=True)
    with timezone.override(YESTERDAY):
        yesterday_date = timezone.localdate()
    with timezone.override(TODAY):
        assert timezone.localdate() > yesterday_date
    # An appointment between the two midnights: "upcoming" on one of the dates only, so the
    # two days' summaries differ.
    first, second = sorted([_midnight(YESTERDAY), _midnight(TODAY)])
    patient = Patient.objects.order_by("id").first()
    assert patient is not None
    template = Appointment.objects.order_by("id").first()
    assert template is not None
    Appointment.objects.create(
        patient=patient, practitioner_id=template.practitioner_id,
        department_id=template.department_id, scheduled_at=first + (second - first) / 2,
        duration_minutes=15, status=Appointment.Status.BOOKED)

    with timezone.override(YESTERDAY):
        built_yesterday = get_or_build("patient", patient.pk)
        key = get_kind("patient").key(patient.pk)
        wait_for(lambda: backend().has_key(key), what="yesterday's summary to be stored")
    with timezone.override(TODAY):
        fresh = dict(api.patient_summary(patient.pk) or {})
        served_today = get_or_build("patient", patient.pk)
    assert fresh != built_yesterday  # the dates do see different appointments
    assert served_today == fresh
