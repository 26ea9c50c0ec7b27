"""The beat schedule: every shipped entry is valid, and bad entries stop beat and the worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from celery.schedules import crontab

import beat_schedule
from hms_tasks import schedule
from hms_tasks.celery import app, load_tasks, startup_problems
from hms_tasks.errors import ConfigurationError


def test_every_shipped_entry_is_valid() -> None:
    entries = schedule.load("beat_schedule")
    assert entries.keys() == beat_schedule.BEAT_SCHEDULE.keys()
    load_tasks(app)
    for key, entry in entries.items():
        assert schedule.ENTRY_KEY_RE.match(key)
        assert entry["task"] in app.tasks, key
        assert entry["task"].startswith("hms.")
        period = schedule.period_seconds(entry["schedule"])
        assert 0 < entry["options"]["expires"] <= 2 * period, key
    assert startup_problems(app) == []


def test_app_uses_loaded_schedule() -> None:
    assert app.conf.beat_schedule == schedule.load("beat_schedule")


def test_expires_defaults_to_one_and_a_half_periods() -> None:
    assert schedule._normalize("a-b", {"task": "t", "schedule": 60})["options"] == {
        "expires": 90.0}
    daily = schedule._normalize("a-b", {"task": "t", "schedule": crontab(hour=6, minute=0)})
    assert daily["options"]["expires"] == pytest.approx(1.5 * 86400, rel=0.05)
    kept = schedule._normalize("a-b", {"task": "t", "schedule": timedelta(minutes=10),
                                       "options": {"expires": 30}})
    assert kept["options"]["expires"] == 30


@pytest.mark.parametrize(
    ("key", "entry", "message"),
    [
        ("no-schedule", {"task": "hms.metrics.collect_host"}, "'no-schedule': has no 'schedule'"),
        ("Bad_Key", {"task": "t", "schedule": 5}, "'Bad_Key': keys are kebab-case"),
        ("no-task", {"schedule": 5}, "'no-task': 'task' must name"),
        ("bad-period", {"task": "t", "schedule": "hourly"}, "'bad-period': 'schedule' must be"),
        ("zero", {"task": "t", "schedule": 0}, "'zero': 'schedule' must be a positive"),
        ("typo", {"task": "t", "schedule": 5, "option": {}}, "'typo': unknown fields ['option']"),
    ],
)
def test_bad_entries_name_the_entry(key: str, entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        schedule._normalize(key, entry)
    assert message in str(info.value)


def test_unregistered_task_is_reported() -> None:
    entries = {"ghost": {"task": "hms.metrics.ghost", "schedule": 5, "options": {}}}
    assert schedule.unregistered(entries, set(app.tasks)) == [
        "beat schedule entry 'ghost': task 'hms.metrics.ghost' is not registered"
    ]


@pytest.fixture
def bad_schedule_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "bad_schedule.py").write_text(textwrap.dedent("""
        BEAT_SCHEDULE = {
            "metrics-collect-host": {"task": "hms.metrics.collect_host", "schedule": 60},
            "cache-warm-ghost": {"task": "hms.cache.warm_ghost", "schedule": 600},
        }
    """))
    (tmp_path / "bad_settings.py").write_text(
        "from hms_tasks.demo.settings import *  # noqa\n"
        "HMS_TASKS_BEAT_SCHEDULE = 'bad_schedule'\n"
    )
    env = dict(os.environ)
    env.update(PYTHONPATH=str(tmp_path), DJANGO_SETTINGS_MODULE="bad_settings",
               HMS_TASKS_HOME=str(tmp_path / "home"))
    return env


@pytest.mark.parametrize("command", [["worker", "--pool", "solo"], ["beat"]])
def test_bad_entry_stops_worker_and_beat(command: list[str], bad_schedule_env: dict[str, str],
                                         tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "hms_tasks", *command, "--loglevel", "INFO",
         *(["-s", str(tmp_path / "beat-state")] if command == ["beat"] else [])],
        env=bad_schedule_env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "beat schedule entry 'cache-warm-ghost': task 'hms.cache.warm_ghost' is not" \
           " registered" in proc.stderr + proc.stdout


def test_beat_loads_the_schedule_into_redbeat_and_drops_removed_entries(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from hms_tasks import conf, store
    from hms_tasks.celery import CheckedScheduler

    # The app's configuration may have been read before the session's Redis existed: point
    # redbeat at it (and drop the client redbeat caches on the app).
    monkeypatch.setitem(app.conf, "redbeat_redis_url", conf.get().redis_url)
    for cached in ("redbeat_conf", "redbeat_redis"):
        monkeypatch.delattr(app, cached, raising=False)
    client = store.client()
    prefix = store.key("redbeat") + ":"
    assert app.conf.redbeat_key_prefix == prefix
    # An entry a previous schedule had, and this one does not.
    client.sadd(prefix + ":statics", "cache-warm-gone")
    client.hset(prefix + "cache-warm-gone", "definition", "{}")
    client.zadd(prefix + ":schedule", {prefix + "cache-warm-gone": 1})

    CheckedScheduler(app=app)

    stored = set(client.zrange(prefix + ":schedule", 0, -1))
    assert stored == {prefix + key for key in beat_schedule.BEAT_SCHEDULE}
    assert not client.exists(prefix + "cache-warm-gone")
    assert set(client.smembers(prefix + ":statics")) == set(beat_schedule.BEAT_SCHEDULE)
    entry = json.loads(client.hget(prefix + "health-sweep", "definition"))
    assert entry["task"] == "hms.health.sweep"
    assert entry["options"] == {"expires": 25}

    # The compose health check: how late the most overdue slot is (no beat publishing).
    from hms_tasks.celery import beat_lag

    client.zadd(prefix + ":schedule", {prefix + "health-sweep": time.time() - 300})
    assert beat_lag(app) >= 300
    client.zadd(prefix + ":schedule", {prefix + "health-sweep": time.time() + 30})
    client.delete(prefix + ":schedule")
    assert beat_lag(app) == 0
