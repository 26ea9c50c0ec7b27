"""Real ``celery worker`` and ``celery beat`` subprocesses for the fault tests, each in its own
session (so a SIGKILL of its process group is what the OOM killer does to a whole container),
on the test session's Redis and tests/faults/fault_settings.py, logging to a file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.helpers import wait_for

REPO = Path(__file__).resolve().parents[2]


class CeleryProc:
    """One ``celery -A hms_tasks <args>`` process; ``log`` is its combined output."""

    def __init__(self, args: list[str], *, redis_url: str, home: Path, name: str,
                 env: dict[str, str] | None = None) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log = home / f"{name}.log"
        environ = {**os.environ, "REDIS_URL": redis_url, "HMS_TASKS_HOME": str(home),
                   "DJANGO_SETTINGS_MODULE": "tests.faults.fault_settings",
                   "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                   **(env or {})}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "hms_tasks", *args],
                cwd=REPO, env=environ, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_line(self, line: str, *, timeout: float = 90) -> None:
        def seen() -> bool:
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.text()[-3000:]}"
            return line in self.text()

        wait_for(seen, timeout=timeout, interval=0.1, what=f"{self.name}: {line!r}")

    def kill(self) -> None:
        """SIGKILL the whole process group (main process and pool children)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM (a warm shutdown), wait, and return the exit code; SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


def worker(name: str, *, queue: str, redis_url: str, home: Path, pool: str = "prefork",
           concurrency: int = 2) -> CeleryProc:
    return CeleryProc(
        ["worker", "--pool", pool, "--concurrency", str(concurrency), "-Q", queue,
         "-n", f"{name}@localhost", "--without-mingle", "--without-gossip",
         "--loglevel", "INFO"],
        redis_url=redis_url, home=home, name=name)


def beat(name: str, *, redis_url: str, home: Path, schedule: str) -> CeleryProc:
    return CeleryProc(["beat", "--loglevel", "INFO"], redis_url=redis_url, home=home,
                      name=name, env={"FAULT_BEAT_SCHEDULE": schedule})
