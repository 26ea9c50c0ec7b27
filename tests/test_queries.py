"""The queries capability: fingerprints, probes and audits, plans and index advice, live
sampling, the task and the CLI. Real database (SQLite, or PostgreSQL with DATABASE_URL), real
Redis, a real worker."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import date
from typing import Any

import pytest
from click.testing import CliRunner
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.test import Client, override_settings
from django.urls import path

from hms_tasks import store
from hms_tasks.demo.models import Appointment, Patient
from hms_tasks.demo.seed import seed
from hms_tasks.errors import InvalidArguments
from hms_tasks.queries import audit, audits, live, probes, register_probe, unregister_probe
from hms_tasks.queries.cli import queries as queries_cli
from hms_tasks.queries.fingerprint import fingerprint, read_only
from tests.helpers import RedisServer

pytestmark = pytest.mark.django_db

CANARY = "Zqxcanaryname"
THIS = "tests/test_queries.py"
MIDDLEWARE = ["hms_tasks.queries.middleware.QuerySamplingMiddleware"]


@pytest.fixture
def hospital() -> None:
    seed(patients=60, seed=5)


@pytest.fixture
def scratch_probes() -> Iterator[list[str]]:
    """Probe names a test registers; unregistered after it."""
    made: list[str] = []
    yield made
    for name in made:
        unregister_probe(name)


def _line(marker: str) -> int:
    """The line of this file holding ``marker`` (a call site the detection must name)."""
    with open(__file__, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if marker in line and "_line(" not in line:
                return number
    raise AssertionError(marker)


# -- fingerprints ------------------------------------------------------------------------------


def test_fingerprints_drop_every_value_and_collapse_lists() -> None:
    sql = ("SELECT \"hms_patient\".\"id\" FROM \"hms_patient\" WHERE \"hms_patient\".\"id\" IN"
           " (%s, %s, 7) AND name = 'O''Brien' AND n > -2.5 -- note\n LIMIT 21")
    fp = fingerprint(sql)
    assert fp == ('SELECT "hms_patient"."id" FROM "hms_patient" WHERE "hms_patient"."id" IN'
                  " (...) AND name = ? AND n > ? LIMIT ?")
    assert fingerprint("INSERT INTO t (a, b) VALUES (%s, %s), (%s, %s)") == (
        "INSERT INTO t (a, b) VALUES (...)")
    # One IN list or another, same shape.
    assert fingerprint("SELECT a FROM t WHERE a IN (%s)") == fingerprint(
        "SELECT a FROM t WHERE a IN (%s, %s, %s)")


@pytest.mark.parametrize(("sql", "ok"), [
    ("SELECT 1", True),
    ("  /* x */ select a from b where c = %s", True),
    ("WITH gone AS (DELETE FROM a RETURNING *) SELECT * FROM gone", False),
    ("SELECT * FROM a FOR UPDATE", False),
    ("SELECT 1; DELETE FROM a", False),
    ("SELECT * INTO b FROM a", False),
    ("UPDATE a SET b = 1", False),
])
def test_only_plain_selects_are_analyzed(sql: str, ok: bool) -> None:
    assert read_only(sql) is ok


def test_register_probe_refuses_bad_arguments_without_registering() -> None:
    with pytest.raises(InvalidArguments) as err:
        register_probe("Bad Name!", "not callable", queries=-1, ms=0)  # type: ignore[arg-type]
    text = str(err.value)
    assert "name:" in text
    assert "fn:" in text
    assert "queries:" in text
    assert "ms:" in text
    assert "Bad Name!" not in text
    assert "Bad Name!" not in probes.names()


def test_an_unknown_probe_runs_nothing() -> None:
    with pytest.raises(InvalidArguments) as err:
        audit("no.such.probe")
    assert "probe: unknown probe" in str(err.value)
    assert "no.such.probe" not in str(err.value)


# -- audits ------------------------------------------------------------------------------------


def _fk_in_loop() -> None:
    for appt in Appointment.objects.order_by("id")[:10]:
        _ = appt.patient.family_name  # marker: fk-in-loop


def test_audit_finds_an_n_plus_one_at_its_call_site_and_rolls_back(
        hospital: None, scratch_probes: list[str]) -> None:
    before = Patient.objects.count()

    def probe() -> None:
        Patient.objects.create(mrn="AUDIT-1", given_name="A", family_name="B",
                               birth_date=date(1990, 1, 1))
        _fk_in_loop()

    register_probe("t.fk_loop", probe, queries=5, ms=60_000)
    scratch_probes.append("t.fk_loop")
    report = audit("t.fk_loop")

    assert set(report) == {"probe", "queries", "ms", "n_plus_one", "duplicates", "plans",
                           "advice", "budget"}
    assert report["probe"] == "t.fk_loop"
    [pattern] = report["n_plus_one"]
    assert pattern["site"] == f"{THIS}:{_line('marker: fk-in-loop')}"
    assert pattern["count"] == 10
    assert "hms_patient" in pattern["fingerprint"]
    assert "?" in pattern["fingerprint"]
    assert report["queries"] >= 12
    assert report["budget"]["queries"] == {"limit": 5, "actual": report["queries"], "ok": False}
    assert report["budget"]["ms"]["ok"] is True
    # Every distinct statement has a plan (the insert is explained, never analyzed).
    assert {p["fingerprint"] for p in report["plans"]} >= {pattern["fingerprint"]}
    assert all(not p["analyzed"] for p in report["plans"] if p["fingerprint"].startswith("INSERT"))
    # The transaction was rolled back.
    assert Patient.objects.count() == before
    assert not Patient.objects.filter(mrn="AUDIT-1").exists()


def test_duplicates_are_the_same_statement_and_parameters(
        hospital: None, scratch_probes: list[str]) -> None:
    pid = Patient.objects.order_by("id").values_list("id", flat=True)[0]

    def probe() -> None:
        for _ in range(2):
            Patient.objects.get(id=pid)  # marker: duplicate

    register_probe("t.dup", probe)
    scratch_probes.append("t.dup")
    report = audit("t.dup")
    [dup] = report["duplicates"]
    assert dup["count"] == 2
    assert dup["site"] == f"{THIS}:{_line('marker: duplicate')}"
    assert report["n_plus_one"] == []  # 2 < HMS_TASKS_QUERIES_N_PLUS_ONE_MIN
    assert report["budget"]["queries"] == {"limit": None, "actual": 2, "ok": True}


def test_a_failing_probe_is_rolled_back_and_reported_by_class(
        scratch_probes: list[str]) -> None:
    def probe() -> None:
        Patient.objects.create(mrn="FAIL-1", given_name=CANARY, family_name="B",
                               birth_date=date(1990, 1, 1))
        raise ValueError(CANARY)

    register_probe("t.fails", probe)
    scratch_probes.append("t.fails")
    with pytest.raises(audits.ProbeFailed) as err:
        audit("t.fails")
    assert str(err.value) == "probe t.fails raised ValueError"
    assert not Patient.objects.filter(mrn="FAIL-1").exists()


@override_settings(HMS_TASKS_QUERIES_ADVICE_MIN_ROWS=30)
def test_a_filtered_sequential_scan_gives_index_advice_unless_an_index_leads(
        hospital: None, scratch_probes: list[str]) -> None:
    register_probe("t.by_name", lambda: list(Patient.objects.filter(given_name=CANARY)))
    register_probe("t.by_mrn", lambda: list(Patient.objects.filter(mrn="X-1")))
    scratch_probes.extend(["t.by_name", "t.by_mrn"])
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:  # statistics, so the planner knows the table
            cursor.execute("ANALYZE hms_patient")
    report = audit("t.by_name")
    [advice] = report["advice"]
    assert advice["table"] == "hms_patient"
    assert advice["columns"] == ["given_name"]
    concurrently = " CONCURRENTLY" if connection.vendor == "postgresql" else ""
    assert advice["sql"] == (f'CREATE INDEX{concurrently} "hms_patient_given_name_idx" ON'
                             ' "hms_patient" ("given_name")')
    [plan] = report["plans"]
    assert plan["engine"] == connection.vendor
    if connection.vendor == "postgresql":
        assert plan["analyzed"] is True
        assert plan["plan"]["Node Type"] == "Seq Scan"
        assert "?" in plan["plan"]["Filter"]
    # mrn is unique: its index leads with the column, whatever plan a small table gets.
    assert audit("t.by_mrn")["advice"] == []
    with override_settings(HMS_TASKS_QUERIES_ADVICE_MIN_ROWS=10_000):
        assert audit("t.by_name")["advice"] == []  # a small table: a scan is fine


def test_record_keeps_history_flags_regressions_and_writes_series(
        hospital: None, scratch_probes: list[str]) -> None:
    from hms_tasks.metrics import store as ts

    size = {"n": 3}

    def probe() -> None:
        for appt in Appointment.objects.order_by("id")[: size["n"]]:
            _ = appt.patient_id

    register_probe("t.grows", probe, queries=2)
    scratch_probes.append("t.grows")
    first = audits.record(audit("t.grows"), now=1_000_000.0 + 0)
    assert first["regressed"] is False
    assert first["over_budget"] is False
    size["n"] = 0  # the same single statement: no worse
    assert audits.record(audit("t.grows"))["regressed"] is False
    register_probe("t.grows", _fk_in_loop, queries=2)  # now an N+1: more statements
    worse = audits.record(audit("t.grows"))
    assert worse["regressed"] is True
    assert worse["over_budget"] is True
    assert [h["regressed"] for h in audits.history("t.grows")] == [True, False, False]
    doc = audits.last_report("t.grows")
    assert doc is not None
    assert doc["version"] == 1
    assert doc["report"]["probe"] == "t.grows"
    latest = ts.latest()
    assert latest[ts.series_id("queries.over_budget", {"probe": "t.grows"})].value == 1.0
    assert latest[ts.series_id("queries.regressed", {"probe": "t.grows"})].value == 1.0


@override_settings(HMS_TASKS_QUERIES_HISTORY=2)
def test_history_is_capped(scratch_probes: list[str]) -> None:
    register_probe("t.capped", lambda: list(Patient.objects.all()[:1]))
    scratch_probes.append("t.capped")
    for _ in range(4):
        audits.record(audit("t.capped"))
    assert len(audits.history("t.capped")) == 2


def test_the_demo_probes_stay_in_budget_without_false_positives(hospital: None) -> None:
    demo = [n for n in probes.names() if n.startswith(("api.", "builder."))]
    assert len(demo) == 9
    for name in demo:
        report = audit(name)
        assert report["n_plus_one"] == [], name
        assert report["duplicates"] == [], name
        assert report["budget"]["queries"]["ok"], (name, report["queries"])


# -- the canary: a patient name used as a filter value ------------------------------------------


def _canary_view(request: HttpRequest) -> JsonResponse:
    names = []
    for appt in Appointment.objects.order_by("id")[:5]:
        found = Patient.objects.filter(given_name=CANARY, id=appt.patient_id)
        names.append(found.exists())  # marker: view-loop
    return JsonResponse({"n": len(names)})


urlpatterns = [path("canary/", _canary_view)]


def _everything_in_redis() -> str:
    client = store.client(decode=False)
    out = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"string":
            out.append(client.get(key) or b"")
        elif kind == b"hash":
            out += [b"%s=%s" % kv for kv in client.hgetall(key).items()]
        elif kind == b"list":
            out += client.lrange(key, 0, -1)
        elif kind == b"zset":
            out += [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == b"set":
            out += list(client.smembers(key))
        elif kind == b"stream":
            out += [repr(e).encode() for e in client.xrange(key)]
        out.append(key)
    return b"\n".join(out).decode("utf-8", "replace")


@pytest.mark.urls("tests.test_queries")
@override_settings(HMS_TASKS_QUERIES_ADVICE_MIN_ROWS=10, HMS_TASKS_QUERIES_SAMPLE_RATE=1.0,
                   MIDDLEWARE=MIDDLEWARE)
def test_canary_a_patient_name_never_reaches_redis_logs_or_reports(
        hospital: None, scratch_probes: list[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    Patient.objects.create(mrn="CANARY-1", given_name=CANARY, family_name=CANARY,
                           birth_date=date(1980, 2, 3))

    def probe() -> None:
        for appt in Appointment.objects.order_by("id")[:5]:
            list(Patient.objects.filter(given_name=CANARY, id=appt.patient_id))
        list(Patient.objects.filter(given_name=CANARY))
        list(Patient.objects.filter(given_name=CANARY))

    register_probe("t.canary", probe, queries=1)
    scratch_probes.append("t.canary")
    report = audit("t.canary")
    audits.record(report)
    assert report["n_plus_one"]
    assert report["duplicates"]
    assert report["plans"]
    # Live sampling of a request that filters by the name, flushed to Redis.
    assert Client(HTTP_HOST="localhost").get("/canary/").status_code == 200
    assert live.sampler().flush()
    result = CliRunner().invoke(queries_cli, ["report", "--json"])
    shown = CliRunner().invoke(queries_cli, ["explain", "t.canary", "--json"])
    [seen] = live.report()["patterns"]
    assert seen["site"] == f"{THIS}:{_line('marker: view-loop')}"

    everywhere = "\n".join([json.dumps(report), _everything_in_redis(), caplog.text,
                            result.output, shown.output, json.dumps(live.report())])
    assert "CANARY-1" not in everywhere
    assert CANARY not in everywhere
    assert CANARY.lower() not in everywhere.lower()


# -- live sampling -----------------------------------------------------------------------------


@pytest.mark.urls("tests.test_queries")
@override_settings(HMS_TASKS_QUERIES_SAMPLE_RATE=1.0, MIDDLEWARE=MIDDLEWARE)
def test_live_sampling_counts_n_plus_one_per_call_site(hospital: None) -> None:
    client = Client(HTTP_HOST="localhost")
    for _ in range(3):
        assert client.get("/canary/").status_code == 200
    assert live.sampler().flush()
    data = live.report()
    assert data["requests"] == 3
    [pattern] = data["patterns"]
    assert pattern["count"] == 3
    assert pattern["max_per_request"] == 5
    assert pattern["last_seen"] > 0
    assert "?" in pattern["fingerprint"]


@pytest.mark.urls("tests.test_queries")
@override_settings(HMS_TASKS_QUERIES_SAMPLE_RATE=0.0, MIDDLEWARE=MIDDLEWARE)
def test_rate_zero_samples_nothing(hospital: None) -> None:
    assert Client(HTTP_HOST="localhost").get("/canary/").status_code == 200
    live.sampler().flush()
    assert live.report()["requests"] == 0


@pytest.mark.urls("tests.test_queries")
@override_settings(HMS_TASKS_QUERIES_SAMPLE_RATE=1.0, MIDDLEWARE=MIDDLEWARE)
def test_a_redis_outage_drops_the_sample_never_the_request(
        hospital: None, redis_server: RedisServer) -> None:
    sampler = live.sampler()
    dropped = sampler.dropped
    redis_server.stop()
    client = Client(HTTP_HOST="localhost")
    for _ in range(2):
        assert client.get("/canary/").status_code == 200
    assert sampler.flush() is False
    assert sampler.dropped == dropped + 1
    redis_server.start()
    store.reset()
    assert client.get("/canary/").status_code == 200
    assert sampler.flush() is True
    assert live.report()["requests"] == 1  # the outage's samples were dropped


def test_the_sample_rate_is_validated() -> None:
    from hms_tasks.errors import ConfigurationError
    from hms_tasks.queries import settings

    with override_settings(HMS_TASKS_QUERIES_SAMPLE_RATE=-0.5), \
            pytest.raises(ConfigurationError) as err:
        settings.get()
    assert "HMS_TASKS_QUERIES_SAMPLE_RATE" in str(err.value)
    assert "-0.5" not in str(err.value)


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_bad_input_exits_2_and_runs_nothing(scratch_probes: list[str]) -> None:
    ran: list[int] = []
    register_probe("t.cli", lambda: ran.append(1))
    scratch_probes.append("t.cli")
    for args in (["audit", "no.such"], ["explain", "no.such"], ["live", "--limit", "-1"]):
        result = CliRunner().invoke(queries_cli, args)
        assert result.exit_code == 2, (args, result.output)
    with override_settings(HMS_TASKS_QUERIES_SAMPLE_RATE=-1.0):
        result = CliRunner().invoke(queries_cli, ["audit", "t.cli"])
        assert result.exit_code == 2
        assert "HMS_TASKS_QUERIES_SAMPLE_RATE" in result.output
    assert ran == []
    assert store.client().exists(store.key("queries", "probes")) == 0


def test_cli_audit_stores_a_report_and_exits_1_over_budget(
        hospital: None, scratch_probes: list[str]) -> None:
    register_probe("t.cli_ok", lambda: list(Patient.objects.all()[:1]), queries=1)
    register_probe("t.cli_over", _fk_in_loop, queries=1)
    scratch_probes.extend(["t.cli_ok", "t.cli_over"])
    ok = CliRunner().invoke(queries_cli, ["audit", "t.cli_ok", "--json"])
    assert ok.exit_code == 0, ok.output
    [doc] = json.loads(ok.output)
    assert doc["queries"] == 1
    over = CliRunner().invoke(queries_cli, ["audit", "t.cli_over"])
    assert over.exit_code == 1
    assert f"N+1 x10 at {THIS}:{_line('marker: fk-in-loop')}" in over.output
    report = CliRunner().invoke(queries_cli, ["report"])
    assert report.exit_code == 1
    assert "t.cli_ok" in report.output
    assert "t.cli_over" in report.output


# -- the task on a real worker -----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_audit_task_runs_on_a_worker_and_refuses_unknown_probes(
        worker: Any, scratch_probes: list[str]) -> None:
    from hms_tasks.celery import app
    from hms_tasks.queries import names

    register_probe("t.task", lambda: list(Patient.objects.all()[:1]), queries=1)
    scratch_probes.append("t.task")
    result = app.send_task(names.QUERIES_AUDIT, kwargs={"probe": "t.task"})
    summary: dict[str, Any] = result.get(timeout=60)
    assert summary["probes"] == 1
    assert summary["failed"] == 0
    assert summary["results"]["t.task"]["queries"] == 1
    assert audits.last_report("t.task") is not None
    bad = app.send_task(names.QUERIES_AUDIT, kwargs={"probe": "no.such"})
    with pytest.raises(Exception, match="unknown probe"):
        bad.get(timeout=60)
    assert audits.last_report("no.such") is None
    live_summary = app.send_task(names.QUERIES_LIVE_REPORT).get(timeout=60)
    assert live_summary["requests"] == 0
