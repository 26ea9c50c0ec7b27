"""What one Redis carries: the figures behind docs/scaling.md. ``make bench BENCH=scaling``.

Not a comparison with a baseline: a measurement of Redis's own work (commands, main-thread CPU,
memory) per unit of HMS work, so the scaling plan can be written in numbers. Three parts:

- ``cache`` (a subprocess: Django on the 100,000-patient demo database the cache benchmark
  seeds, ``.hms-tasks/bench/hms-100k.sqlite3``, copied so the writes leave it untouched):
  memory of the morning warm (the hot set) and of every patient summary, per key family
  (``MEMORY USAGE`` of a sample); then one simulated peak hour of the stated workload
  (:data:`MODEL`), run flat out: its reads through ``get_or_build``, its commits (the recorder's
  call at commit, the courier's task message), one fan-out per commit, and the hour's beat
  entries of the cache (6 hot warms, 12 stats); ``INFO commandstats`` and ``INFO cpu`` before
  and after each phase.
- ``node``: one real worker node (``celery worker``, prefork, 2 children, gossip, mingle and
  heartbeats on as in production) against its own Redis: Redis commands per second while idle,
  and commands, CPU and memory per task for 1,000 hms no-op tasks.
- ``capacity``: ``redis-benchmark`` on loopback against the same kind of Redis: GET, SET, and
  the cache's read script on a warm key (EVALSHA), 50 clients, with and without pipelining.

Every figure is Redis's: main-thread CPU from ``INFO cpu``, commands from ``INFO commandstats``
(a script's inner commands are counted too; ``evalsha`` calls are the scripts themselves).
``BENCH_SCALING_PARTS=cache,node`` runs some parts only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.common import REPO, Row, private_redis, wait_until

PARTS = ("cache", "node", "capacity")
BENCH_HOME = REPO / ".hms-tasks" / "bench"
SQLITE_DB = BENCH_HOME / "hms-100k.sqlite3"
PATIENTS = 100_000

#: The peak-hour workload per 100,000 registered patients (the demo seed's hospital: 765 ward
#: beds, 590 admitted inpatients, 8,935 appointments on a weekday, 500 practitioners, 20
#: departments). Assumptions, stated in docs/scaling.md: a 10-hour clinic day; per appointment
#: 3 writes (booked -> arrived -> completed, or a move), 10 reads of the patient's summary and 2
#: of the practitioner's schedule; per admitted inpatient and hour 1 encounter write and 6
#: summary reads; every department's census read every 30 s.
CLINIC_HOURS = 10
MODEL = {
    "appointment_writes_per_appointment": 3,
    "patient_reads_per_appointment": 10,
    "schedule_reads_per_appointment": 2,
    "encounter_writes_per_inpatient_hour": 1,
    "patient_reads_per_inpatient_hour": 6,
    "census_reads_per_department_hour": 120,
}


def _stats(client: redis.Redis) -> dict[str, Any]:
    cpu = client.info("cpu")
    cmd = client.info("commandstats")
    mem = client.info("memory")
    return {
        "cpu": cpu["used_cpu_user_main_thread"] + cpu["used_cpu_sys_main_thread"],
        "calls": {k.removeprefix("cmdstat_"): v["calls"] for k, v in cmd.items()},
        "usec": {k.removeprefix("cmdstat_"): v["usec"] for k, v in cmd.items()},
        "used_memory": mem["used_memory"],
        "t": time.perf_counter(),
    }


def _delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    calls = {k: v - before["calls"].get(k, 0) for k, v in after["calls"].items()}
    calls = {k: v for k, v in calls.items() if v and not k.startswith(("info", "config"))}
    return {
        "cpu_s": round(after["cpu"] - before["cpu"], 4),
        "commands": sum(calls.values()),
        "scripts": calls.get("evalsha", 0) + calls.get("eval", 0),
        "by_command": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
        "memory_delta": after["used_memory"] - before["used_memory"],
        "seconds": round(after["t"] - before["t"], 2),
    }


def _family_sizes(client: redis.Redis, families: dict[str, str], sample: int = 300
                  ) -> dict[str, dict[str, float]]:
    """Keys and mean ``MEMORY USAGE`` per key family (a SCAN pattern), from a sample."""
    out: dict[str, dict[str, float]] = {}
    for name, pattern in families.items():
        keys = list(client.scan_iter(match=pattern, count=5000))
        picked = random.Random(1).sample(keys, min(sample, len(keys)))
        sizes = [client.memory_usage(k, samples=0) or 0 for k in picked]
        out[name] = {"keys": len(keys),
                     "bytes_per_key": round(sum(sizes) / len(sizes), 1) if sizes else 0.0}
    return out


# -- cache (a subprocess with Django set up) -------------------------------------------------


def _cache_part() -> dict[str, Any]:
    import django

    django.setup()
    from django.utils import timezone

    from hms_tasks.cache import changes, core, warming
    from hms_tasks.cache.registry import kinds
    from hms_tasks.cache.stats import cache_stats
    from hms_tasks.demo.models import Appointment, Encounter

    be = core.backend()
    client = be.client()
    facts: dict[str, Any] = {}
    families = {"patient summary": "hms-cache:1:patient:*",
                "schedule": "hms-cache:1:schedule:*", "census": "hms-cache:1:census:*",
                "generation": "hms-cache:_hms:gen:*", "tag index": "hms-cache:_hms:tag:*"}
    client.config_resetstat()
    base = _stats(client)

    # The morning warm (beat's cache-warm-morning, limit 50,000), inline.
    hot = {k: warming.hot_ids(k, 50_000) for k in kinds()}
    for kind, ids in hot.items():
        for start in range(0, len(ids), core.MAX_WARM_IDS):
            core.warm(kind, ids[start:start + core.MAX_WARM_IDS])
    warmed = _stats(client)
    facts["morning_warm"] = {"hot_ids": {k: len(v) for k, v in hot.items()},
                             **_delta(base, warmed),
                             "families": _family_sizes(client, families)}

    # Reads and writes of one peak hour.
    today = timezone.localdate()
    appts = list(Appointment.objects.filter(scheduled_at__date=today).values_list(
        "id", "patient_id", "practitioner_id"))
    inpatients = list(Encounter.objects.filter(status="admitted", kind="inpatient").values_list(
        "id", "patient_id"))
    departments = warming.hot_ids("census", 1000)
    per_hour = len(appts) / CLINIC_HOURS
    m = MODEL
    n_reads = {
        "patient": round(per_hour * m["patient_reads_per_appointment"]
                         + len(inpatients) * m["patient_reads_per_inpatient_hour"]),
        "schedule": round(per_hour * m["schedule_reads_per_appointment"]),
        "census": round(len(departments) * m["census_reads_per_department_hour"]),
    }
    n_writes = {"appointment": round(per_hour * m["appointment_writes_per_appointment"]),
                "encounter": round(len(inpatients) * m["encounter_writes_per_inpatient_hour"])}
    rng = random.Random(7)
    # Reads concentrate on the hour's patients: today's appointments and the inpatients, 10 %
    # on anyone (a record looked up at the desk: mostly misses).
    hour_patients = [a[1] for a in appts] + [e[1] for e in inpatients]
    practitioners = sorted({a[2] for a in appts})
    ops: list[tuple[str, int]] = []
    for _ in range(n_reads["patient"]):
        pid = rng.randint(1, PATIENTS) if rng.random() < 0.1 else rng.choice(hour_patients)
        ops.append(("patient", pid))
    ops += [("schedule", rng.choice(practitioners)) for _ in range(n_reads["schedule"])]
    ops += [("census", rng.choice(departments)) for _ in range(n_reads["census"])]
    ops += [("write-appointment", rng.choice(appts)[0]) for _ in range(n_writes["appointment"])]
    ops += [("write-encounter", rng.choice(inpatients)[0]) for _ in range(n_writes["encounter"])]
    rng.shuffle(ops)
    counted = _hits(client)
    before = _stats(client)
    for op, id_ in ops:
        if op == "write-appointment":
            a = Appointment.objects.get(pk=id_)
            a.save(update_fields=["status"])
            _fanout_once(changes, warming)
        elif op == "write-encounter":
            e = Encounter.objects.get(pk=id_)
            e.save(update_fields=["status"])
            _fanout_once(changes, warming)
        else:
            core.get_or_build(op, id_)
    changes.flush(10)
    after = _stats(client)
    hour = _delta(before, after)
    hits, misses = (a - b for a, b in zip(_hits(client), counted, strict=True))
    facts["hour"] = {"reads": n_reads, "writes": n_writes, "hits": hits, "misses": misses,
                     "appointments_today": len(appts), "admitted": len(inpatients),
                     "departments": len(departments), **hour,
                     "heat": {"members": client.zcard(core.heat_key(be)),
                              "bytes": client.memory_usage(core.heat_key(be), samples=0)},
                     "stats_bytes": sum(client.memory_usage(k, samples=0) or 0 for k in
                                        client.scan_iter(match="hms-cache:_hms:stats:*")),
                     "broker_queue": {"messages": client.llen("hms.cache"),
                                      "bytes": client.memory_usage("hms.cache") or 0}}

    # Reads alone and commits alone, to split the hour's cost per unit.
    sample_reads = [o for o in ops if not o[0].startswith("write")][:4000]
    b = _stats(client)
    for op, id_ in sample_reads:
        core.get_or_build(op, id_)
    facts["reads_only"] = {"n": len(sample_reads), **_delta(b, _stats(client))}
    sample_writes = [o for o in ops if o[0].startswith("write")][:600]
    b = _stats(client)
    for op, id_ in sample_writes:
        model = Appointment if op == "write-appointment" else Encounter
        model.objects.get(pk=id_).save(update_fields=["status"])
        _fanout_once(changes, warming)
    changes.flush(10)
    facts["writes_only"] = {"n": len(sample_writes), **_delta(b, _stats(client))}

    # A real fan-out task after one commit: how many times it polls the log while it lingers.
    from hms_tasks.cache.tasks import fanout_changes

    b = _stats(client)
    for op, id_ in sample_writes[:20]:
        model = Appointment if op == "write-appointment" else Encounter
        model.objects.get(pk=id_).save(update_fields=["status"])
        changes.flush(10)
        fanout_changes()
    facts["fanout_task_x20"] = _delta(b, _stats(client))
    b = _stats(client)
    for _ in range(20):
        fanout_changes()
    facts["empty_fanout_task_x20"] = _delta(b, _stats(client))

    # The hour's beat entries of the cache: warm_hot every 10 min (inline), stats every 5.
    b = _stats(client)
    for _ in range(6):
        warming.decay_heat()
        for k in kinds():
            ids = warming.hot_ids(k, 5000)
            for start in range(0, len(ids), core.MAX_WARM_IDS):
                core.warm(k, ids[start:start + core.MAX_WARM_IDS])
    facts["warm_hot_x6"] = _delta(b, _stats(client))
    b = _stats(client)
    for _ in range(12):
        cache_stats(window_minutes=15)
    facts["stats_x12"] = _delta(b, _stats(client))

    # Every patient's summary (the upper bound: the whole register cached).
    b = _stats(client)
    all_ids = list(range(1, PATIENTS + 1))
    for start in range(0, PATIENTS, core.MAX_WARM_IDS):
        core.warm("patient", all_ids[start:start + core.MAX_WARM_IDS])
    facts["all_patients"] = {**_delta(b, _stats(client)),
                             "families": _family_sizes(client, families)}
    mem = client.info("memory")
    facts["memory_end"] = {k: mem[k] for k in ("used_memory", "used_memory_dataset",
                                                "used_memory_rss", "mem_fragmentation_ratio")}
    facts["dbsize"] = client.dbsize()
    facts["broker_queue"] = {"messages": client.llen("hms.cache"),
                             "bytes": client.memory_usage("hms.cache") or 0}
    return facts


def _hits(client: redis.Redis) -> tuple[int, int]:
    """Hits and misses counted by the read script so far (every kind, every minute)."""
    hits = misses = 0
    for key in client.scan_iter(match="hms-cache:_hms:stats:*", count=1000):
        for field, value in client.hgetall(key).items():
            if field.endswith(b":hit"):
                hits += int(value)
            elif field.endswith(b":miss"):
                misses += int(value)
    return hits, misses


def _fanout_once(changes: Any, warming: Any) -> None:
    """One fan-out task's data work after a commit: apply the log, re-warm the hot keys."""
    changes.flush(10)
    applied = changes.apply_changes(clear_if_empty=True)
    if applied.hot:
        warming.refresh_ahead(applied.hot)


