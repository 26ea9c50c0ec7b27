"""The package works from an installed wheel, not only from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_carries_schedule_and_migrations_and_runs_outside_the_repo(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("hms_tasks-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        members = set(zf.namelist())
        assert "beat_schedule.py" in members
        assert "hms_tasks/py.typed" in members
        assert any(m.startswith("hms_tasks/demo/migrations/0001") for m in members)
        # The shipped locustfile of the demo load test (not a module: package data).
        assert "hms_tasks/loadtest/locustfiles/demo_api.py" in members
        # A pure-Python wheel installs by unpacking; the environment's dependencies stay.
        zf.extractall(tmp_path / "site")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"),
           "HMS_TASKS_HOME": str(tmp_path / "home")}
    probe = subprocess.run(
        [sys.executable, "-c",
         "import beat_schedule, hms_tasks, django; django.setup();"
         "from hms_tasks.celery import app, startup_problems;"
         "print(beat_schedule.__file__); print(hms_tasks.__file__);"
         "print(sorted(app.conf.beat_schedule)); print(startup_problems(app))"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120, check=True,
    )
    schedule_file, package_file, entries, problems = probe.stdout.strip().splitlines()
    site = str(tmp_path / "site")
    assert schedule_file.startswith(site)
    assert package_file.startswith(site)
    assert "metrics-collect-host" in entries
    assert problems == "[]"
    check = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "hms_tasks", "report"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120,
    )
    assert check.returncode == 0, check.stderr
    assert "hms_tasks.metrics.tasks" in check.stdout  # celery found the app and its tasks
