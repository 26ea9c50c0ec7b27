"""What every benchmark shares: a private Redis, a Celery worker subprocess, the result table."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    """One figure: what was measured, this project's value, the baseline's, and the target."""

    what: str
    ours: float
    baseline: float | None
    unit: str
    target: str
    #: ours / baseline, or for "lower is better" figures baseline / ours; None without baseline.
    ratio: float | None = None
    ok: bool | None = None


def print_table(rows: list[Row]) -> None:
    header = ["what", "this project", "baseline", "ratio", "target", "met"]
    body = [
        [r.what, f"{r.ours:,.1f} {r.unit}",
         "-" if r.baseline is None else f"{r.baseline:,.1f} {r.unit}",
         "-" if r.ratio is None else f"{r.ratio:.3f}", r.target,
         "-" if r.ok is None else ("yes" if r.ok else "NO")]
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    for line in [header, ["-" * w for w in widths], *body]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


@contextmanager
def private_redis() -> Iterator[str]:
    """A throw-away redis-server on a free loopback port; yields its URL."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="hms-bench-") as tmp:
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=port)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        try:
            wait_until(up, 10, "redis-server")
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@contextmanager
def worker_process(*, redis_url: str, queues: str, node: str, include: str | None = None,
                   extra_env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A real ``celery worker`` (solo pool: one process, no pool overhead in the figures)."""
    env = {**os.environ, "REDIS_URL": redis_url, **(extra_env or {})}
    env.setdefault("HMS_TASKS_HOME", tempfile.mkdtemp(prefix="hms-bench-home-"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "hms_tasks", "worker", "--pool", "solo",
         "--loglevel", "WARNING", *(["--include", include] if include else []), "-Q", queues,
         "-n", node, "--without-gossip", "--without-mingle", "--without-heartbeat"],
        # The worker's log goes to a file: a worker that fails to start says why there.
        env=env, cwd=REPO, stdout=subprocess.DEVNULL,
        stderr=open(Path(env["HMS_TASKS_HOME"]) / f"worker-{node}.log", "ab"),  # noqa: SIM115
    )
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM (a Celery worker shuts down warm on it), then SIGKILL after ``timeout``."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def django_on(url: str) -> Any:
    """Set Django up in this process against the Redis at ``url``; the Celery app, using it.

    Once per process: Django's settings, the Celery app's pools and backend and kombu's pools
    keep their first Redis, which is why ``python -m bench`` runs each part in its own process.
    """
    os.environ["REDIS_URL"] = url
    import django

    django.setup()
    from hms_tasks import conf, store
    from hms_tasks.celery import app

    conf.reset()  # settings and the store read REDIS_URL once; this one is new
    store.reset()
    app.conf.update(broker_url=url, result_backend=url)
    return app


def wait_until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.005)
