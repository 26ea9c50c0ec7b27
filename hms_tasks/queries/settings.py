"""Settings of the queries capability (``HMS_TASKS_QUERIES_*``).

- ``HMS_TASKS_QUERIES_SAMPLE_RATE`` (0.0): share of requests the live middleware samples, 0-1;
- ``HMS_TASKS_QUERIES_N_PLUS_ONE_MIN`` (3): repeats of one fingerprint from one call site that
  make an N+1 pattern (audits and live sampling);
- ``HMS_TASKS_QUERIES_DATABASE`` ("default"): the database alias audits run on;
- ``HMS_TASKS_QUERIES_EXPLAIN_TIMEOUT_MS`` (2000): ``statement_timeout`` of each EXPLAIN ANALYZE;
- ``HMS_TASKS_QUERIES_EXPLAIN_MAX`` (50): distinct fingerprints explained per probe;
- ``HMS_TASKS_QUERIES_ADVICE_MIN_ROWS`` (10000): a smaller table gets no index advice;
- ``HMS_TASKS_QUERIES_HISTORY`` (50): audit summaries kept per probe;
- ``HMS_TASKS_QUERIES_LIVE_MAX_PATTERNS`` (1000): live N+1 patterns kept in Redis.

Errors name the setting and the allowed range and never quote the value.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from hms_tasks import conf

__all__ = ["QueriesSettings", "get"]


class QueriesSettings(conf.Settings):
    """The ``HMS_TASKS_QUERIES_*`` settings."""

    #: Share of requests the live sampling middleware records (0 = off, 1 = every request).
    queries_sample_rate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    #: Repeats of one fingerprint from one call site that make an N+1 pattern.
    queries_n_plus_one_min: Annotated[int, Field(ge=2, le=10_000)] = 3
    #: The database alias audits run their probes on.
    queries_database: Annotated[str, Field(min_length=1, max_length=64)] = "default"
    #: Milliseconds one EXPLAIN ANALYZE may run (PostgreSQL ``statement_timeout``).
    queries_explain_timeout_ms: Annotated[int, Field(ge=10, le=60_000)] = 2000
    #: Distinct fingerprints explained per probe (the most frequent first).
    queries_explain_max: Annotated[int, Field(ge=0, le=1000)] = 50
    #: Rows below which a table gets no index advice (a sequential scan is fine there).
    queries_advice_min_rows: Annotated[int, Field(ge=0, le=10**12)] = 10_000
    #: Audit summaries kept per probe (its history).
    queries_history: Annotated[int, Field(ge=1, le=10_000)] = 50
    #: Live N+1 patterns kept in Redis; beyond it the least seen are dropped.
    queries_live_max_patterns: Annotated[int, Field(ge=10, le=100_000)] = 1000

    # -- statements and database health ------------------------------------------------------
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


get = conf.section(QueriesSettings)
