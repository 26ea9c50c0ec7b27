"""Audits: run a probe in a transaction that is always rolled back, and report its statements.

:func:`audit` runs one probe in the calling process. Every statement it sends to the audited
database (``HMS_TASKS_QUERIES_DATABASE``) passes a ``connection.execute_wrapper`` that notes
its fingerprint (:mod:`.fingerprint`), the HMS call site, its time and a hash of its text and
parameters. From them the report lists:

- ``n_plus_one``: one fingerprint run ``HMS_TASKS_QUERIES_N_PLUS_ONE_MIN`` times or more from
  one call site (a query in a loop);
- ``duplicates``: the very same statement and parameters run more than once (only a hash of
  them is kept, in memory);
- ``plans``: the plan of each distinct fingerprint, explained with the parameters of its first
  run, still inside the transaction: PostgreSQL ``EXPLAIN (FORMAT JSON)``, with ``ANALYZE``
  only for a statement that reads (:func:`~.fingerprint.read_only`) and under ``SET LOCAL
  statement_timeout``; SQLite ``EXPLAIN QUERY PLAN``. Plans keep node types, relations,
  indexes, costs, row counts and conditions with their values taken out;
- ``advice``: a sequential scan with a filter, over a table of at least
  ``HMS_TASKS_QUERIES_ADVICE_MIN_ROWS`` rows, gives ``CREATE INDEX CONCURRENTLY ... ON table
  (columns)`` with the filter's columns, unless an index already leads with them;
- ``budget``: statements and milliseconds against the probe's budget.

Parameters exist only in this process's memory while the probe's transaction is open; no
literal, parameter or row reaches the report, Redis or a log.

:func:`record` stores a report and its history in Redis and writes the metric series the alert
rules ``queries_over_budget`` and ``queries_regression`` fire on. Redis layout (``<p>`` is
``HMS_TASKS_REDIS_PREFIX``)::

    <p>:queries:report:<probe>   STRING  the last report (JSON, version 1), 30 days
    <p>:queries:history:<probe>  LIST    summaries of the last HMS_TASKS_QUERIES_HISTORY audits,
                                         newest first, 30 days
    <p>:queries:probes           ZSET    probe -> time of its last audit, 30 days
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypedDict

from django.db import DatabaseError, connections, transaction

from hms_tasks import store
from hms_tasks.errors import HmsTasksError
from hms_tasks.queries import probes, settings
from hms_tasks.queries.fingerprint import call_site, fingerprint, fingerprint_id, read_only, scrub

__all__ = [
    "Advice",
    "Pattern",
    "ProbeFailed",
    "Report",
    "audit",
    "history",
    "last_report",
    "record",
    "reports",
    "run",
]

logger = logging.getLogger(__name__)

VERSION = 1
TTL = 30 * 86400
#: Columns one index advice names at most.
MAX_ADVICE_COLUMNS = 3
# Plan fields kept (everything else, Output lists in particular, is dropped); the conditions
# among them are scrubbed of values.
_PLAN_FIELDS = {
    "Node Type", "Relation Name", "Alias", "Index Name", "Join Type", "Strategy",
    "Parent Relationship", "Scan Direction", "Startup Cost", "Total Cost", "Plan Rows",
    "Plan Width", "Actual Startup Time", "Actual Total Time", "Actual Rows", "Actual Loops",
    "Rows Removed by Filter", "Rows Removed by Index Recheck", "Heap Fetches",
}
_CONDITIONS = {"Filter", "Index Cond", "Recheck Cond", "Hash Cond", "Merge Cond", "Join Filter",
               "TID Cond"}
_LISTS = {"Sort Key", "Group Key", "Presorted Key"}
_SQLITE_SCAN = re.compile(r"^SCAN (?:TABLE )?([A-Za-z_][\w$]*)(?: AS ([A-Za-z_][\w$]*))?$")
_NAME = re.compile(r'(?:"([^"]+)"|([A-Za-z_][A-Za-z0-9_$]*))'
                   r'(?:\s*\.\s*(?:"([^"]+)"|([A-Za-z_][A-Za-z0-9_$]*)))?')
_WHERE = re.compile(r"\bWHERE\b(.*?)(?:\bGROUP BY\b|\bORDER BY\b|\bLIMIT\b|\bHAVING\b"
                    r"|\bWINDOW\b|\bOFFSET\b|\bRETURNING\b|$)", re.IGNORECASE | re.DOTALL)


class ProbeFailed(HmsTasksError):
    """A probe raised; its transaction was rolled back. The message names the probe and the
    exception's class only (its message could quote data)."""