# -- node (this process) ---------------------------------------------------------------------


def _node_part(url: str) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    home = tempfile.mkdtemp(prefix="hms-bench-home-")
    env = {**os.environ, "REDIS_URL": url, "HMS_TASKS_HOME": home, "LOG_LEVEL": "WARNING",
           "DJANGO_SETTINGS_MODULE": "hms_tasks.demo.settings"}
    node = "bench-scaling@localhost"
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "hms_tasks", "worker", "--pool", "prefork",
         "--concurrency", "2", "--loglevel", "WARNING", "--include", "bench.overhead_tasks",
         "-Q", "bench.hms", "-n", node],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL,
        stderr=open(Path(home) / "worker.log", "ab"))  # noqa: SIM115
    facts: dict[str, Any] = {}
    try:
        os.environ["REDIS_URL"] = url
        import django

        django.setup()
        from hms_tasks import conf, store
        from hms_tasks.celery import app

        conf.reset()
        store.reset()
        app.conf.update(broker_url=url, result_backend=url)
        wait_until(lambda: bool(app.control.ping(destination=[node], timeout=0.5)), 90,
                   "the worker to answer ping")
        time.sleep(3)  # let start-up traffic settle before the idle window
        b = _stats(client)
        time.sleep(30)  # the idle window is the measurement itself
        idle = _delta(b, _stats(client))
        facts["idle_30s"] = idle
        n = 1000
        b = _stats(client)
        with app.producer_or_acquire() as producer:
            for _ in range(n):
                app.send_task("hms.bench.noop", queue="bench.hms", producer=producer)
        wait_until(lambda: client.llen("bench.hms") == 0 and client.hlen("unacked") == 0, 300,
                   "the queue to drain")
        run = _delta(b, _stats(client))
        facts["tasks_1000"] = {"n": n, **run}
        metas = list(client.scan_iter(match="celery-task-meta-*", count=5000))
        facts["result_keys"] = {"keys": len(metas), "bytes_per_key": round(
            sum(client.memory_usage(k, samples=0) or 0 for k in metas[:200]) / max(1, min(
                200, len(metas))), 1)}
        reports = list(client.scan_iter(match="hms:report:*", count=1000))
        facts["report_keys"] = {k.decode(): client.memory_usage(k, samples=0) for k in reports}
        facts["all_keys"] = {"dbsize": client.dbsize(),
                             "used_memory": client.info("memory")["used_memory"]}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return facts


