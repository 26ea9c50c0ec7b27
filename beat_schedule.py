"""The periodic schedule of hms-tasks, loaded by celery beat through ``HMS_TASKS_BEAT_SCHEDULE``.

Tasks are named through each capability's ``names`` constants. Keys are stable kebab-case
names (they are contracts: beat keeps state under them). Each entry says its cadence and why.
``options["expires"]`` defaults to 1.5x the period, so a message that waited out a worker
outage is dropped rather than run late; set it explicitly to differ.
"""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

from hms_tasks.assets import names as assets_names
from hms_tasks.cache import names as cache_names
from hms_tasks.health import names as health_names
from hms_tasks.loadtest import names as loadtest_names
from hms_tasks.memory import names as memory_names
from hms_tasks.metrics import names as metrics_names
from hms_tasks.queries import names as queries_names

BEAT_SCHEDULE: dict[str, dict[str, Any]] = {
    # Every 10 minutes: keep today's and tomorrow's patients, admitted inpatients and the
    # most-read keys warm (and halve every key's heat, so "most read" means recently).
    "cache-warm-hot": {
        "task": cache_names.CACHE_WARM_HOT,
        "schedule": 600.0,
        "kwargs": {"limit": 5000},
    },
    # 06:00 every day: a full hot warm before morning rounds, when the wards all read at once.
    "cache-warm-morning": {
        "task": cache_names.CACHE_WARM_HOT,
        "schedule": crontab(hour=6, minute=0),
        "kwargs": {"limit": 50000},
        # A morning warm that waited past 07:00 is no longer worth running.
        "options": {"expires": 3600},
    },
    # Every minute: a safety net for the change log. Recording processes send fanout_changes
    # themselves; this drains whatever a lost task (or a broker outage) left behind.
    "cache-fanout-sweep": {
        "task": cache_names.CACHE_FANOUT_CHANGES,
        "schedule": 60.0,
    },
    # Every 5 minutes: hit rate per kind, key counts and memory, into the run report.
    "cache-stats": {
        "task": cache_names.CACHE_STATS,
        "schedule": 300.0,
    },
    # Every minute: one host snapshot of whichever node takes it, kept in its run report (the
    # per-node series in the metrics store come from metrics-collect).
    "metrics-collect-host": {
        "task": metrics_names.METRICS_COLLECT_HOST,
        "schedule": 60.0,
    },
    # Every minute: sample every live node (host, worker processes) and, from one of them,
    # Redis, the Celery queues and the database; nodes that stopped are reported missing.
    "metrics-collect": {
        "task": metrics_names.METRICS_COLLECT,
        "schedule": 60.0,
    },
    # Every minute: fold raw points into the 1-minute and 1-hour aggregates, prune what the
    # retention dropped, and turn the API's request timings into series.
    "metrics-rollup": {
        "task": metrics_names.METRICS_ROLLUP,
        "schedule": 60.0,
    },
    # Every minute: the alert rules' "for" and "clear_for" durations count in evaluations, so
    # the cadence matches the samples'.
    "metrics-evaluate-alerts": {
        "task": metrics_names.METRICS_EVALUATE_ALERTS,
        "schedule": 60.0,
    },
    # Every 5 minutes: every process already checks its memory after each task; the sweep
    # catches pool children that sit idle above a tier.
    "memory-sweep": {
        "task": memory_names.MEMORY_SWEEP,
        "schedule": 300.0,
    },
    # Every 30 s: check every registered service at once and feed the circuit breakers, so a
    # dead service's breaker opens within about a minute even when no HMS call hits it.
    # Single-flight (a Redis lock); a sweep still queued when the next is due is stale.
    "health-sweep": {
        "task": health_names.HEALTH_SWEEP,
        "schedule": 30.0,
        "options": {"expires": 25},
    },
    # 02:30 every night: a short smoke load test of the demo HMS API, judged against its
    # thresholds and compared with the previous night (a regression raises the
    # loadtest_regression alert). It runs the test HMS_TASKS_LOADTEST_NIGHTLY names: unset by
    # default (production settings), so the entry does nothing; the demo settings set it. A
    # run that waited past 03:30 is no longer a night-time run: it expires.
    "loadtest-nightly": {
        "task": loadtest_names.RUN,
        "schedule": crontab(hour=2, minute=30),
        "kwargs": {"nightly": True},
        "options": {"expires": 3600},
    },
    # 03:15 every night, after the nightly load test: audit every registered query probe in
    # rolled-back transactions (N+1 patterns, plans, index advice, budgets); a probe over
    # budget or worse than the night before raises queries_over_budget / queries_regression.
    # An audit that waited past 04:15 would meet the morning's traffic: it expires.
    "queries-audit-nightly": {
        "task": queries_names.QUERIES_AUDIT,
        "schedule": crontab(hour=3, minute=15),
        "options": {"expires": 3600},
    },
    # Every 5 minutes: the database's top statements by total time from pg_stat_statements,
    # kept as the change since the last run (nothing on SQLite; names the install step when
    # the extension is missing). A run that waited past the next one is stale.
    "queries-statements": {
        "task": queries_names.QUERIES_STATEMENTS,
        "schedule": 300.0,
        "options": {"expires": 240},
    },
    # Every minute: the server's connections, idle-in-transaction sessions, long queries,
    # lock waits and every process's pool figures, for the db_* alert rules.
    "queries-db-health": {
        "task": queries_names.QUERIES_DB_HEALTH,
        "schedule": 60.0,
        "options": {"expires": 50},
    },
    # 03:30 every night: each collected static asset's raw, gzip and brotli sizes against its
    # budget, kept as history (a deploy triggers it too: `hms-tasks assets analyze`); a
    # bundle that grew past its budget raises assets_over_budget.
    "assets-analyze": {
        "task": assets_names.ASSETS_ANALYZE,
        "schedule": crontab(hour=3, minute=30),
        "options": {"expires": 3600},
    },
}
