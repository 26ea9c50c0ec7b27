"""Settings of the database side of the queries capability: statements and pool health.

Read them with :data:`get` (``get().db_idle_in_transaction_seconds``); validated on first use
and by the start-up check, with errors naming the setting (``HMS_TASKS_STATEMENTS_TOP: ...``)
and never quoting a value.

The pool's own sizes are not here: they are part of ``DATABASES`` (Django's
``OPTIONS["pool"]``), which the HMS's settings module builds before hms-tasks reads anything.
The demo takes them from ``HMS_DB_POOL_MIN_SIZE``, ``HMS_DB_POOL_MAX_SIZE`` and
``HMS_DB_POOL_TIMEOUT`` (``hms_tasks/demo/settings.py``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from hms_tasks import conf

__all__ = ["DbSettings", "get"]


class DbSettings(conf.Settings):
    """``HMS_TASKS_STATEMENTS_*`` and ``HMS_TASKS_DB_*``."""

    #: Statements ``hms.queries.statements`` keeps per run: the top N by total time.
    statements_top: Annotated[int, Field(ge=1, le=500)] = 20
    #: Characters of a statement's normalized text kept (pg_stat_statements has already
    #: replaced every constant with ``$1``); 0 keeps the query id only.
    statements_text_chars: Annotated[int, Field(ge=0, le=2000)] = 160
    #: The database alias whose pool and server are watched.
    db_alias: Annotated[str, Field(min_length=1, max_length=64)] = "default"
    #: A session idle in a transaction longer than this many seconds is counted (it holds
    #: locks and a snapshot, and keeps a pooled connection from everyone else).
    db_idle_in_transaction_seconds: Annotated[int, Field(ge=1, le=86_400)] = 30
    #: Seconds a process's published pool figures stay current; older ones are left out.
    db_pool_stale_seconds: Annotated[int, Field(ge=10, le=86_400)] = 120

    @field_validator("db_alias")
    @classmethod
    def _known_alias(cls, value: str) -> str:
        from django.conf import settings

        if value not in settings.DATABASES:
            raise ValueError("must be an alias in DATABASES")
        return value


get = conf.section(DbSettings)
