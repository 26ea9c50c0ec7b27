"""Query benchmarks (issue #10): ``python -m bench queries`` (``make bench BENCH=queries``).

Parts, each in a subprocess of its own with Django set up, against one private Redis:

- ``reduction``: each demo endpoint and cache builder, as shipped against a naive ORM version
  written here (model instances, per-row related access), on 10,000 patients: statements and
  time, side by side; the seed claimed a 60-85 % query reduction.
- ``detection``: a catalogue of seeded N+1 and duplicate patterns, each audited as a probe; each
  must be found at its own line of this file; the demo's probes must show none.
- ``overhead``: the live sampling middleware on the demo API (in-process requests through the
  whole middleware stack) at 1 % and 100 % against no middleware, rounds interleaved.
- ``audit``: an audit of every demo probe on 100,000 patients.

The SQLite databases live under ``.hms-tasks/bench/`` (seeded once, reused).
``BENCH_PARTS=detection,overhead`` runs some parts only.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.common import REPO, Row, private_redis

BENCH_HOME = REPO / ".hms-tasks" / "bench"
PARTS = ("reduction", "detection", "overhead", "audit")
SIZES = {"reduction": 10_000, "detection": 10_000, "overhead": 10_000, "audit": 100_000}


def _db(patients: int) -> str:
    return f"sqlite:///{BENCH_HOME / f'hms-{patients // 1000}k.sqlite3'}"


def _env(redis_url: str, database_url: str) -> dict[str, str]:
    return {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url,
            "HMS_TASKS_HOME": str(BENCH_HOME), "DJANGO_SETTINGS_MODULE": "hms_tasks.demo.settings",
            "LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO)}


def run() -> list[Row]:
    chosen = [p for p in os.environ.get("BENCH_PARTS", "").split(",") if p] or list(PARTS)
    if unknown := [p for p in chosen if p not in PARTS]:
        raise SystemExit(f"BENCH_PARTS: unknown part {unknown[0]!r}; known: {', '.join(PARTS)}")
    rows: list[Row] = []
    BENCH_HOME.mkdir(parents=True, exist_ok=True)
    with private_redis() as url:
        for part in chosen:
            db = _db(SIZES[part])
            subprocess.run([sys.executable, "-m", "hms_tasks", "seed", "--patients",
                            str(SIZES[part]), "--if-empty"], env=_env(url, db), check=True,
                           cwd=REPO, stdout=subprocess.DEVNULL)
            print(f"  queries: {part} ...", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, "-m", "bench.queries", part],
                                 env=_env(url, db), cwd=REPO, capture_output=True, text=True,
                                 timeout=1800)
            if out.returncode != 0:
                raise RuntimeError(f"bench.queries {part} failed:\n{out.stderr[-4000:]}")
            rows += [Row(**r) for r in json.loads(out.stdout.strip().splitlines()[-1])]
            subprocess.run(["redis-cli", "-u", url, "FLUSHALL"], check=True,
                           stdout=subprocess.DEVNULL)
    return rows


def _row(what: str, ours: float, baseline: float | None, unit: str, target: str,
         ratio: float | None = None, ok: bool | None = None) -> dict[str, Any]:
    return {"what": what, "ours": ours, "baseline": baseline, "unit": unit, "target": target,
            "ratio": ratio, "ok": ok}


# -- reduction: naive ORM versions, per-row related access ------------------------------------


def _naive_patients(ids: list[int]) -> list[dict[str, Any]]:
    from django.utils import timezone

    from hms_tasks.demo.models import Appointment, Encounter, Patient

    out = []
    today = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)
    for pid in ids:
        p = Patient.objects.get(id=pid)
        encounters = [{"id": e.id, "department": e.department.code,
                       "practitioner": e.practitioner.family_name}
                      for e in p.encounters.filter(status__in=(Encounter.Status.PLANNED,
                                                               Encounter.Status.ADMITTED))]
        appointments = [{"id": a.id, "department": a.department.code,
                         "practitioner": a.practitioner.family_name}
                        for a in p.appointments.filter(
                            status__in=(Appointment.Status.BOOKED, Appointment.Status.ARRIVED),
                            scheduled_at__gte=today)]
        out.append({"id": p.id, "encounters": encounters, "appointments": appointments})
    return out


def _naive_schedules(ids: list[int], day: Any) -> list[dict[str, Any]]:
    from datetime import datetime, timedelta
    from datetime import time as dtime

    from django.utils import timezone

    from hms_tasks.demo.models import Practitioner

    start = timezone.make_aware(datetime.combine(day, dtime.min))
    out = []
    for pid in ids:
        pr = Practitioner.objects.filter(id=pid).first()
        if pr is None:
            continue
        items = [{"id": a.id, "patient": a.patient.id, "department": a.department.code}
                 for a in pr.appointments.filter(scheduled_at__gte=start,
                                                 scheduled_at__lt=start + timedelta(days=1))]
        out.append({"id": pr.id, "department": pr.department.code, "appointments": items})
    return out


def _naive_census(ids: list[int] | None) -> list[dict[str, Any]]:
    from hms_tasks.demo.models import Department, Encounter

    depts = Department.objects.order_by("code")
    if ids is not None:
        depts = depts.filter(id__in=ids)
    out = []
    for d in depts:
        counts = {k: {s: d.encounters.filter(kind=k, status=s).count()
                      for s in Encounter.Status.values} for k in Encounter.Kind.values}
        out.append({"id": d.id, "encounters": counts})
    return out


def _measure(fn: Callable[[], Any], repeat: int = 3) -> tuple[int, float]:
    """Statements of one run (an execute_wrapper counts them: Django's own query log is a
    bounded deque, which miscounts past 9,000) and the best time of ``repeat`` runs."""
    from django.db import connection

    best = float("inf")
    count = 0
    for _ in range(repeat):
        seen = [0]

        def counting(execute: Any, sql: str, params: Any, many: bool, context: Any,
                     seen: list[int] = seen) -> Any:
            seen[0] += 1
            return execute(sql, params, many, context)

        with connection.execute_wrapper(counting):
            t0 = time.perf_counter()
            fn()
            best = min(best, (time.perf_counter() - t0) * 1000)
        count = seen[0]
    return count, best


def part_reduction() -> list[dict[str, Any]]:
    from django.utils import timezone

    from hms_tasks.demo import api
    from hms_tasks.demo import cache as demo_cache
    from hms_tasks.demo.models import Department, Patient, Practitioner

    today = timezone.localdate()
    hot_p = demo_cache.hot_patients(200)
    hot_s = demo_cache.hot_practitioners(200)
    one_p = Patient.objects.order_by("id").values_list("id", flat=True)[0]
    one_pr = Practitioner.objects.order_by("id").values_list("id", flat=True)[0]
    one_d = Department.objects.order_by("id").values_list("id", flat=True)[0]
    paths: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
        ("api /patients/ (page of 200)", lambda: api.patient_page(limit=200),
         lambda: [(p.id, p.mrn, p.family_name) for p in Patient.objects.order_by("id")[:201]]),
        ("api /patients/<id>/", lambda: api.patient_summary(one_p),
         lambda: _naive_patients([one_p])),
        ("api /practitioners/<id>/appointments/today/",
         lambda: api.practitioner_day(one_pr, today), lambda: _naive_schedules([one_pr], today)),
        ("api /departments/<id>/census/", lambda: api.departments_census_of([one_d]),
         lambda: _naive_census([one_d])),
        ("api /departments/census/", lambda: api.departments_census_of(
            list(Department.objects.values_list("id", flat=True))), lambda: _naive_census(None)),
        (f"builder patient ({len(hot_p)} hot ids)", lambda: demo_cache.build_patients(hot_p),
         lambda: _naive_patients(hot_p)),
        (f"builder schedule ({len(hot_s)} hot ids)", lambda: demo_cache.build_schedules(hot_s),
         lambda: _naive_schedules(hot_s, today)),
        ("builder census (all)", lambda: demo_cache.build_census(
            demo_cache.hot_departments(1000)), lambda: _naive_census(None)),
    ]
    rows = []
    for what, shipped, naive in paths:
        q_ours, ms_ours = _measure(shipped)
        q_naive, ms_naive = _measure(naive)
        reduction = 100.0 * (1 - q_ours / q_naive) if q_naive else 0.0
        rows.append(_row(f"reduction: {what}: queries", q_ours, q_naive, "queries",
                         f"seed claimed 60-85 % fewer; measured {reduction:.1f} %",
                         ratio=q_naive / q_ours if q_ours else None))
        rows.append(_row(f"reduction: {what}: time", ms_ours, ms_naive, "ms",
                         "report", ratio=ms_naive / ms_ours if ms_ours else None))
    return rows


# -- detection: a catalogue of seeded patterns --------------------------------------------------
# Each probe's pattern is on the line marked "site: <name>"; the audit must name that line.


def _ids(model: Any, n: int = 12) -> list[int]:
    return list(model.objects.order_by("id").values_list("id", flat=True)[:n])


def _helper_lookup(pid: int) -> Any:
    from hms_tasks.demo.models import Patient

    return Patient.objects.filter(id=pid).values_list("mrn", flat=True).first()  # site: helper


def _catalogue() -> dict[str, tuple[Callable[[], Any], str]]:
    from django.db import connection
    from django.db.models import Max

    from hms_tasks.demo.models import Appointment, Department, Encounter, Patient

    def fk_in_loop() -> None:
        for a in Appointment.objects.order_by("id")[:12]:
            _ = a.patient.mrn  # site: fk_in_loop

    def reverse_set_in_loop() -> None:
        for p in Patient.objects.order_by("id")[:12]:
            _ = list(p.appointments.all())  # site: reverse_set_in_loop

    def count_in_loop() -> None:
        for p in Patient.objects.order_by("id")[:12]:
            _ = p.encounters.count()  # site: count_in_loop

    def template_nested_loop() -> None:
        for d in Department.objects.order_by("id")[:4]:
            for e in d.encounters.order_by("id")[:4]:
                _ = e.patient.family_name  # site: template_nested_loop

    def exists_in_loop() -> None:
        for pid in _ids(Patient):
            _ = Encounter.objects.filter(patient_id=pid).exists()  # site: exists_in_loop

    def get_in_loop() -> None:
        for pid in _ids(Patient):
            _ = Patient.objects.get(id=pid)  # site: get_in_loop

    def duplicate_get() -> None:
        pid = _ids(Patient, 1)[0]
        for _ in range(2):
            _ = Patient.objects.get(id=pid)  # site: duplicate_get

    def first_in_loop() -> None:
        for p in Patient.objects.order_by("id")[:12]:
            _ = p.appointments.order_by("scheduled_at").first()  # site: first_in_loop

    def aggregate_in_loop() -> None:
        for pid in _ids(Patient):
            _ = Encounter.objects.filter(patient_id=pid).aggregate(  # site: aggregate_in_loop
                Max("admitted_at"))

    def helper_in_loop() -> None:
        for pid in _ids(Patient):
            _helper_lookup(pid)

    def two_hop_fk() -> None:
        for a in Appointment.objects.order_by("id")[:12]:
            _ = a.practitioner.department.code  # site: two_hop_fk

    def raw_sql_literals() -> None:
        with connection.cursor() as cursor:
            for pid in _ids(Patient):
                # Literals inlined on purpose: the fingerprint must collapse them.
                cursor.execute(f"SELECT mrn FROM hms_patient WHERE id = {int(pid)}")  # site: raw_sql_literals  # noqa: E501

    return {
        "fk_in_loop": (fk_in_loop, "fk_in_loop"),
        "reverse_set_in_loop": (reverse_set_in_loop, "reverse_set_in_loop"),
        "count_in_loop": (count_in_loop, "count_in_loop"),
        "template_nested_loop": (template_nested_loop, "template_nested_loop"),
        "exists_in_loop": (exists_in_loop, "exists_in_loop"),
        "get_in_loop": (get_in_loop, "get_in_loop"),
        "duplicate_get": (duplicate_get, "duplicate_get"),
        "first_in_loop": (first_in_loop, "first_in_loop"),
        "aggregate_in_loop": (aggregate_in_loop, "aggregate_in_loop"),
        "helper_in_loop": (helper_in_loop, "helper"),
        "two_hop_fk": (two_hop_fk, "two_hop_fk"),
        "raw_sql_literals": (raw_sql_literals, "raw_sql_literals"),
    }


def _line_of(marker: str) -> int:
    with open(__file__, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if f"# site: {marker}" in line and "_line_of" not in line:
                return number
    raise LookupError(marker)


def part_detection() -> list[dict[str, Any]]:
    from hms_tasks.queries import audit, probes, register_probe

    found = 0
    missed = []
    catalogue = _catalogue()
    for name, (fn, marker) in catalogue.items():
        register_probe(f"bench.{name}", fn)
        report = audit(f"bench.{name}")
        want = f"bench/queries.py:{_line_of(marker)}"
        kinds = report["duplicates"] if name == "duplicate_get" else report["n_plus_one"]
        if any(p["site"] == want for p in kinds):
            found += 1
        else:
            missed.append(name)
    false_positives = 0
    demo = [n for n in probes.names() if not n.startswith("bench.")]
    for name in demo:
        report = audit(name)
        false_positives += len(report["n_plus_one"]) + len(report["duplicates"])
    if missed:
        print("missed: " + ", ".join(missed), file=sys.stderr)
    return [
        _row(f"detection: seeded patterns found at their call site (of {len(catalogue)})",
             found, None, "patterns", f"all {len(catalogue)}", ok=found == len(catalogue)),
        _row(f"detection: false positives on the {len(demo)} demo probes", false_positives,
             None, "patterns", "0", ok=false_positives == 0),
    ]


# -- overhead: the live sampling middleware on the demo API -------------------------------------


def part_overhead() -> list[dict[str, Any]]:
    from django.conf import settings
    from django.test import Client, override_settings

    from hms_tasks.demo.models import Practitioner

    pr = Practitioner.objects.order_by("id").values_list("id", flat=True)[0]
    urls = ["/api/patients/?limit=50",
            f"/api/practitioners/{pr}/appointments/today/?date=2000-01-03"]
    base = list(settings.MIDDLEWARE)
    sampling = [*base, "hms_tasks.queries.middleware.QuerySamplingMiddleware"]
    modes = {"none": (base, 0.0), "1%": (sampling, 0.01), "100%": (sampling, 1.0)}
    clients: dict[str, Any] = {}
    per_request: dict[str, list[float]] = {m: [] for m in modes}
    requests = 200
    for _round in range(15):
        for mode, (middleware, rate) in modes.items():
            with override_settings(MIDDLEWARE=middleware, HMS_TASKS_QUERIES_SAMPLE_RATE=rate):
                client = clients.get(mode) or Client(HTTP_HOST="localhost")
                clients[mode] = client
                t0 = time.perf_counter()
                for i in range(requests):
                    client.get(urls[i % 2])
                per_request[mode].append((time.perf_counter() - t0) * 1000 / requests)
    med = {m: statistics.median(v) for m, v in per_request.items()}
    rows = []
    for mode, limit in (("1%", 3.0), ("100%", 15.0)):
        over = 100.0 * (med[mode] / med["none"] - 1)
        rows.append(_row(f"overhead: live sampling at {mode}: ms per request", med[mode],
                         med["none"], "ms", f"<= {limit:g} % (measured {over:+.1f} %)",
                         ratio=med[mode] / med["none"], ok=over <= limit))
    return rows


# -- audit time ---------------------------------------------------------------------------------


def part_audit() -> list[dict[str, Any]]:
    from hms_tasks.demo.models import Patient
    from hms_tasks.queries import audits, probes

    patients = Patient.objects.count()
    t0 = time.perf_counter()
    summary = audits.run(None)
    seconds = time.perf_counter() - t0
    return [_row(f"audit: every demo probe ({len(probes.names())}) on {patients:,} patients",
                 seconds, None, "s", "<= 10 s", ok=seconds <= 10 and summary["failed"] == 0)]


def main(part: str) -> None:
    import django

    django.setup()
    rows = {"reduction": part_reduction, "detection": part_detection,
            "overhead": part_overhead, "audit": part_audit}[part]()
    print(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv[1])
