"""Fixtures the demo HMS tests share.

``tests/test_demo_api.py`` and ``tests/test_seed.py`` import them; ``conftest.py`` may import
them too (``from tests.demo_fixtures import *``) so that every database test gets them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

__all__ = ["sqlite_test_directory"]


@pytest.fixture(scope="session", autouse=True)
def sqlite_test_directory() -> None:
    """Create the directory of the SQLite test database (``$HMS_TASKS_HOME``) if missing.

    The demo settings put it under ``.hms-tasks/``, which exists only once something has run;
    SQLite cannot create directories. Autouse and session-scoped, so it runs before
    pytest-django creates the test database. Other engines need nothing.
    """
    from django.conf import settings

    for database in settings.DATABASES.values():
        if database["ENGINE"] != "django.db.backends.sqlite3":
            continue
        for name in (database.get("TEST", {}).get("NAME"), database.get("NAME")):
            if name and str(name) != ":memory:" and not str(name).startswith("file:"):
                Path(name).parent.mkdir(parents=True, exist_ok=True)
