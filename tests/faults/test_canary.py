"""No patient data leaves the HMS: a patient whose names carry a unique canary goes through every
capability, and the canary is found nowhere hms-tasks writes or shows.

On a private Redis (AOF on), with cache encryption on: the demo HMS (:mod:`.canary_hms`, its
own process) creates the patient, reads it through the API and the hms-tasks cache, renames it
(tag invalidation through the worker), and sends cache, metrics and health tasks with its id;
``hms-tasks dispatch`` sends one more. A prefork worker logs at DEBUG, ``celery events --dump``
records every event, Flower watches, and ``redis-cli monitor`` records every command Redis
received (every broker message published, acked, restored).

Searched for the canary, plain and in base64 at each alignment (kombu base64-encodes message
bodies): every Redis key's DUMP (SCAN, uncompressed), the AOF files, the MONITOR stream, the
worker log, the event dump, Flower's /api/tasks and each task's /api/task/info, the results,
``hms-tasks report --json``, ``hms-tasks dispatch`` output and the HMS process's own output.
A control string written to Redis plain and base64-encoded must be found in the dump, the AOF
and the stream: the search has teeth.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.fernet import Fernet

from hms_tasks import names
from hms_tasks.cache import names as cache_names
from tests.helpers import RedisServer, free_port, stop, wait_for

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]


def needles(text: str) -> list[bytes]:
    """``text`` as bytes, lower-cased, and base64-encoded at each of the three alignments it
    can have inside a longer encoded string (standard and URL-safe alphabets)."""
    raw = text.encode()
    out = {raw, raw.lower()}
    for k in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            full = encode(b"\0" * k + raw)
            # Characters whose 6 bits all come from ``raw``.
            out.add(full[-(-8 * k // 6): (8 * (k + len(raw))) // 6])
    return sorted(out)


def hits(data: bytes, text: str) -> int:
    return sum(data.count(n) for n in needles(text))


def redis_dump(client: redis.Redis) -> tuple[bytes, int]:
    """Every key's name and DUMP (Redis set not to compress them), and how many keys."""
    chunks = []
    keys = 0
    for key in client.scan_iter(count=1000):
        value = client.dump(key)
        chunks += [key, value or b""]
        keys += 1
    return b"\n".join(chunks), keys


