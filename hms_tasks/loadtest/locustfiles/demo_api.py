"""The shipped load-test scenario of the demo HMS JSON API (scenario ``"demo"``).

A plain locustfile: hms-tasks runs it in a Locust subprocess (``hms_tasks.loadtest.runner``),
and ``locust -f hms_tasks/loadtest/locustfiles/demo_api.py --host http://127.0.0.1:8000`` runs
it by hand. It is not a module of the ``hms_tasks`` package (this directory has no
``__init__.py``), so nothing that imports ``hms_tasks`` ever imports Locust.

Each simulated user learns the patient ids of one page and the department ids once, then mixes
what wards and clinics read most: patient summaries, practitioners' schedules of the day, the
census of one department and of all of them, and patient pages. Requests are grouped under
stable names (ids replaced by ``[id]``), so the per-endpoint table has five rows whatever the
ids. Redirects are never followed.
"""

from __future__ import annotations

import random

from locust import FastHttpUser, between, task

#: Practitioners every seeded demo database has (the seeder creates at least ten).
PRACTITIONERS = 10


class DemoHmsUser(FastHttpUser):
    wait_time = between(0.5, 2.0)
    connection_timeout = 5.0
    network_timeout = 30.0

    patient_ids: list[int]
    department_ids: list[int]

    def on_start(self) -> None:
        self.patient_ids = []
        self.department_ids = []
        with self.client.get("/api/patients/?limit=200&fields=id", name="/api/patients/",
                             allow_redirects=False, catch_response=True) as resp:
            if resp.status_code == 200:
                self.patient_ids = [row["id"] for row in resp.json().get("results", [])]
                resp.success()
            else:
                resp.failure(f"HTTP {resp.status_code}")
        with self.client.get("/api/departments/census/", name="/api/departments/census/",
                             allow_redirects=False, catch_response=True) as resp:
            if resp.status_code == 200:
                self.department_ids = [row["id"] for row in resp.json().get("results", [])
                                       if "id" in row]
                resp.success()
            else:
                resp.failure(f"HTTP {resp.status_code}")

    @task(6)
    def patient_summary(self) -> None:
        pid = random.choice(self.patient_ids) if self.patient_ids else 1
        self.client.get(f"/api/patients/{pid}/", name="/api/patients/[id]/",
                        allow_redirects=False)

    @task(2)
    def practitioner_today(self) -> None:
        prac = random.randint(1, PRACTITIONERS)
        self.client.get(f"/api/practitioners/{prac}/appointments/today/",
                        name="/api/practitioners/[id]/appointments/today/",
                        allow_redirects=False)

    @task(1)
    def department_census(self) -> None:
        dep = random.choice(self.department_ids) if self.department_ids else 1
        self.client.get(f"/api/departments/{dep}/census/", name="/api/departments/[id]/census/",
                        allow_redirects=False)

    @task(1)
    def all_departments(self) -> None:
        self.client.get("/api/departments/census/", name="/api/departments/census/",
                        allow_redirects=False)

    @task(2)
    def patient_page(self) -> None:
        self.client.get("/api/patients/?limit=50", name="/api/patients/", allow_redirects=False)
