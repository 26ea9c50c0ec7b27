"""Queries tasks, on the ``hms.queries`` queue. The work is in plain functions
(:mod:`~hms_tasks.queries.audits`, :mod:`~hms_tasks.queries.live`); these only adapt them.

How the capability splits its work: ``audit`` runs the HMS's registered probes in rolled-back
transactions on a worker (nightly from beat, or on demand) and stores their reports; HMS
processes themselves only sample live requests (the middleware) and batch what they see into
Redis; ``live_report`` reads that back. Statement statistics (``pg_stat_statements``) and the
database's and pools' health have their own tasks beside these.
"""

from __future__ import annotations

from typing import Annotated, Any

import redis
from pydantic import Field

from hms_tasks import store
from hms_tasks.base import Capability
from hms_tasks.params import known
from hms_tasks.queries import audits as auditing
from hms_tasks.queries import live, names, probes

__all__ = ["audit", "live_report", "queries"]

# An audit of every demo probe takes seconds; the limits leave room for a slow night and stay
# under the 150 s visibility timeout. The lock outlives the hard limit.
queries = Capability(name="queries", soft_time_limit=100, time_limit=120,
                     autoretry_for=(redis.ConnectionError, redis.TimeoutError), max_retries=2)
LOCK_S = 130


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
