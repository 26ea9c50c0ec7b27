"""Tasks that exist only in the test session, declared exactly the way hms tasks are."""

from __future__ import annotations

import contextlib
from typing import Any, Literal

from hms_tasks.base import Capability

testing = Capability(name="test", soft_time_limit=10, time_limit=20)


@testing.task("hms.test.echo")
def echo(count: int, ids: list[int], mode: Literal["fast", "full"] = "fast",
         note: str | None = None) -> dict[str, Any]:
    """Return counts derived from the arguments (never the arguments themselves)."""
    return {"count": count, "ids": len(ids), "mode": mode, "noted": note is not None}


@testing.task("hms.test.boom")
def boom(row: int) -> dict[str, Any]:
    """Fail with a message that quotes data, as a database error might."""
    raise RuntimeError(f"duplicate key value (mrn)=(MRN-{row}) for patient Jane Doe")


@testing.task("hms.test.die")
def die() -> dict[str, Any]:
    """Kill the process running it, as the OOM killer would."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)
    return {}


_leaked: list[bytes] = []


@testing.task("hms.test.leak_to")
def leak_to(mb: int) -> dict[str, Any]:
    """Keep allocating (and holding) 2 MiB blocks until this process's RSS reaches ``mb`` MiB,
    as a leaking task would. Returns the pid and RSS after."""
    import os

    from hms_tasks.memory.tiers import current_rss

    while current_rss() < mb * 1024 * 1024:
        _leaked.append(os.urandom(1024) * 2048)  # written, so resident
    return {"pid": os.getpid(), "rss": current_rss(), "blocks": len(_leaked)}


@testing.task("hms.test.whoami")
def whoami() -> dict[str, Any]:
    """The pid and RSS of the process that runs it, and how many objects its garbage
    collector has frozen (never walks)."""
    import gc
    import os

    from hms_tasks.memory.tiers import current_rss

    return {"pid": os.getpid(), "rss": current_rss(), "frozen": gc.get_freeze_count()}


@testing.task("hms.test.effect")
def effect(key: str, seconds: float = 0.0, first_only: bool = False) -> dict[str, Any]:
    """Record a start under ``key``, work ``seconds`` (``first_only``: only on the first
    delivery; a redelivered message goes straight on), then apply a side effect once per task
    id (SET NX) and count the runs that got that far, so a test can tell a lost task (no
    effect), a redelivered one (two starts) and a duplicate side effect (an NX that failed)."""
    import os
    import time

    from celery import current_task

    from hms_tasks import store

    task_id = current_task.request.id
    client = store.client()
    client.rpush(store.key("test", key, "starts"), f"{task_id} {os.getpid()} {time.time()}")
    if not (first_only and (current_task.request.delivery_info or {}).get("redelivered")):
        time.sleep(seconds)
    pipe = client.pipeline(transaction=True)
    pipe.set(store.key("test", key, "effect", task_id), 1, nx=True, ex=3600)
    pipe.hincrby(store.key("test", key, "done"), task_id, 1)
    first, _ = pipe.execute()
    if not first:
        client.incr(store.key("test", key, "duplicates"))
    return {"first": bool(first)}


@testing.task("hms.test.hang", soft_time_limit=1, time_limit=2)
def hang(seconds: float) -> dict[str, Any]:
    """Keep working ``seconds`` whatever the soft time limit says, as a task stuck in C code
    would: only the hard time limit (2 s) ends it."""
    import time

    from celery.exceptions import SoftTimeLimitExceeded

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(SoftTimeLimitExceeded):
            time.sleep(0.05)
    return {}
