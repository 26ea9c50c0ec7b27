"""The HMS side of the canary test (``python -m tests.faults.canary_hms``), run as its own process
on the demo HMS: a patient whose every name field carries the canary (environment ``CANARY``)
is created, read through the API and the hms-tasks cache, renamed (invalidation), and tasks of
every capability are sent with the patient's id. Prints one JSON line: the patient's id and
the task ids; never the canary.
"""

from __future__ import annotations

import datetime
import json
import os

import django


def main() -> None:
    django.setup()
    from django.core.management import call_command
    from django.db import transaction
    from django.test import Client

    from hms_tasks.cache import names as cache_names
    from hms_tasks.celery import app
    from hms_tasks.demo.models import Patient
    from hms_tasks.health import names as health_names
    from hms_tasks.metrics import names as metrics_names

    canary = os.environ["CANARY"]
    call_command("migrate", verbosity=0)
    with transaction.atomic():
        patient = Patient.objects.create(
            mrn="CANARY-1", given_name=canary, family_name=canary,
            birth_date=datetime.date(1957, 3, 4), phone="+1 555 0100",
            email=f"{canary.lower()}@example.org", address=f"1 {canary} Street",
            allergies=f"{canary} allergy", notes=f"{canary} notes")
    pid = patient.pk
    http = Client(HTTP_HOST="127.0.0.1")
    # The HMS itself shows the patient (the reads fill the hms-tasks cache): a canary that no
    # read returned would prove nothing.
    first = http.get(f"/api/patients/{pid}/")
    assert first.status_code == 200, first.status_code
    assert canary.encode() in first.content
    again = http.get(f"/api/patients/{pid}/")  # a cache hit
    assert again.content == first.content
    listed = http.get("/api/patients/?limit=5&fields=id,given_name,family_name")
    assert canary.encode() in listed.content
    assert http.get("/healthz").status_code == 200
    assert http.get("/metrics").status_code == 200
    # A write: the cache is invalidated by tag (on commit, through the worker).
    with transaction.atomic():
        patient.family_name = f"{canary}-renamed"
        patient.save()
    sent = [
        app.send_task(cache_names.CACHE_WARM_PATIENTS, kwargs={"ids": [pid]}),
        app.send_task(cache_names.CACHE_INVALIDATE_TAGS, kwargs={"tags": [f"patient:{pid}"]}),
        app.send_task(cache_names.CACHE_WARM_PATIENTS, kwargs={"ids": [pid]}),
        app.send_task(cache_names.CACHE_WARM_HOT, kwargs={"limit": 10}),
        app.send_task(cache_names.CACHE_STATS),
        app.send_task(metrics_names.METRICS_COLLECT_HOST),
        app.send_task(health_names.HEALTH_SWEEP),
    ]
    states = []
    for result in sent:
        result.get(timeout=120, propagate=False)
        states.append(result.state)
    renamed = http.get(f"/api/patients/{pid}/")
    assert f"{canary}-renamed".encode() in renamed.content
    print(json.dumps({"patient": pid, "tasks": [r.id for r in sent], "states": states}))


if __name__ == "__main__":
    main()
