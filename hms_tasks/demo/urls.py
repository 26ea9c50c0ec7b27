"""URLs of the demo HMS: ``/healthz``, ``/metrics`` (Prometheus) and the JSON API under ``/api/``.

This is the demo's ``ROOT_URLCONF``. Bad requests, unknown paths and server errors answer in
JSON as well (``handler400``, ``handler404``, ``handler500``), so API clients never have to
parse an HTML page.
"""

from __future__ import annotations

from django.urls import URLPattern, URLResolver, include, path

from hms_tasks.demo import api
from hms_tasks.metrics.prometheus import metrics_view

api_urlpatterns: list[URLPattern | URLResolver] = [
    path("patients/", api.patients, name="hms-patients"),
    path("patients/<int:patient_id>/", api.patient, name="hms-patient"),
    path(
        "practitioners/<int:practitioner_id>/appointments/today/",
        api.practitioner_appointments_today,
        name="hms-practitioner-today",
    ),
    # Before the <int:department_id> route only for readability: "census" is not an int.
    path("departments/census/", api.departments, name="hms-departments-census"),
    path("departments/<int:department_id>/census/", api.department, name="hms-department-census"),
]

urlpatterns: list[URLPattern | URLResolver] = [
    path("healthz", api.healthz, name="hms-healthz"),
    path("metrics", metrics_view, name="hms-metrics"),
    path("api/", include(api_urlpatterns)),
]

handler400 = "hms_tasks.demo.api.bad_request"
handler404 = "hms_tasks.demo.api.not_found"
handler500 = "hms_tasks.demo.api.server_error"