class Pattern(TypedDict):
    fingerprint: str
    count: int
    site: str


class Advice(TypedDict):
    table: str
    columns: list[str]
    sql: str


class Report(TypedDict):
    probe: str
    queries: int
    ms: float
    n_plus_one: list[Pattern]
    duplicates: list[Pattern]
    plans: list[dict[str, Any]]
    advice: list[Advice]
    budget: dict[str, dict[str, Any]]


@dataclass
class _Statement:
    fingerprint: str
    count: int = 0
    ms: float = 0.0
    sites: Counter[str] = field(default_factory=Counter)
    # The first run's text and parameters, for EXPLAIN: in memory only, while the probe's
    # transaction is open; never stored or logged.
    sql: str | None = None
    params: Any = None
    many: bool = False


class Capture:
    """The ``execute_wrapper`` of an audit: statements by fingerprint, duplicates by hash."""

    def __init__(self) -> None:
        self.statements: dict[str, _Statement] = {}
        self.total = 0
        self.same: Counter[str] = Counter()
        self.same_first: dict[str, tuple[str, str]] = {}

    def __call__(self, execute: Callable[..., Any], sql: str, params: Any, many: bool,
                 context: dict[str, Any]) -> Any:
        site = call_site()
        t0 = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            ms = (time.perf_counter() - t0) * 1000
            fp = fingerprint(sql)
            st = self.statements.get(fp)
            if st is None:
                st = self.statements[fp] = _Statement(fp, sql=sql, params=params, many=many)
            st.count += 1
            st.ms += ms
            st.sites[site] += 1
            self.total += 1
            digest = hashlib.sha256(f"{sql}\0{params!r}".encode()).hexdigest()
            self.same[digest] += 1
            self.same_first.setdefault(digest, (fp, site))


def audit(name: str, *, record_it: bool = False) -> Report:
    """Run probe ``name`` once in this process, in a transaction that is rolled back whatever
    happens, and return its :class:`Report`. With ``record_it``, also :func:`record` it.

    An unknown name raises :class:`~hms_tasks.errors.InvalidArguments` (nothing runs); a probe
    that raises gives :class:`ProbeFailed`.
    """
    probe = probes.get(name)
    s = settings.get()
    alias = s.queries_database
    conn = connections[alias]
    capture = Capture()
    failure: BaseException | None = None
    with transaction.atomic(using=alias):
        try:
            t0 = time.perf_counter()
            with conn.execute_wrapper(capture):
                try:
                    probe.fn()
                except Exception as exc:  # reported by class below, after the rollback
                    failure = exc
            ms = (time.perf_counter() - t0) * 1000
            if failure is None:
                plans, advice = _explain(conn, capture, alias=alias)
        finally:
            transaction.set_rollback(True, using=alias)
    if failure is not None:
        logger.warning("probe %s raised %s (rolled back)", name, type(failure).__name__)
        raise ProbeFailed(f"probe {name} raised {type(failure).__name__}") from None
    report = _report(probe, capture, ms=ms, plans=plans, advice=advice,
                     threshold=s.queries_n_plus_one_min)
    if record_it:
        record(report)
    return report