# -- capacity (redis-benchmark) ----------------------------------------------------------------


def _bench(port: int, *args: str) -> float:
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-q", *args],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    # "GET: 61349.69 requests per second, p50=0.415 msec" (the last line with a rate).
    return float(re.findall(r"([\d.]+) requests per second", out)[-1])


def _capacity_part(url: str) -> dict[str, Any]:
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    facts: dict[str, Any] = {"nproc": os.cpu_count(), "loadavg": os.getloadavg()}
    for pipeline in (1, 16):
        for test in ("get", "set"):
            facts[f"{test}_P{pipeline}"] = _bench(port, "-n", "200000", "-c", "50", "-P",
                                                  str(pipeline), "-t", test)
    # The cache's read script on a warm patient summary (its two generations current), with
    # the arguments get_or_build passes (hms_tasks.cache.core).
    from hms_tasks.cache import lua

    client = redis.Redis.from_url(url)
    sha = client.script_load(lua.READ)
    c, day = "hms-cache", "2026-11-30"
    key = f"{c}:1:patient:42:{day}"
    gen = f"{c}:_hms:gen:"
    client.set(gen + "all", "g1")
    client.set(gen + "patient:42", "g2")
    client.set(key, b"\x00hms1|all=g1,patient:42=g2|" + b"x" * 600)
    cmd = ["EVALSHA", sha, "1", key, gen, f"{c}:_hms:lease:{key}", "t", "5000", "t", "7200",
           f"{c}:_hms:stats:29000000", "patient", f"{c}:_hms:heat", "172800", "all",
           "patient:42"]
    for pipeline in (1, 16):
        facts[f"read_script_P{pipeline}"] = _bench(port, "-n", "100000", "-c", "50", "-P",
                                                   str(pipeline), *cmd)
    return facts


