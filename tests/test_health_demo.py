"""The demo's services are real: a fresh demo is green, and stopping its API opens the API's
breaker (the walkthrough of docs/health.md), through the ``hms-tasks health`` command.

The demo API is served by a real WSGI server on 127.0.0.1 (the demo's own Django application);
``hms-tasks health --sweep`` runs in a subprocess on the demo settings, as under
``hms-tasks run``: ``REDIS_URL`` and ``HMS_DEMO_API_URL`` point at the session's Redis and that
server, and the database is the demo's (SQLite under ``HMS_TASKS_HOME``, or ``DATABASE_URL``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from click.testing import CliRunner
from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler
from django.core.wsgi import get_wsgi_application
from django.test import override_settings

from hms_tasks.health import cli, registry
from tests.helpers import RedisServer, free_port

REPO = Path(__file__).resolve().parent.parent


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class DemoApi:
    """The demo's Django application behind a threaded WSGI server on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server = ThreadedWSGIServer(("127.0.0.1", self.port), _Quiet,
                                         allow_reuse_address=True)
        self.server.set_app(get_wsgi_application())
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def demo_api() -> Iterator[DemoApi]:
    api = DemoApi()
    try:
        yield api
    finally:
        api.stop()


def _health(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "hms_tasks", "health", "--json", *args], env=env,
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, {r["service"]: r for r in json.loads(proc.stdout)}


def _database_url() -> str | None:
    """The test database as a DATABASE_URL (PostgreSQL); None: the demo's own SQLite file."""
    from django.db import connection

    db = connection.settings_dict
    if db["ENGINE"] != "django.db.backends.postgresql":
        return None
    auth = quote(db["USER"] or "") + (f":{quote(db['PASSWORD'])}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.mark.django_db(transaction=True)
def test_a_fresh_demo_is_green_and_a_stopped_api_opens_its_breaker(
        demo_api: DemoApi, redis_server: RedisServer, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "DJANGO_SETTINGS_MODULE": "hms_tasks.demo.settings", "REDIS_URL": redis_server.url,
           "HMS_DEMO_API_URL": demo_api.url, "HMS_TASKS_HOME": str(tmp_path)}
    env.pop("DATABASE_URL", None)
    if (url := _database_url()) is not None:
        env["DATABASE_URL"] = url
    # Before any sweep: nothing checked yet, nothing down, exit 0.
    code, rows = _health(env)
    assert code == 0
    assert sorted(rows) == ["api", "database", "redis"]
    assert {r["status"] for r in rows.values()} == {"unknown"}

    code, rows = _health(env, "--sweep")
    assert code == 0
    assert {name: r["status"] for name, r in rows.items()} == {
        "api": "up", "database": "up", "redis": "up"}
    assert {r["breaker"] for r in rows.values()} == {"closed"}

    # The walkthrough: stop the API; each sweep counts 2 failures, the 3rd opens the breaker.
    demo_api.stop()
    code, rows = _health(env, "--sweep")
    assert code == 1
    assert rows["api"]["status"] == "down"
    assert rows["api"]["instances"][0]["error"] == "refused"
    assert rows["api"]["breaker"] == "closed"
    assert (rows["database"]["status"], rows["redis"]["status"]) == ("up", "up")
    for _ in range(2):
        code, rows = _health(env, "--sweep")
    assert code == 1
    assert rows["api"]["breaker"] == "open"
    assert rows["api"]["breaker_retry_in"] > 0
    assert (rows["database"]["breaker"], rows["redis"]["breaker"]) == ("closed", "closed")


def test_the_command_names_unknown_services_and_an_empty_registry() -> None:
    runner = CliRunner()
    result = runner.invoke(cli.health, ["--service", "radiology"])
    assert result.exit_code == 2
    assert "unknown service 'radiology'" in result.output
    with override_settings(HMS_TASKS_SERVICES={}):
        assert registry.services() == {}
        result = runner.invoke(cli.health, [])
    assert result.exit_code == 0
    assert "no services in HMS_TASKS_SERVICES" in result.output


def test_the_health_command_is_mounted_on_hms_tasks() -> None:
    from hms_tasks.cli import cli as root
    from hms_tasks.cli import mount

    mount(root)
    assert root.commands["health"] is cli.health
    assert cli.commands == [cli.health]
