"""Queries tasks, on the ``hms.queries`` queue. The work is in plain functions
(:mod:`~hms_tasks.queries.audits`, :mod:`~hms_tasks.queries.live`); these only adapt them.

How the capability splits its work: ``audit`` runs the HMS's registered probes in rolled-back
transactions on a worker (nightly from beat, or on demand) and stores their reports; HMS
processes themselves only sample live requests (the middleware) and batch what they see into
Redis; ``live_report`` reads that back. Statement statistics (``pg_stat_statements``) and the
database's and pools' health have their own tasks beside these.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import redis
from pydantic import Field

from hms_tasks import store
from hms_tasks.base import Capability
from hms_tasks.metrics import collect
from hms_tasks.metrics import store as ts
from hms_tasks.params import known
from hms_tasks.queries import audits as auditing
from hms_tasks.queries import live, names, pool, probes
from hms_tasks.queries import statements as stmts

__all__ = ["audit", "db_health", "live_report", "queries", "statements"]

# An audit of every demo probe takes seconds; the limits leave room for a slow night and stay
# under the 150 s visibility timeout. The lock outlives the hard limit.
queries = Capability(name="queries", soft_time_limit=100, time_limit=120,
                     autoretry_for=(redis.ConnectionError, redis.TimeoutError), max_retries=2)
LOCK_S = 130
#: Where the last db_health report is kept (``<p>:queries:db:latest``, a day).
LATEST_TTL = 86400

# Processes that run tasks publish their connection pool's figures after each one.
pool.connect_signals()


@queries.task(names.QUERIES_AUDIT, autoretry_for=())
def audit(probe: Annotated[str, known(probes.names, "probe")] | None = None) -> dict[str, Any]:
    """Run the registered probes (or the one named) in transactions that are always rolled
    back, and store each one's report: statements, N+1 patterns, duplicates, plans, index
    advice and budget.

    When: 03:15 every night from beat (``queries-audit-nightly``), or ``hms-tasks queries
    audit``. Takes seconds (each probe once, plus one EXPLAIN per distinct statement, each
    EXPLAIN ANALYZE under a statement timeout). Single-flight (lock
    ``<p>:lock:queries.audit``): a second audit returns ``{"skipped": true}``. Idempotent: an
    audit only reads (its transaction is rolled back) and adds one history entry per probe.
    Not retried (the next night's audit runs anyway). Writes ``<p>:queries:report:<probe>``,
    ``<p>:queries:history:<probe>``, ``<p>:queries:probes`` and the series ``queries.*``
    (``queries.over_budget`` and ``queries.regressed`` feed alert rules). Refuses an unknown
    probe (InvalidArguments, nothing runs). Returns counts and each probe's summary: names
    and numbers, never SQL values.
    """
    with store.single_flight("queries.audit", ttl=LOCK_S) as mine:
        if not mine:
            return {"skipped": True, "reason": "another audit is running"}
        return auditing.run(None if probe is None else [probe])


@queries.task(names.QUERIES_LIVE_REPORT)
def live_report(limit: Annotated[int, Field(ge=1, le=1000)] = 20) -> dict[str, Any]:
    """The N+1 patterns live sampling has seen: sampled requests, and the ``limit`` most
    frequent patterns (fingerprint, call site, requests, most repeats in one request, last
    seen).

    When: on demand. Takes milliseconds. Idempotent (reads Redis only). Retries Redis
    connection errors. Writes nothing. Returns fingerprints, never values.
    """
    return live.report(limit=limit)


@queries.task(names.QUERIES_STATEMENTS, soft_time_limit=20, time_limit=30)
def statements(top: Annotated[int | None, Field(ge=1, le=500)] = None) -> dict[str, Any]:
    """Read the top ``top`` statements (default HMS_TASKS_STATEMENTS_TOP) of the database by
    total execution time from ``pg_stat_statements`` and store what changed since the previous
    run as series (``db.statement.{calls,total_ms,mean_ms,rows}{queryid=...}``).

    When: every 5 minutes from beat (``queries-statements``), or ad hoc. Takes one query (a
    few ms). Idempotent: a re-run records the (small) change since the last one. Retries Redis
    connection errors. Never reads or keeps statement texts beyond the query id and a
    truncated normalized text (constants replaced by ``$n``, scrubbed again); nothing on
    SQLite. When the extension is missing, writes and returns a report naming the install
    step. Writes ``<p>:queries:statements:prev`` and ``:latest``. Returns the report's status,
    reason, and the top statements' ids with their figures.
    """
    report = stmts.collect(top=top)
    return {"status": report["status"], "reason": report["reason"],
            "statements": len(report["top"]), "changed": len(report["deltas"]),
            "top": [{k: v for k, v in st.items() if k != "text"} for st in report["top"][:10]]}


@queries.task(names.QUERIES_DB_HEALTH, soft_time_limit=20, time_limit=30)
def db_health() -> dict[str, Any]:
    """Record the database's health: the server's connections by state, use of
    max_connections, sessions idle in a transaction too long, the longest running query's age,
    lock waits (``db.*`` series), and every process's connection pool figures, per node
    (``db.pool.*{node=...}``).

    When: every minute from beat (``queries-db-health``), or ad hoc. Takes a few ms (five
    catalogue queries, one Redis pipeline). Idempotent (a read-only sample; a re-run records a
    newer one). Retries Redis connection errors. Writes the series and
    ``<p>:queries:db:latest`` (JSON, a day). Returns the server figures and each node's pool
    summary: counts and timings, never a query text or a client address.
    """
    now = time.time()
    server, points = collect.database_sample(now=now)
    pools, more = pool.node_points(now=now)
    if points or more:
        ts.write(points + more, now=now)
    report = {"v": 1, "at": now, "server": server, "pools": pools}
    store.client().set(store.key("queries", "db", "latest"),
                       json.dumps(report, separators=(",", ":"), default=str), ex=LATEST_TTL)
    return report
