"""No message crashes a worker: 22 kinds of malformed message, pushed straight onto a queue
(as ``redis-cli LPUSH`` would), against a real prefork worker subprocess at DEBUG log level.

Each is dead-lettered with its reason (never its body), the worker keeps running and serving,
nothing is left queued or unacked, and the canary string in every message never reaches the
worker's log. Figure: kinds dead-lettered / kinds sent, worker exits, canary hits in the log.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hms_tasks import deadletter, names, store
from tests.helpers import RedisServer, stop, wait_for

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
CANARY = "Canary-Jane-Doe-1957"
QUEUE = names.DEFAULT_QUEUE


def envelope(body: Any, *, headers: Any = None, content_type: str = "application/json",
             encoding: str | None = "base64", **extra: Any) -> str:
    """A kombu Redis queue entry. ``body``: bytes are base64-encoded, a str is put in the
    envelope as it is (as the encoded body), anything else is JSON-encoded first."""
    if not isinstance(body, bytes | str):
        body = json.dumps(body).encode()
    if isinstance(body, bytes) and encoding == "base64":
        body = base64.b64encode(body).decode()
    doc = {
        "body": body, "content-encoding": "utf-8", "content-type": content_type,
        "headers": {"lang": "py", "task": "hms.test.echo", "id": "bad-1"}
        if headers is None else headers,
        "properties": {"delivery_tag": "tag-" + CANARY[:6], "body_encoding": encoding,
                       "delivery_info": {"exchange": "", "routing_key": QUEUE}},
    }
    doc.update(extra)
    return json.dumps(doc)


OK_BODY = [[], {"count": 1, "ids": [], "note": CANARY}, {}]

#: kind -> (queue entry, a phrase the dead-letter reason must contain)
KINDS: dict[str, tuple[str | bytes, str]] = {
    "envelope not JSON": (f"{{{CANARY}", "envelope is not JSON"),
    "envelope not UTF-8": (b"\xff\xfe" + CANARY.encode(), "envelope is not JSON"),
    "envelope not an object": (json.dumps([CANARY]), "not a JSON object"),
    "no properties": (json.dumps({"body": CANARY, "headers": {}}), "no properties"),
    "no delivery tag": (json.dumps({"body": CANARY, "properties": {}}), "delivery_tag"),
    "bad base64": (envelope(f"!!{CANARY}!!"), "body_encoding"),
    "body not JSON": (envelope(f"{CANARY}{{".encode()), "not JSON"),
    "body not UTF-8": (envelope(b"\xff\xfe" + CANARY.encode()), "not UTF-8"),
    "body not a list": (envelope(42), "not a list"),
    "body a string": (envelope(json.dumps(CANARY).encode()), "not a list"),
    "wrong arity": (envelope([[CANARY], {}]), "not a list"),
    "args not a list": (envelope([CANARY, {}, {}]), "args"),
    "kwargs not an object": (envelope([[], [CANARY], {}]), "kwargs"),
    "embed not canvas": (envelope([[], {}, {CANARY: 1}]), "embed"),
    "unknown content type": (envelope(OK_BODY, content_type="application/x-yaml"),
                             "content type"),
    "pickle content type": (envelope(OK_BODY, content_type="application/x-python-serialize"),
                            "content type"),
    "unknown task": (envelope(OK_BODY, headers={"task": "hms.nope.nothing", "id": "bad-2"}),
                     "unknown task"),
    "no headers": (envelope(OK_BODY, headers={}), "task is missing"),
    "no id": (envelope(OK_BODY, headers={"task": "hms.test.echo"}), "header id"),
    "id not plain": (envelope(OK_BODY, headers={"task": "hms.test.echo", "id": CANARY + " x"}),
                     "header id"),
    "eta not a time": (envelope(OK_BODY, headers={"task": "hms.test.echo", "id": "bad-3",
                                                  "eta": CANARY}), "eta"),
    "compressed": (envelope(OK_BODY, headers={"task": "hms.test.echo", "id": "bad-4",
                                              "compression": "application/x-gzip"}),
                   "cannot be decoded"),
    "huge body": (envelope([[CANARY * 80_000], {}, {}]), "larger than"),
}


def test_malformed_messages_are_dead_lettered_and_never_crash_the_worker(
    redis_server: RedisServer, celery_app: Any, tmp_path: Path
) -> None:
    log_path = tmp_path / "worker.log"
    env = {**os.environ, "REDIS_URL": redis_server.url, "HMS_TASKS_HOME": str(tmp_path)}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "hms_tasks", "worker", "--pool", "prefork",
             "--concurrency", "1", "--include", "tests.tasks_for_tests", "-Q", QUEUE,
             "-n", "malformed@localhost", "--without-mingle", "--without-gossip",
             "--loglevel", "DEBUG"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    client = store.client()
    try:
        for entry, _ in KINDS.values():
            client.lpush(QUEUE, entry)
        entries = wait_for(
            lambda: (e := deadletter.entries(last=100)) and len(e) >= len(KINDS) and e,
            timeout=120, what="every malformed message to be dead-lettered")
        # The worker still serves: a well-formed task runs after all of them. Its arguments
        # carry the canary too: Celery's DEBUG line quoting a task's arguments is withheld.
        ok = celery_app.send_task("hms.test.echo", kwargs={"count": 1, "ids": [], "note": CANARY})
        assert ok.get(timeout=60) == {"count": 1, "ids": 0, "mode": "fast", "noted": True}
        assert proc.poll() is None, "the worker exited"
        assert client.llen(QUEUE) == 0
        wait_for(lambda: client.hlen("unacked") == 0, what="nothing left unacked")
    finally:
        stop(proc)
    reasons = [e["reason"] for e in reversed(entries)]  # oldest first: the order pushed
    assert len(reasons) == len(KINDS)
    for (kind, (_, phrase)), reason in zip(KINDS.items(), reasons, strict=True):
        assert phrase in reason, f"{kind}: reason {reason!r} lacks {phrase!r}"
    assert deadletter.total() == len(KINDS)
    stored = json.dumps(entries)
    assert CANARY not in stored
    assert {e["queue"] for e in entries} <= {QUEUE, None}
    text = log_path.read_text(errors="replace")
    hits = text.count(CANARY)
    assert "dead-lettered message" in text  # the log does speak of them, without the bodies
    assert "a log line quoting message contents was withheld" in text
    print(f"\nmalformed messages: {len(reasons)}/{len(KINDS)} kinds dead-lettered, "
          f"worker exits 0, canary hits in the DEBUG log {hits}, queue and unacked empty")
    assert hits == 0
