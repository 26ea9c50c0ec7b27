"""Celery task names of the queries capability: contracts (beat entries and in-flight messages
name them). Import-light: clients and ``beat_schedule.py`` import this without Celery."""

from __future__ import annotations

__all__ = [
    "QUERIES_AUDIT",
    "QUERIES_DB_HEALTH",
    "QUERIES_LIVE_REPORT",
    "QUERIES_STATEMENTS",
]

#: Run the registered probes (one, or all) in rolled-back transactions and store their
#: reports (beat ``queries-audit-nightly``, 03:15 every night; ``hms-tasks queries audit``).
QUERIES_AUDIT = "hms.queries.audit"
#: Summarise the N+1 patterns the live sampling middleware saw (on demand).
QUERIES_LIVE_REPORT = "hms.queries.live_report"
#: Read ``pg_stat_statements`` and store the deltas between runs as series.
QUERIES_STATEMENTS = "hms.queries.statements"
#: The database's and the connection pools' health (``pg_stat_activity``, pool figures).
QUERIES_DB_HEALTH = "hms.queries.db_health"
