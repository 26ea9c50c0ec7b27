"""The database tasks of the queries capability, on the ``hms.queries`` queue: statement
statistics and database health. The work is in :mod:`~hms_tasks.queries.statements`,
:mod:`~hms_tasks.queries.pool` and :func:`hms_tasks.metrics.collect.database_sample`; these
only adapt it to Celery.

How this part splits its work: ``statements`` reads the server's ``pg_stat_statements`` and
keeps the change since its previous run as series; ``db_health`` records the server's side
(``pg_stat_activity``) and every process's published pool figures as series. Each worker
node's own metrics sample records its processes' pools too (``hms.metrics.collect_node``);
``db_health`` adds the processes outside workers (the web servers).
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
from hms_tasks.queries import pool
from hms_tasks.queries import statements as stmts

__all__ = ["QUERIES_DB_HEALTH", "QUERIES_STATEMENTS", "db_health", "queries", "statements"]

#: Task names (contracts); they belong in the capability's ``names.py``.
QUERIES_STATEMENTS = "hms.queries.statements"
QUERIES_DB_HEALTH = "hms.queries.db_health"

# One database round trip or five and one Redis pipeline each: seconds at most.
queries = Capability(name="queries", soft_time_limit=20, time_limit=30,
                     autoretry_for=(redis.ConnectionError, redis.TimeoutError), max_retries=2)

#: Where the last db_health report is kept (``<p>:queries:db:latest``, a day).
LATEST_TTL = 86400

pool.connect_signals()


@queries.task(QUERIES_STATEMENTS)
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


@queries.task(QUERIES_DB_HEALTH)
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
