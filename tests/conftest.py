"""Shared fixtures: a real Redis for the whole session, and a real in-process Celery worker.

Nothing here fakes Redis, Celery or the database: the session starts its own ``redis-server``
on a free port and points the broker, result backend, cache and hms-tasks state at it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hms_tasks import conf, names, store
from tests.demo_fixtures import *  # noqa: F403  (the SQLite test database's directory)
from tests.helpers import RedisServer


@pytest.fixture(scope="session", autouse=True)
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    from django.conf import settings

    from hms_tasks.celery import app

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    os.environ["REDIS_URL"] = server.url
    for alias in settings.CACHES:
        settings.CACHES[alias]["LOCATION"] = server.url
    conf.reset()
    store.reset()
    app.conf.update(broker_url=server.url, result_backend=server.url, redbeat_redis_url=server.url)
    yield server
    # Unsubscribe the result listener first: it would otherwise retry against the stopped
    # server and log "the Celery application must be restarted" after the session.
    with contextlib.suppress(Exception):
        app.backend.result_consumer.stop()
    server.stop()


@pytest.fixture(autouse=True)
def _clean_hms_keys(redis_server: RedisServer) -> Iterator[None]:
    """Each test starts without hms-tasks state or queued messages (Celery's bindings stay)."""
    if redis_server.proc is None:  # a test stopped it
        redis_server.start()
    starts = redis_server.starts
    _delete_hms_state()
    yield
    if redis_server.proc is None:
        redis_server.start()
    if redis_server.starts != starts:
        # The server was restarted: pooled connections of this process point at the old
        # one. Drop them, so later tests (control commands, results) reconnect cleanly.
        from kombu import pools

        from hms_tasks.celery import app

        pools.reset()
        app._after_fork()  # what Celery does when inherited connections are unusable
        store.reset()
    # Messages a test left queued must not reach the next test's worker.
    _delete_hms_state()


def _delete_hms_state() -> None:
    client = store.client()
    stale = list(client.scan_iter(match=f"{conf.get().redis_prefix}:*", count=1000))
    stale += list(client.scan_iter(match="hms-cache:*", count=1000))
    stale += [q for q in names.ALL_QUEUES if client.exists(q)]
    if stale:
        client.delete(*stale)


# -- Celery: pytest-celery's fixtures (its plugin carries celery.contrib.pytest), pointed at the
# hms-tasks app instead of a blank test app.


@pytest.fixture(scope="session")
def celery_session_app(redis_server: RedisServer) -> Any:
    """The hms-tasks app itself, on the session's Redis (pytest-celery builds a blank app)."""
    from hms_tasks.celery import app

    return app


@pytest.fixture(scope="session")
def celery_app(celery_session_app: Any) -> Any:
    return celery_session_app


@pytest.fixture(scope="session")
def celery_includes() -> tuple[str, ...]:
    # The capabilities' task modules come with the app; the tests' own tasks (hms.test.*).
    return ("tests.tasks_for_tests",)


@pytest.fixture(scope="session")
def celery_worker_parameters() -> dict[str, Any]:
    return {
        "perform_ping_check": False,
        "queues": list(names.ALL_QUEUES),
        "shutdown_timeout": 30,
        "loglevel": "WARNING",
    }


@pytest.fixture(scope="module")
def worker(celery_session_app: Any, celery_includes: tuple[str, ...], celery_worker_pool: str,
           celery_worker_parameters: dict[str, Any]) -> Iterator[Any]:
    """A real Celery worker (solo pool, in a thread of this process) consuming every hms queue.

    pytest-celery's ``celery_session_worker`` with its configuration fixtures, but per module:
    a session worker would consume the messages that tests without a worker expect to find
    queued (``dispatch`` publishes, nothing runs).
    """
    from celery.contrib.testing.worker import start_worker

    for module in celery_includes:
        celery_session_app.loader.import_task_module(module)
    with start_worker(celery_session_app, pool=celery_worker_pool,
                      **celery_worker_parameters) as w:
        yield w


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
