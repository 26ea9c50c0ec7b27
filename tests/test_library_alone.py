"""hms-tasks without the demo: a real HMS's minimal settings, real worker and CLI processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import RedisServer, stop, wait_for

REPO = Path(__file__).resolve().parent.parent


def _env(redis_server: RedisServer, tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.minimal_settings",
            "REDIS_URL": redis_server.url, "MINIMAL_DB": str(tmp_path / "db.sqlite3"),
            "HMS_TASKS_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}


def test_the_library_imports_no_demo_module(redis_server: RedisServer, tmp_path: Path) -> None:
    code = (
        "import django, sys; django.setup()\n"
        "from hms_tasks.celery import app, load_tasks, startup_problems\n"
        "load_tasks(app)\n"
        "from hms_tasks import cli\n"
        "cli.mount(cli.cli)\n"
        "problems = startup_problems(app)\n"
        "assert not problems, problems\n"
        "demo = sorted(m for m in sys.modules if m.startswith('hms_tasks.demo'))\n"
        "assert not demo, demo\n"
        "print('tasks', len([t for t in app.tasks if t.startswith('hms.')]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_env(redis_server, tmp_path),
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) > 10
    # The settings module was named: no warning about falling back to the demo.
    assert "DJANGO_SETTINGS_MODULE is not set" not in out.stderr


def test_unset_settings_module_warns_once(redis_server: RedisServer, tmp_path: Path) -> None:
    env = _env(redis_server, tmp_path)
    del env["DJANGO_SETTINGS_MODULE"]
    out = subprocess.run([sys.executable, "-m", "hms_tasks", "check"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.stderr.count("DJANGO_SETTINGS_MODULE is not set") == 1, out.stderr


def test_a_worker_on_minimal_settings_runs_a_task(redis_server: RedisServer,
                                                  tmp_path: Path) -> None:
    env = _env(redis_server, tmp_path)
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "hms_tasks", "worker", "--pool", "solo",
         "-Q", "hms.metrics", "-n", "minimal@%h", "--without-mingle", "--without-gossip",
         "--loglevel", "WARNING"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "hms_tasks", "dispatch", "hms.metrics.collect_host", "--wait",
             "--timeout", "60"],
            env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "cpu" in out.stdout
    finally:
        stop(worker)
    wait_for(lambda: worker.poll() is not None, what="the worker to stop")