def _report(probe: probes.Probe, capture: Capture, *, ms: float, plans: list[dict[str, Any]],
            advice: list[Advice], threshold: int) -> Report:
    n_plus_one: list[Pattern] = sorted(
        (Pattern(fingerprint=st.fingerprint, count=count, site=site)
         for st in capture.statements.values() for site, count in st.sites.items()
         if count >= threshold),
        key=lambda p: (-p["count"], p["site"], p["fingerprint"]))
    duplicates: list[Pattern] = sorted(
        (Pattern(fingerprint=capture.same_first[d][0], count=count,
                 site=capture.same_first[d][1])
         for d, count in capture.same.items() if count > 1),
        key=lambda p: (-p["count"], p["site"], p["fingerprint"]))
    ms = round(ms, 3)
    return Report(
        probe=probe.name,
        queries=capture.total,
        ms=ms,
        n_plus_one=n_plus_one,
        duplicates=duplicates,
        plans=plans,
        advice=advice,
        budget={
            "queries": {"limit": probe.queries, "actual": capture.total,
                        "ok": probe.queries is None or capture.total <= probe.queries},
            "ms": {"limit": probe.ms, "actual": ms, "ok": probe.ms is None or ms <= probe.ms},
        },
    )


# -- plans and advice --------------------------------------------------------------------------


def _explain(conn: Any, capture: Capture, *, alias: str) -> tuple[list[dict[str, Any]],
                                                                   list[Advice]]:
    s = settings.get()
    vendor = conn.vendor
    chosen = sorted(capture.statements.values(), key=lambda st: (-st.count, -st.ms))
    chosen = [st for st in chosen if st.sql is not None and not st.many][:s.queries_explain_max]
    plans: list[dict[str, Any]] = []
    advice: dict[tuple[str, tuple[str, ...]], Advice] = {}
    if vendor not in ("postgresql", "sqlite") or not chosen:
        return plans, []
    if vendor == "postgresql":
        with conn.cursor() as cursor:
            # SET LOCAL: till the audit's transaction ends (rolled back), for every EXPLAIN.
            cursor.execute("SELECT set_config('statement_timeout', %s, true)",
                           [str(s.queries_explain_timeout_ms)])
    for st in chosen:
        entry: dict[str, Any] = {
            "fingerprint": st.fingerprint, "id": fingerprint_id(st.fingerprint),
            "count": st.count, "ms": round(st.ms, 3), "engine": vendor, "analyzed": False}
        try:
            # A savepoint each: a statement that times out or fails to explain leaves the
            # others (and the audit's transaction) usable.
            with transaction.atomic(using=alias), conn.cursor() as cursor:
                if vendor == "postgresql":
                    analyze = read_only(st.sql or "")
                    options = "ANALYZE, FORMAT JSON" if analyze else "FORMAT JSON"
                    cursor.execute(f"EXPLAIN ({options}) {st.sql}", st.params)
                    raw = cursor.fetchone()[0]
                    doc = json.loads(raw) if isinstance(raw, str) else raw
                    tree = doc[0]["Plan"]
                    entry["analyzed"] = analyze
                    entry["plan"] = _scrub_node(tree)
                    for table, alias_, cond in _seq_scans(tree):
                        _advise(conn, cursor, advice, table, alias_, cond)
                else:
                    cursor.execute(f"EXPLAIN QUERY PLAN {st.sql}", st.params)
                    rows = cursor.fetchall()
                    entry["plan"] = [{"id": r[0], "parent": r[1], "detail": scrub(str(r[3]))}
                                     for r in rows]
                    where = _WHERE.search(st.fingerprint)
                    if where:
                        for r in rows:
                            m = _SQLITE_SCAN.match(str(r[3]))
                            if m:
                                _advise(conn, cursor, advice, m.group(1), m.group(2),
                                        where.group(1))
        except DatabaseError as exc:
            entry["error"] = type(exc).__name__
        plans.append(entry)
    return plans, list(advice.values())


