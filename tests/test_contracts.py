"""Contracts: registered task names, queues, import-light names, exported members."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hms_tasks
from hms_tasks import names
from hms_tasks.metrics import names as metrics_names

# Renaming or removing a task breaks queued messages and beat entries: update the README's
# migration notes before changing this list.
REGISTERED_TASKS = [
    "hms.assets.analyze",
    "hms.assets.precompress",
    "hms.assets.precompress_chunk",
    "hms.assets.purge",
    "hms.cache.fanout_changes",
    "hms.cache.invalidate_tags",
    "hms.cache.stats",
    "hms.cache.warm_hot",
    "hms.cache.warm_patients",
    "hms.health.check_service",
    "hms.health.sweep",
    "hms.loadtest.merge",
    "hms.loadtest.run",
    "hms.loadtest.shard",
    "hms.memory.snapshot",
    "hms.memory.sweep",
    "hms.memory.sweep_node",
    "hms.metrics.collect",
    "hms.metrics.collect_host",
    "hms.metrics.collect_node",
    "hms.metrics.deliver_webhook",
    "hms.metrics.evaluate_alerts",
    "hms.metrics.rollup",
    "hms.queries.audit",
    "hms.queries.db_health",
    "hms.queries.live_report",
    "hms.queries.statements",
]


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    return proc.stdout


def test_registered_task_names_snapshot() -> None:
    # A fresh process: the test session registers test-only tasks of its own.
    out = _python(
        "import json, django; django.setup();"
        "from hms_tasks.celery import app, load_tasks; load_tasks(app);"
        "print(json.dumps(sorted(n for n in app.tasks if not n.startswith('celery.'))))"
    )
    assert json.loads(out) == REGISTERED_TASKS


@pytest.mark.parametrize("name", REGISTERED_TASKS)
def test_task_names_route_to_their_capability_queue(name: str) -> None:
    assert re.match(r"^hms\.[a-z]+\.[a-z_]+$", name)
    capability = name.split(".")[1]
    assert names.queue_for(name) == f"hms.{capability}"
    assert names.queue_for(name) in names.ALL_QUEUES


def test_names_module_is_import_light() -> None:
    out = _python(
        "import sys, hms_tasks.names;"
        "print(sorted(m for m in ('celery', 'django', 'kombu', 'redis') if m in sys.modules))"
    )
    assert out.strip() == "[]"


def test_celery_finds_the_app() -> None:
    from hms_tasks.celery import app

    assert hms_tasks.app is app
    assert hms_tasks.celery_app is app
    assert app.main == "hms_tasks"


def _modules() -> list[str]:
    return sorted(
        m.name for m in pkgutil.walk_packages(hms_tasks.__path__, "hms_tasks.")
        if ".migrations" not in m.name and not m.name.endswith(".settings")
    )


@pytest.mark.parametrize("module", _modules())
def test_exported_members_exist(module: str) -> None:
    mod = importlib.import_module(module)
    for name in getattr(mod, "__all__", ()):
        assert hasattr(mod, name), f"{module}.__all__ names missing {name}"


def test_safe_celery_defaults() -> None:
    from hms_tasks import conf
    from hms_tasks.celery import app

    c = app.conf
    assert c.task_serializer == "json"
    assert c.result_serializer == "json"
    assert c.accept_content == ["json"]
    assert c.result_accept_content == ["json"]
    assert c.worker_prefetch_multiplier == 1
    assert c.broker_connection_retry_on_startup is True
    assert c.worker_cancel_long_running_tasks_on_connection_loss is True
    assert c.worker_send_task_events is True
    assert c.result_expires
    assert c.result_extended is False
    vt = conf.get().visibility_timeout
    assert c.broker_transport_options["visibility_timeout"] == vt
    assert c.result_backend_transport_options["visibility_timeout"] == vt
    task = app.tasks[metrics_names.METRICS_COLLECT_HOST]
    assert task.acks_late is True
    assert task.reject_on_worker_lost is True
    assert task.time_limit < vt
    assert task.soft_time_limit < task.time_limit


def test_django_celery_settings_override_defaults_without_warnings(tmp_path: Path) -> None:
    (tmp_path / "hms_override_settings.py").write_text(
        "from hms_tasks.demo.settings import *  # noqa\n"
        "CELERY_RESULT_EXPIRES = 60\n"
        "CELERY_WORKER_PREFETCH_MULTIPLIER = 4\n"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning:celery", "-c",
         "import django; django.setup(); from hms_tasks.celery import app;"
         "print(app.conf.result_expires, app.conf.worker_prefetch_multiplier,"
         " app.conf.task_serializer)"],
        env={**os.environ, "PYTHONPATH": str(tmp_path),
             "DJANGO_SETTINGS_MODULE": "hms_override_settings"},
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert proc.stdout.split() == ["60", "4", "json"]
    assert "deprecated" not in proc.stderr