# -- orchestration ------------------------------------------------------------------------------


def run() -> list[Row]:
    chosen = [p for p in os.environ.get("BENCH_SCALING_PARTS", "").split(",") if p] or list(
        PARTS)
    if unknown := [p for p in chosen if p not in PARTS]:
        raise SystemExit(f"BENCH_SCALING_PARTS: unknown part {unknown[0]!r}; known: "
                         f"{', '.join(PARTS)}")
    facts: dict[str, Any] = {}
    rows: list[Row] = []
    if "cache" in chosen:
        with private_redis() as url, tempfile.TemporaryDirectory(prefix="hms-scaling-") as tmp:
            if not SQLITE_DB.exists():
                BENCH_HOME.mkdir(parents=True, exist_ok=True)
                subprocess.run([sys.executable, "-m", "hms_tasks", "seed", "--patients",
                                str(PATIENTS), "--if-empty"], env=_env(url, SQLITE_DB),
                               check=True, cwd=REPO, stdout=subprocess.DEVNULL)
            db = Path(tmp) / "hms.sqlite3"
            shutil.copy(SQLITE_DB, db)
            out = subprocess.run([sys.executable, "-m", "bench.scaling", "--part", "cache"],
                                 env=_env(url, db), cwd=REPO, capture_output=True, text=True,
                                 timeout=1200)
            if out.returncode != 0:
                raise RuntimeError(f"bench.scaling cache failed:\n{out.stderr[-4000:]}")
            facts["cache"] = json.loads(out.stdout.strip().splitlines()[-1])
    if "node" in chosen:
        with private_redis() as url:
            facts["node"] = _node_part(url)
    if "capacity" in chosen:
        with private_redis() as url:
            facts["capacity"] = _capacity_part(url)
    print(json.dumps(facts, indent=1, default=str), file=sys.stderr)
    dump = os.environ.get("BENCH_DUMP")
    if dump:
        Path(dump).write_text(json.dumps(facts, indent=1, default=str))
    if "cache" in facts:
        c = facts["cache"]
        hour = c["hour"]
        rows.append(Row(what="cache: Redis main-thread CPU of one peak hour, 100k patients",
                        ours=hour["cpu_s"], baseline=None, unit="s", target="report"))
        rows.append(Row(what="cache: Redis commands of that hour (scripts' inner ones too)",
                        ours=hour["commands"], baseline=None, unit="", target="report"))
        rows.append(Row(what="cache: memory of every patient summary (100k), generations and"
                             " indexes included", ours=c["all_patients"]["memory_delta"] / 2**20,
                        baseline=None, unit="MiB", target="report"))
    if "node" in facts:
        n = facts["node"]
        rows.append(Row(what="node: Redis commands/s of an idle worker node",
                        ours=n["idle_30s"]["commands"] / 30, baseline=None, unit="/s",
                        target="report"))
        rows.append(Row(what="node: Redis commands per hms task",
                        ours=n["tasks_1000"]["commands"] / 1000, baseline=None, unit="",
                        target="report"))
    if "capacity" in facts:
        rows.append(Row(what="redis-benchmark GET, 50 clients, no pipelining",
                        ours=facts["capacity"]["get_P1"], baseline=None, unit="/s",
                        target="report"))
        if "read_script_P1" in facts["capacity"]:
            rows.append(Row(what="redis-benchmark cache READ script on a warm key, 50 clients",
                            ours=facts["capacity"]["read_script_P1"], baseline=None, unit="/s",
                            target="report"))
    return rows


def _env(redis_url: str, db: Path) -> dict[str, str]:
    return {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": f"sqlite:///{db}",
            "HMS_TASKS_HOME": str(BENCH_HOME), "DJANGO_SETTINGS_MODULE": "hms_tasks.demo.settings",
            "LOG_LEVEL": "WARNING"}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["cache"], required=True)
    parser.parse_args()
    print(json.dumps(_cache_part(), default=str))