def _scrub_node(node: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _PLAN_FIELDS:
            out[key] = value
        elif key in _CONDITIONS and isinstance(value, str):
            out[key] = scrub(value)
        elif key in _LISTS and isinstance(value, list):
            out[key] = [scrub(str(v)) for v in value]
        elif key == "Plans" and isinstance(value, list):
            out[key] = [_scrub_node(child) for child in value if isinstance(child, dict)]
    return out


def _seq_scans(node: dict[str, Any]) -> Iterable[tuple[str, str | None, str]]:
    if node.get("Node Type") == "Seq Scan" and node.get("Filter") and node.get("Relation Name"):
        yield node["Relation Name"], node.get("Alias"), scrub(str(node["Filter"]))
    for child in node.get("Plans") or ():
        if isinstance(child, dict):
            yield from _seq_scans(child)


def _columns(condition: str, table: str, alias: str | None, known: list[str]) -> list[str]:
    """Columns of ``table`` named in ``condition`` (a scrubbed filter), in order."""
    out: list[str] = []
    for m in _NAME.finditer(condition):
        if condition[max(0, m.start() - 2):m.start()] == "::":
            continue  # a type cast, not a column
        first = m.group(1) or m.group(2)
        second = m.group(3) or m.group(4)
        qualifier, column = (first, second) if second else (None, first)
        if qualifier not in (None, table, alias) or column not in known or column in out:
            continue
        out.append(column)
    return out[:MAX_ADVICE_COLUMNS]


def _advise(conn: Any, cursor: Any, advice: dict[tuple[str, tuple[str, ...]], Advice],
            table: str, alias: str | None, condition: str) -> None:
    s = settings.get()
    intro = conn.introspection
    if table not in intro.table_names(cursor):
        return
    known = [c.name for c in intro.get_table_description(cursor, table)]
    columns = _columns(condition, table, alias, known)
    if not columns or (table, tuple(columns)) in advice:
        return
    qn = conn.ops.quote_name
    # Counts at most the threshold's rows: cheap on any table.
    # The table name comes from the plan and is checked against table_names() above.
    cursor.execute(f"SELECT COUNT(*) FROM (SELECT 1 FROM {qn(table)} LIMIT %s) AS t",  # noqa: S608
                   [s.queries_advice_min_rows])
    if cursor.fetchone()[0] < s.queries_advice_min_rows:
        return
    for info in intro.get_constraints(cursor, table).values():
        if not (info.get("index") or info.get("unique") or info.get("primary_key")):
            continue
        existing = list(info.get("columns") or [])
        k = min(len(existing), len(columns))
        if k and existing[:k] == columns[:k]:
            return  # an index already leads with these columns
    name = f"{table}_{'_'.join(columns)}_idx"
    if len(name) > 63:
        name = f"{name[:50]}_{hashlib.sha256(name.encode()).hexdigest()[:8]}_idx"
    concurrently = " CONCURRENTLY" if conn.vendor == "postgresql" else ""
    advice[(table, tuple(columns))] = Advice(
        table=table, columns=columns,
        sql=f"CREATE INDEX{concurrently} {qn(name)} ON {qn(table)} "
            f"({', '.join(qn(c) for c in columns)})")


# -- storage, history, metrics -----------------------------------------------------------------


def _summary(report: Report, at: float) -> dict[str, Any]:
    return {
        "at": at, "queries": report["queries"], "ms": report["ms"],
        "n_plus_one": len(report["n_plus_one"]), "duplicates": len(report["duplicates"]),
        "over_budget": not all(b["ok"] for b in report["budget"].values()),
    }


def _worse(now: dict[str, Any], before: dict[str, Any] | None) -> bool:
    """Got worse than the previous audit: more statements, N+1 patterns or duplicates.
    Time is left out: it follows the machine's load more than the code."""
    if before is None:
        return False
    return any(now[k] > before.get(k, now[k]) for k in ("queries", "n_plus_one", "duplicates"))


def record(report: Report, *, now: float | None = None) -> dict[str, Any]:
    """Store ``report`` as the probe's last, add it to its history, and write the series
    ``queries.count``, ``queries.ms``, ``queries.n_plus_one``, ``queries.over_budget`` (1/0)
    and ``queries.regressed`` (1/0, against the previous audit) labelled ``probe``. Returns
    the stored summary (with ``regressed``)."""
    now = time.time() if now is None else now
    name = report["probe"]
    summary = _summary(report, now)
    previous = history(name, limit=1)
    summary["regressed"] = _worse(summary, previous[0] if previous else None)
    keep = settings.get().queries_history
    client = store.client()
    pipe = client.pipeline(transaction=True)
    pipe.set(store.key("queries", "report", name),
             json.dumps({"version": VERSION, "at": now, "regressed": summary["regressed"],
                         "report": report}), ex=TTL)
    pipe.lpush(store.key("queries", "history", name), json.dumps(summary))
    pipe.ltrim(store.key("queries", "history", name), 0, keep - 1)
    pipe.expire(store.key("queries", "history", name), TTL)
    pipe.zadd(store.key("queries", "probes"), {name: now})
    pipe.expire(store.key("queries", "probes"), TTL)
    pipe.execute()
    _metrics(name, summary, now)
    return summary


def _metrics(name: str, summary: dict[str, Any], now: float) -> None:
    from hms_tasks.metrics import store as ts

    labels = {"probe": name}
    ts.write([
        (ts.series_id("queries.count", labels), now, float(summary["queries"])),
        (ts.series_id("queries.ms", labels), now, float(summary["ms"])),
        (ts.series_id("queries.n_plus_one", labels), now, float(summary["n_plus_one"])),
        (ts.series_id("queries.over_budget", labels), now, float(summary["over_budget"])),
        (ts.series_id("queries.regressed", labels), now, float(summary["regressed"])),
    ], now=now)


def history(name: str, *, limit: int = 50) -> list[dict[str, Any]]:
    """The probe's last audit summaries, newest first."""
    raw = store.client().lrange(store.key("queries", "history", name), 0, max(0, limit - 1))
    return [json.loads(r) for r in raw]


def last_report(name: str) -> dict[str, Any] | None:
    """The stored document of the probe's last audit: ``{"version", "at", "regressed",
    "report"}``, or None."""
    raw = store.client().get(store.key("queries", "report", name))
    return None if raw is None else dict(json.loads(raw))


def reports() -> list[dict[str, Any]]:
    """The stored document of every audited probe, by name."""
    names = store.client().zrange(store.key("queries", "probes"), 0, -1)
    out = []
    for name in sorted(str(n) for n in names):
        doc = last_report(name)
        if doc is not None:
            out.append(doc)
    return out


def run(names: list[str] | None = None) -> dict[str, Any]:
    """Audit ``names`` (default: every registered probe), record each, and ask for an alert
    evaluation. A failing probe is counted and reported by class; the others still run.
    Returns counts and each probe's summary: names and numbers only."""
    from hms_tasks.celery import app
    from hms_tasks.metrics import names as metrics_names

    chosen = probes.names() if names is None else names
    for name in chosen:
        probes.get(name)  # all known, or nothing runs
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for name in chosen:
        try:
            report = audit(name)
        except ProbeFailed as exc:
            results[name] = {"error": str(exc)}
            continue
        results[name] = record(report)
    try:
        app.send_task(metrics_names.METRICS_EVALUATE_ALERTS, ignore_result=True)
    except Exception:
        # The reports are stored; the minute's evaluation will see the series anyway.
        logger.warning("could not ask for an alert evaluation", exc_info=True)
    done = [r for r in results.values() if "error" not in r]
    return {
        "probes": len(chosen),
        "failed": len(chosen) - len(done),
        "over_budget": sorted(n for n, r in results.items() if r.get("over_budget")),
        "regressed": sorted(n for n, r in results.items() if r.get("regressed")),
        "n_plus_one": sum(r["n_plus_one"] for r in done),
        "seconds": round(time.perf_counter() - t0, 3),
        "results": results,
    }
