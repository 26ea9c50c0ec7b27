"""Tasks that exist only in the test session, declared exactly the way hms tasks are."""

from __future__ import annotations

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
    """The pid and RSS of the process that runs it."""
    import os

    from hms_tasks.memory.tiers import current_rss

    return {"pid": os.getpid(), "rss": current_rss()}
