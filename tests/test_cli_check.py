"""`hms-tasks check`: every settings problem on one line of its own, exit 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def check(tmp_path: Path, settings: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "check_settings.py").write_text(
        "from hms_tasks.demo.settings import *  # noqa\n" + settings)
    return subprocess.run(
        [sys.executable, "-m", "hms_tasks", "check"],
        env={**os.environ, "PYTHONPATH": os.pathsep.join((str(tmp_path), str(REPO))),
             "DJANGO_SETTINGS_MODULE": "check_settings", "HMS_TASKS_HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )


def test_out_of_range_settings_are_one_line_each_and_exit_2(tmp_path: Path) -> None:
    proc = check(tmp_path, "HMS_TASKS_VISIBILITY_TIMEOUT = -5\n"
                           "HMS_TASKS_METRICS_RETENTION = {'raw': -1}\n"
                           "HMS_TASKS_MEMORY_COOLDOWN = 10 ** 9\n")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert any("HMS_TASKS_VISIBILITY_TIMEOUT" in line for line in errors), proc.stderr
    assert any("HMS_TASKS_MEMORY_COOLDOWN" in line for line in errors), proc.stderr
    assert not [line for line in proc.stderr.splitlines() if line.startswith("  File ")]
    # Values are never echoed (a setting could hold a secret).
    assert "-5" not in proc.stderr
    assert "1000000000" not in proc.stderr


def test_good_settings_say_ok(tmp_path: Path) -> None:
    proc = check(tmp_path, "")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
