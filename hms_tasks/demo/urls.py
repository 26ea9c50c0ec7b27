"""URLs of the demo HMS: ``/healthz``, ``/metrics`` (Prometheus), the JSON API under ``/api/``,
the status page of hms-tasks under ``/status/`` and its static files under ``/static/``.

This is the demo's ``ROOT_URLCONF``. Bad requests, unknown paths and server errors answer in
JSON as well (``handler400``, ``handler404``, ``handler500``), so API clients never have to
parse an HTML page.
"""

from __future__ import annotations

from django.urls import URLPattern, URLResolver, include, path

from hms_tasks.assets import static_view
from hms_tasks.demo import api, status
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

status_urlpatterns: list[URLPattern | URLResolver] = [
    path("", status.page, name="hms-status"),
    path("api/services.json", status.services, name="hms-status-services"),
    path("api/alerts.json", status.alerts, name="hms-status-alerts"),
    path("api/cache.json", status.cache, name="hms-status-cache"),
    path("api/loadtests.json", status.loadtests, name="hms-status-loadtests"),
]

urlpatterns: list[URLPattern | URLResolver] = [
    path("healthz", api.healthz, name="hms-healthz"),
    # The status page of hms-tasks, and the collected static files it loads (hashed names are
    # immutable; precompressed .br/.gz are sent to clients that accept them).
    path("status/", include(status_urlpatterns)),
    path("static/<path:path>", static_view, name="hms-static"),
    path("metrics", metrics_view, name="hms-metrics"),
    path("api/", include(api_urlpatterns)),
]

handler400 = "hms_tasks.demo.api.bad_request"
handler404 = "hms_tasks.demo.api.not_found"
handler500 = "hms_tasks.demo.api.server_error"