def _http(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


def test_a_patient_name_canary_is_found_nowhere(tmp_path: Path) -> None:
    canary = f"Canary{uuid.uuid4().hex[:16]}Doe"
    control = f"Control{uuid.uuid4().hex[:16]}Doe"
    server = RedisServer(tmp_path / "redis")
    server.start()
    client = redis.Redis(port=server.port)
    # DUMP payloads (and an AOF rewrite's RDB preamble) are LZF-compressed unless told not to:
    # a compressed canary would hide from the search.
    client.config_set("rdbcompression", "no")
    (tmp_path / "canary_settings.py").write_text(
        "from hms_tasks.demo.settings import *  # noqa\n"
        f"HMS_TASKS_CACHE_ENCRYPTION_KEYS = [{Fernet.generate_key().decode()!r}]\n")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "canary_settings", "REDIS_URL": server.url,
           "HMS_TASKS_HOME": str(tmp_path / "home"), "CANARY": canary,
           "PYTHONPATH": os.pathsep.join((str(tmp_path), str(REPO))),
           "FLOWER_UNAUTHENTICATED_API": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("DATABASE_URL", None)  # the demo's own SQLite under the private home
    (tmp_path / "home").mkdir()
    files = {name: tmp_path / f"{name}.log" for name in ("monitor", "worker", "events",
                                                         "flower")}
    flower_port = free_port()
    commands = {
        "monitor": ["redis-cli", "-p", str(server.port), "monitor"],
        "worker": [sys.executable, "-m", "celery", "-A", "hms_tasks", "worker", "--pool",
                   "prefork", "--concurrency", "2", "-Q", ",".join(names.ALL_QUEUES), "-E",
                   "-n", "canary@localhost", "--without-mingle", "--without-gossip",
                   "--loglevel", "DEBUG"],
        "events": [sys.executable, "-m", "celery", "-A", "hms_tasks", "events", "--dump"],
        "flower": [sys.executable, "-m", "celery", "-A", "hms_tasks", "flower",
                   "--address=127.0.0.1", f"--port={flower_port}"],
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    outputs: dict[str, bytes] = {}
    try:
        for name, command in commands.items():
            with files[name].open("wb") as out:
                procs[name] = subprocess.Popen(command, cwd=REPO, env=env, stdout=out,
                                               stderr=subprocess.STDOUT)
        flower = f"http://127.0.0.1:{flower_port}"
        wait_for(lambda: b" ready." in files["worker"].read_bytes(), timeout=120,
                 what="the worker")
        wait_for(lambda: _up(f"{flower}/healthcheck"), timeout=60, what="Flower")
        client.set("control:plain", control)
        client.set("control:b64", base64.b64encode(f"xy{control}z".encode()))

        hms = subprocess.run([sys.executable, "-m", "tests.faults.canary_hms"], cwd=REPO,
                             env=env, capture_output=True, timeout=300)
        assert hms.returncode == 0, hms.stderr.decode(errors="replace")
        outputs["HMS process output"] = hms.stdout + hms.stderr
        run = json.loads(hms.stdout.splitlines()[-1])
        pid, task_ids = run["patient"], run["tasks"]
        assert run["states"] == ["SUCCESS"] * len(task_ids), run["states"]
        dispatched = subprocess.run(
            [sys.executable, "-m", "hms_tasks", "dispatch", cache_names.CACHE_WARM_PATIENTS,
             "--arg", f"ids=[{pid}]", "--wait", "--timeout", "120"],
            cwd=REPO, env=env, capture_output=True, timeout=300)
        assert dispatched.returncode == 0, dispatched.stderr.decode(errors="replace")
        outputs["hms-tasks dispatch output"] = dispatched.stdout + dispatched.stderr
        task_ids.append(dispatched.stdout.split(b"id=", 1)[1].split()[0].decode())

        wait_for(lambda: not any(client.llen(q) for q in names.ALL_QUEUES)
                 and not client.hlen("unacked"), timeout=60, what="queues drained")
        tasks = wait_for(lambda: (t := json.loads(_http(f"{flower}/api/tasks")))
                         and set(task_ids) <= set(t) and t, timeout=60, what="Flower's tasks")
        outputs["Flower /api/tasks"] = json.dumps(tasks).encode()
        outputs["Flower /api/task/info"] = b"\n".join(
            _http(f"{flower}/api/task/info/{tid}") for tid in task_ids)
        results = [client.get(f"celery-task-meta-{tid}") or b"" for tid in task_ids]
        assert all(results), "a task left no result"
        outputs["results"] = b"\n".join(results)
        report = subprocess.run([sys.executable, "-m", "hms_tasks", "report", "--json"],
                                cwd=REPO, env=env, capture_output=True, timeout=120)
        assert report.returncode == 0, report.stderr.decode(errors="replace")
        assert json.loads(report.stdout), "no run reports"
        outputs["run reports (hms-tasks report --json)"] = report.stdout
        dump, keys = redis_dump(client)
        outputs[f"Redis: DUMP of {keys} keys"] = dump
        # The cache holds the patient, encrypted: the 0 below is not an empty cache.
        # The summary's key carries the day it was built for (patient:<id>:<date>).
        found = list(client.scan_iter(match=f"hms-cache:1:patient:{pid}:*"))
        cached = client.get(found[0]) if found else b""
        cached = cached or b""
        # A tagged value is "\0hms1|<tags>|<payload>"; the payload is a Fernet token.
        assert cached.startswith(b"\0hms1|"), "the patient was never cached"
        assert b"|gAAAAA" in cached
    finally:
        for proc in procs.values():
            stop(proc)
        server.stop()
    aof = b"".join(p.read_bytes() for p in sorted((tmp_path / "redis").rglob("*.aof*"))
                   if p.is_file())
    assert aof, "no AOF file"
    outputs["AOF files"] = aof
    for name in ("monitor", "worker", "events", "flower"):
        outputs[{"monitor": "Redis MONITOR (every command, broker messages included)",
                 "worker": "worker log (DEBUG)", "events": "celery events --dump",
                 "flower": "Flower log"}[name]] = files[name].read_bytes()

    # The search has teeth: the control string is found plain and base64-encoded.
    assert hits(outputs["AOF files"], control) >= 2
    assert hits(outputs["Redis MONITOR (every command, broker messages included)"], control) >= 2
    assert hits(outputs[f"Redis: DUMP of {keys} keys"], control) >= 2
    assert task_ids[0].encode() in outputs["celery events --dump"]
    assert cache_names.CACHE_WARM_PATIENTS.encode() in outputs["worker log (DEBUG)"]

    found = {place: hits(data, canary) for place, data in outputs.items()}
    width = max(map(len, found))
    lines = "\n".join(f"  {place.ljust(width)}  {len(outputs[place]):>9} bytes  hits {n}"
                      for place, n in found.items())
    print(f"\ncanary: {len(found)} places searched ({len(task_ids)} tasks, patient {pid},"
          f" cache encrypted), hits {sum(found.values())}\n{lines}")
    assert sum(found.values()) == 0, found


def _up(url: str) -> Any:
    try:
        return _http(url)
    except OSError:
        return None
