"""Database health: pool figures, pg_stat_activity figures, statement statistics, ``hms-tasks db``.

Real parts: the test database (PostgreSQL when ``DATABASE_URL`` names one; the tests that need
a server skip on SQLite and say so), extra psycopg connections that hold a transaction or a
lock, Django's own psycopg pool, the session's Redis. Statement statistics run on a private
PostgreSQL 15 cluster this module starts with pg_stat_statements preloaded (the shared server
does not preload it), collected by a process whose DATABASE_URL names that cluster.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
from click.testing import CliRunner
from django.db import connection
from django.test import override_settings

from hms_tasks import nodes, store
from hms_tasks.metrics import collect
from hms_tasks.metrics import store as ts
from hms_tasks.queries import db_cli, pool, statements
from tests.helpers import RedisServer, free_port, wait_for

REPO = Path(__file__).resolve().parent.parent

PG_ONLY = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="needs a PostgreSQL server (pg_stat_activity, psycopg pool): DATABASE_URL is not"
           " postgres://, the suite runs this file on PostgreSQL too (make test)")


def _connect(**extra: Any) -> Any:
    """A second real connection to the test database, outside Django."""
    s = connection.settings_dict
    return psycopg.connect(dbname=s["NAME"], user=s["USER"] or None,
                           password=s["PASSWORD"] or None, host=s["HOST"] or None,
                           port=s["PORT"] or None, autocommit=True, **extra)


@pytest.fixture
def lock_table() -> Iterator[str]:
    with _connect() as conn:
        conn.execute("CREATE TABLE dbpool_lock_probe (id int PRIMARY KEY, n int)")
        conn.execute("INSERT INTO dbpool_lock_probe VALUES (1, 0)")
    yield "dbpool_lock_probe"
    with _connect() as conn:
        conn.execute("DROP TABLE IF EXISTS dbpool_lock_probe")


# -- pure parts ----------------------------------------------------------------------------------


def test_scrub_removes_literals_and_keeps_parameters() -> None:
    text = ("SELECT * FROM demo_patient WHERE last_name = 'Smith' AND id IN ($1, 42)"
            " AND note = E'it''s' AND x = $$raw$$ AND t1.c2 > -3.5e2")
    out = statements.scrub(text, 500)
    assert "Smith" not in out
    assert "42" not in out
    assert "raw" not in out
    assert "it" not in out
    assert "$1" in out
    assert "t1.c2" in out
    assert "demo_patient" in out
    assert statements.scrub("SELECT 1", 0) == ""
    assert len(statements.scrub("SELECT " + "a, " * 200, 40)) == 40


def _fig(pid: int, *, num: int, queued: int, wait_ms: int, at: float, waiting: int = 0,
         size: int = 2, available: int = 1) -> pool.PoolFigures:
    return {"v": 1, "node": "w@h", "pid": pid, "alias": "default", "at": at, "pool_min": 1,
            "pool_max": 4, "pool_size": size, "pool_available": available,
            "requests_waiting": waiting, "requests_num": num, "requests_queued": queued,
            "requests_wait_ms": wait_ms, "requests_errors": 0, "connections_errors": 0,
            "connections_lost": 0, "returns_bad": 0}


def test_summary_rates_and_the_p95_estimate() -> None:
    prev = {"w@h|1": "100.0 1000 10 50 0", "w@h|2": "100.0 500 0 0 0"}
    # 1000 more requests over 10 s, 100 of them queued (10 %), waiting 5,000 ms in all.
    docs = [_fig(1, num=1600, queued=110, wait_ms=5050, at=110.0),
            _fig(2, num=900, queued=0, wait_ms=0, at=110.0, waiting=3)]
    out = pool.summarize(docs, prev)
    assert out["requests_per_s"] == 100.0
    assert out["wait_ms_mean"] == 5.0
    assert out["wait_p95_ms"] == 50.0  # over 5 % queued: a queued request's mean wait
    assert out["waiting"] == 3
    assert out["size"] == 4
    assert out["max"] == 8
    assert out["used_percent"] == 25.0
    # Under 5 % queued: 95 % of the requests did not wait at all.
    calm = pool.summarize([_fig(1, num=2000, queued=40, wait_ms=10_050, at=110.0)], prev)
    assert calm["wait_p95_ms"] == 0.0
    # Counters that went back (a new pool in a reused pid) count from zero.
    fresh = pool.summarize([_fig(1, num=10, queued=0, wait_ms=0, at=110.0)], prev)
    assert fresh["wait_ms_mean"] == 0.0


# -- the server's side ---------------------------------------------------------------------------


@PG_ONLY
@pytest.mark.django_db(transaction=True)
@override_settings(HMS_TASKS_DB_IDLE_IN_TRANSACTION_SECONDS=1)
def test_idle_in_transaction_is_detected() -> None:
    doc, _ = collect.database_sample(now=0.0)
    assert doc["idle_in_transaction"] == 0
    with _connect() as idler:
        idler.execute("BEGIN")
        idler.execute("SELECT 1")  # then idles, in its transaction

        def seen() -> dict[str, Any] | None:
            d, _ = collect.database_sample(now=ts_now())
            return d if d["idle_in_transaction"] >= 1 else None

        doc = wait_for(seen, timeout=15)
        assert doc["idle_in_transaction_max_age_s"] >= 1.0
        _, points = collect.database_sample(now=ts_now())
        values = {sid: v for sid, _, v in points}
        assert values["db.idle_in_transaction"] >= 1
        ts.write(points)
        result = CliRunner().invoke(db_cli.db, [])
        assert result.exit_code == 1, result.output
        assert "idle in a transaction longer than 1 s" in result.output
        idler.execute("ROLLBACK")
    doc, _ = collect.database_sample(now=ts_now())
    assert doc["idle_in_transaction"] == 0


def ts_now() -> float:
    import time

    return time.time()


@PG_ONLY
@pytest.mark.django_db(transaction=True)
def test_lock_wait_and_longest_query_are_detected(lock_table: str) -> None:
    done = threading.Event()
    errors: list[BaseException] = []

    def blocked_update() -> None:
        try:
            with _connect() as waiter:
                waiter.execute(f"UPDATE {lock_table} SET n = n + 1 WHERE id = 1")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    with _connect() as holder:
        holder.execute("BEGIN")
        holder.execute(f"SELECT * FROM {lock_table} WHERE id = 1 FOR UPDATE")
        thread = threading.Thread(target=blocked_update, daemon=True)
        thread.start()
        # The blocked UPDATE is the running query; its age is rounded to the millisecond, so
        # a sample taken the moment it blocked can read 0.0 (seen once in CI).
        doc = wait_for(lambda: (d := collect.database_sample(now=ts_now())[0])["lock_waits"]
                       and d["longest_query_s"] > 0 and d, timeout=15)
        assert doc["lock_waits"] >= 1
        assert doc["longest_query_s"] > 0
        assert not done.is_set()
        holder.execute("ROLLBACK")
    wait_for(done.is_set, timeout=15)
    thread.join(timeout=5)
    assert not errors
    assert collect.database_sample(now=ts_now())[0]["lock_waits"] == 0


@PG_ONLY
@pytest.mark.django_db(transaction=True)
def test_saturation_is_the_server_wide_share_of_max_connections() -> None:
    doc, points = collect.database_sample(now=ts_now())
    assert doc["max_connections"] > 0
    assert doc["server_connections"] >= doc["connections"] >= 1
    expected = round(100.0 * doc["server_connections"] / doc["max_connections"], 3)
    assert doc["connections_used_percent"] == expected
    assert ("db.connections_used_percent", pytest.approx(expected)) in [
        (sid, v) for sid, _, v in points]


# -- the pool --------------------------------------------------------------------------------------


@PG_ONLY
@pytest.mark.django_db(transaction=True)
def test_pool_figures_are_recorded_from_a_real_pool() -> None:
    if connection.pool is None:  # type: ignore[attr-defined]  # PostgreSQL backend only
        pytest.skip("the connection pool is off (HMS_DB_POOL=0)")
    for _ in range(3):
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
        connection.close()  # back to the pool
    published = pool.publish(force=True)
    assert published is not None
    assert published["requests_num"] >= 3
    assert published["pool_size"] >= 1
    assert published["pool_max"] >= published["pool_size"]
    node = nodes.current()
    summaries, points = pool.node_points(node, now=ts_now())
    assert summaries[node]["size"] >= 1
    assert "wait_ms_mean" in summaries[node]
    ts.write(points)
    latest = ts.latest()
    assert ts.series_id("db.pool.size", {"node": node}) in latest
    # A worker node's sample carries its processes' pool figures too.
    _, node_points = collect.node_sample(node)
    assert ts.series_id("db.pool.max", {"node": node}) in {sid for sid, _, _ in node_points}
    # A process that published but went quiet drops out once stale.
    later = published["at"] + 10_000
    assert all(p["pid"] != published["pid"] or p["at"] >= later - 1
               for p in pool.processes(now=later))


@PG_ONLY
@pytest.mark.django_db(transaction=True)
def test_a_waiting_request_is_counted_by_the_pool() -> None:
    """A pool of one connection, held by one thread while another asks for it: the pool
    counts a queued request and its wait, and ``summarize`` reports it."""
    from psycopg_pool import ConnectionPool

    s = connection.settings_dict
    conninfo = f"dbname={s['NAME']} user={s['USER']} host={s['HOST']} port={s['PORT']}"
    with ConnectionPool(conninfo, min_size=1, max_size=1, open=True, timeout=10) as real:
        held = real.getconn()
        got = threading.Event()

        def ask() -> None:
            with real.connection():
                got.set()

        t = threading.Thread(target=ask, daemon=True)
        t.start()
        wait_for(lambda: real.get_stats().get("requests_waiting", 0) == 1, timeout=10)
        real.putconn(held)
        wait_for(got.is_set, timeout=10)
        t.join(timeout=5)
        stats = real.get_stats()
    assert stats["requests_queued"] >= 1
    fig = _fig(1, num=stats["requests_num"], queued=stats["requests_queued"],
               wait_ms=stats.get("requests_wait_ms", 0), at=1.0)
    assert pool.summarize([fig])["wait_p95_ms"] == pytest.approx(
        stats.get("requests_wait_ms", 0) / stats["requests_queued"], abs=0.001)


# -- statements ------------------------------------------------------------------------------------


def _pss_loaded() -> bool:
    with _connect() as conn:
        row = conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()
        return "pg_stat_statements" in str(row[0] if row else "")


@pytest.mark.django_db(transaction=True)
def test_statements_name_the_install_step_when_missing() -> None:
    if connection.vendor == "postgresql" and _pss_loaded():
        pytest.skip("pg_stat_statements is loaded on this server: the missing path needs one"
                    " without it")
    report = statements.collect()
    if connection.vendor != "postgresql":
        assert report["status"] == "unsupported"
        assert "PostgreSQL" in str(report["reason"])
    else:
        assert report["status"] == "missing"
        assert "shared_preload_libraries" in str(report["reason"])
        assert "CREATE EXTENSION pg_stat_statements" in str(report["reason"])
    assert report["top"] == []
    assert report["deltas"] == {}
    assert statements.latest() == report
    assert not [n for n in ts.series_names() if n.startswith("db.statement.")]
    result = CliRunner().invoke(db_cli.statements, [])
    assert result.exit_code == 0
    assert report["status"] in result.output


PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres(home: Path) -> list[str]:
    """The command prefix that runs PostgreSQL's programs as the owner of ``home``: initdb and
    the server refuse root, so as root they run as the ``postgres`` OS user."""
    if os.geteuid() != 0:
        return []
    owner = pwd.getpwnam("postgres")
    os.chown(home, owner.pw_uid, owner.pw_gid)
    return ["runuser", "-u", "postgres", "--"]


@pytest.fixture(scope="module")
def private_pg() -> Iterator[str]:
    """A PostgreSQL 15 cluster of this module's own, on a free loopback port, that preloads
    pg_stat_statements (the shared server does not, and must not be restarted); its URL.

    Trust authentication, the extension created in the ``postgres`` database; stopped and
    deleted at the end.
    """
    if not (PG_BIN / "pg_ctl").exists():
        reason = f"PostgreSQL 15's server programs are not installed ({PG_BIN})"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must run the statement statistics test")
        pytest.skip(reason)
    # Not under pytest's tmp_path: its parent is private to the user running pytest.
    home = Path(tempfile.mkdtemp(prefix="hms-pgstat-"))
    prefix = _as_postgres(home)
    data, log, port = home / "data", home / "server.log", free_port()

    def run(program: str, *args: str) -> None:
        proc = subprocess.run([*prefix, str(PG_BIN / program), *args], capture_output=True,
                              text=True, timeout=60)
        detail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        assert proc.returncode == 0, f"{program}: {proc.stderr}{detail}"

    try:
        run("initdb", "-D", str(data), "--auth=trust", "--username=postgres", "--no-sync",
            "--encoding=UTF8", "--locale=C")
        run("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "30", "-o",
            f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={home}"
            " -c shared_preload_libraries=pg_stat_statements", "start")
        try:
            url = f"postgres://postgres@127.0.0.1:{port}/postgres"
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION pg_stat_statements")
            yield url
        finally:
            run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _collect_in_a_process(env: dict[str, str]) -> statements.StatementsReport:
    """``statements.collect`` in a process whose DATABASE_URL names the private cluster (this
    one's Django database is the suite's)."""
    code = ("import django, json; django.setup(); from hms_tasks.queries import statements;"
            " print(json.dumps(statements.collect(top=500)))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    report: statements.StatementsReport = json.loads(proc.stdout)
    return report


def _strings_and_hashes_in_redis() -> str:
    """Every key, string value and hash field of the session's Redis (series blocks are
    binary: decoded loosely, a name in them would still show)."""
    client = store.client(decode=False)
    out: list[bytes] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"string":
            out.append(cast("bytes | None", client.get(key)) or b"")
        elif kind == b"hash":
            out += [b"%s=%s" % kv
                    for kv in cast("dict[bytes, bytes]", client.hgetall(key)).items()]
        out.append(key)
    return b"\n".join(out).decode("utf-8", "replace")


def test_statements_deltas_become_series(private_pg: str, redis_server: RedisServer,
                                         tmp_path: Path) -> None:
    """On a server that preloads pg_stat_statements: a statement run 5 times between two
    collections is recorded as 5 calls, as a series per query id; the constants of the
    statements (a patient's name, a number) reach neither the report nor Redis."""
    canary, number = "Canary-Patient-Name", 731_864_290
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "DJANGO_SETTINGS_MODULE": "hms_tasks.demo.settings", "REDIS_URL": redis_server.url,
           "DATABASE_URL": private_pg, "HMS_TASKS_HOME": str(tmp_path)}

    with psycopg.connect(private_pg, autocommit=True) as conn:

        def run_the_canaries() -> None:
            # A constant PostgreSQL normalizes to $1, a bound parameter, and utility
            # statements whose constants PostgreSQL 15 keeps (scrubbed by hms-tasks).
            conn.execute(f"SELECT count(*) FROM pg_class WHERE relname = '{canary}'")
            conn.execute("SELECT count(*) FROM pg_type WHERE typname = %s", [canary])
            conn.execute(f"SET application_name TO '{canary}'")
            conn.execute(f"SET lock_timeout = {number}")

        run_the_canaries()
        first = _collect_in_a_process(env)
        assert first["status"] == "ok", first["reason"]
        assert first["deltas"] == {}  # nothing to compare with yet
        for _ in range(5):
            run_the_canaries()
        second = _collect_in_a_process(env)

    assert second["status"] == "ok", second["reason"]
    by_text = {st["text"]: st["queryid"] for st in second["top"]}
    for text in ("SELECT count(*) FROM pg_class WHERE relname = $1",
                 "SELECT count(*) FROM pg_type WHERE typname = $1"):
        assert second["deltas"][by_text[text]]["calls"] == 5.0, text
    # The utility statements are there, their constants scrubbed.
    assert "SET application_name TO ?" in by_text
    assert "SET lock_timeout = ?" in by_text

    qid = by_text["SELECT count(*) FROM pg_class WHERE relname = $1"]
    written = ts.latest()
    labels = {"queryid": qid}
    assert written[ts.series_id("db.statement.calls", labels)].value == 5.0
    assert written[ts.series_id("db.statement.rows", labels)].value == 5.0  # one row a call
    assert ts.series_id("db.statement.total_ms", labels) in written
    assert ts.series_id("db.statement.mean_ms", labels) in written
    assert statements.latest() == second

    everywhere = "\n".join([json.dumps(first), json.dumps(second),
                            _strings_and_hashes_in_redis()])
    for secret in (canary, str(number)):
        assert secret not in everywhere
        assert secret.lower() not in everywhere.lower()


# -- the command -----------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_db_json_and_bad_input() -> None:
    result = CliRunner().invoke(db_cli.db, ["--json"])
    assert result.exit_code in (0, 1), result.output
    doc = json.loads(result.output)
    assert doc["server"]["vendor"] == connection.vendor
    assert set(doc) >= {"server", "pools", "processes", "problems"}
    assert result.exit_code == (1 if doc["problems"] else 0)
    bad = CliRunner().invoke(db_cli.db, ["--bogus"])
    assert bad.exit_code == 2
    assert "--bogus" in bad.output
    bad = CliRunner().invoke(db_cli.statements, ["--top", "0"])
    assert bad.exit_code == 2
    assert "--top" in bad.output
