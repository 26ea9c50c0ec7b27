"""The server's own statement statistics: ``pg_stat_statements``, read and kept as series.

:func:`collect` (the ``hms.queries.statements`` task) reads the top N statements of the
current database by total execution time (calls, total and mean time, rows), and writes what
changed since its previous run as series of the metrics store, one per query id::

    db.statement.calls{queryid=<id>}      calls since the previous run
    db.statement.total_ms{queryid=<id>}   execution time spent since the previous run
    db.statement.mean_ms{queryid=<id>}    mean time of those calls
    db.statement.rows{queryid=<id>}       rows returned or affected since the previous run

What is kept of a statement: its query id and at most ``HMS_TASKS_STATEMENTS_TEXT_CHARS``
characters of the text ``pg_stat_statements`` normalized (every constant already replaced by
``$1``, ``$2``...). The text is scrubbed once more here (quoted strings and bare numbers become
``?``): PostgreSQL 15 keeps some utility statements' constants. Nothing is read or kept on
SQLite, which has no such view.

Layout (``<p>`` is ``HMS_TASKS_REDIS_PREFIX``)::

    <p>:queries:statements:prev     HASH    query id -> "calls total_ms rows" of the last run
    <p>:queries:statements:latest   STRING  JSON :class:`StatementsReport` of the last run

Both expire after a week without a run.

The extension is missing on most servers: the report then says what to do instead
(:data:`INSTALL_STEPS`), and nothing else is written.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, TypedDict, cast

from hms_tasks import store
from hms_tasks.metrics import store as ts
from hms_tasks.queries import settings as queries_settings

__all__ = [
    "INSTALL_STEPS",
    "REPORT_VERSION",
    "Statement",
    "StatementsReport",
    "collect",
    "latest",
    "read",
    "scrub",
]

REPORT_VERSION = 1
KEEP_SECONDS = 7 * 86400
#: What an operator does to get statement statistics (shown when they are missing).
INSTALL_STEPS = (
    "add pg_stat_statements to shared_preload_libraries in postgresql.conf"
    " (shared_preload_libraries = 'pg_stat_statements') and restart PostgreSQL,"
    " then run CREATE EXTENSION pg_stat_statements; in this database"
)

# Quoted strings (with '' escapes, E'' and dollar quotes) and numbers that are not $n
# parameters or parts of names.
_STRING = re.compile(r"(?:[EeBbXxNn]|[Uu]&)?'(?:[^']|'')*'|\$([A-Za-z_]*)\$.*?\$\1\$", re.S)
_NUMBER = re.compile(r"(?<![\w$.])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w$])")


class Statement(TypedDict):
    queryid: str
    calls: int
    total_ms: float
    mean_ms: float
    rows: int
    #: The normalized, scrubbed, truncated text ("" when HMS_TASKS_STATEMENTS_TEXT_CHARS is 0).
    text: str


class StatementsReport(TypedDict):
    v: int
    at: float
    #: "ok", "missing" (extension not installed or not loaded), "unsupported" (not PostgreSQL)
    status: str
    #: Why it is missing and what to do (None when ok).
    reason: str | None
    #: Top N by total time since the statistics were reset (cumulative figures).
    top: list[Statement]
    #: Per query id, what changed since the previous run (those with a previous run only).
    deltas: dict[str, dict[str, float]]


def scrub(text: str, chars: int) -> str:
    """``text`` with quoted strings and bare numbers replaced by ``?``, cut to ``chars``."""
    if chars == 0:
        return ""
    out = _NUMBER.sub("?", _STRING.sub("?", text))
    out = " ".join(out.split())
    return out if len(out) <= chars else out[: chars - 1] + "…"


def _missing(reason: str, *, now: float) -> StatementsReport:
    return {"v": REPORT_VERSION, "at": now, "status": "missing", "reason": reason, "top": [],
            "deltas": {}}


def read(*, top: int | None = None, alias: str | None = None,
         now: float | None = None) -> StatementsReport:
    """The top ``top`` statements of the current database by total time (cumulative), or a
    report saying why there are none (``status`` missing or unsupported). Reads only."""
    from django.db import DatabaseError, connections

    now = time.time() if now is None else now
    s = queries_settings.get()
    top = s.statements_top if top is None else top
    conn = connections[alias or s.db_alias]
    if conn.vendor != "postgresql":
        return {"v": REPORT_VERSION, "at": now, "status": "unsupported",
                "reason": f"statement statistics need PostgreSQL (this database is"
                          f" {conn.vendor})", "top": [], "deltas": {}}
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'")
        row = cur.fetchone()
        installed = bool(row and row[0])
        if not installed:
            cur.execute("SELECT count(*) FROM pg_available_extensions"
                        " WHERE name = 'pg_stat_statements'")
            row = cur.fetchone()
            if not (row and row[0]):
                return _missing("pg_stat_statements is not available on this server: install"
                                " PostgreSQL's contrib modules, then " + INSTALL_STEPS, now=now)
            return _missing("pg_stat_statements is not installed in this database: "
                            + INSTALL_STEPS, now=now)
    try:
        # A savepoint, so a failure here leaves an outer transaction usable.
        from django.db import transaction

        with transaction.atomic(using=conn.alias), conn.cursor() as cur:
            cur.execute(
                "SELECT queryid, calls, total_exec_time, rows, query FROM pg_stat_statements"
                " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
                " AND queryid IS NOT NULL ORDER BY total_exec_time DESC LIMIT %s", [top])
            fetched = cur.fetchall()
    except DatabaseError as exc:
        # The view exists but the library was not preloaded: "must be loaded via
        # shared_preload_libraries" (ObjectNotInPrerequisiteState). Say so, not the message:
        # messages are not ours to vouch for.
        return _missing(f"pg_stat_statements is installed but not loaded"
                        f" ({type(exc).__name__}): " + INSTALL_STEPS, now=now)
    chars = s.statements_text_chars
    rows: list[Statement] = []
    for qid, calls, total, nrows, text in fetched:
        calls, total = int(calls), float(total)
        rows.append({"queryid": str(qid), "calls": calls, "total_ms": round(total, 3),
                     "mean_ms": round(total / calls, 3) if calls else 0.0, "rows": int(nrows),
                     "text": scrub(str(text or ""), chars)})
    return {"v": REPORT_VERSION, "at": now, "status": "ok", "reason": None, "top": rows,
            "deltas": {}}


def _prev_key() -> str:
    return store.key("queries", "statements", "prev")


def _latest_key() -> str:
    return store.key("queries", "statements", "latest")


def collect(*, top: int | None = None, now: float | None = None) -> StatementsReport:
    """Read the top statements, store what changed since the previous run as series and the
    report as the latest; returns the report. A statistics reset (calls going down) counts
    from zero. Idempotent within a run's second: a re-run finds no change to record."""
    report = read(top=top, now=now)
    now = report["at"]
    client = store.client()
    if report["status"] != "ok":
        client.set(_latest_key(), json.dumps(report, separators=(",", ":")), ex=KEEP_SECONDS)
        return report
    prev = cast("dict[str, str]", client.hgetall(_prev_key()))
    points: list[tuple[str, float, float]] = []
    deltas: dict[str, dict[str, float]] = {}
    for st in report["top"]:
        before = prev.get(st["queryid"])
        if before is None:
            continue
        calls0, total0, rows0 = before.split()
        d_calls = st["calls"] - int(calls0)
        d_total = st["total_ms"] - float(total0)
        d_rows = st["rows"] - int(rows0)
        if d_calls < 0:  # pg_stat_statements_reset(): count from zero
            d_calls, d_total, d_rows = st["calls"], st["total_ms"], st["rows"]
        labels = {"queryid": st["queryid"]}
        d = {"calls": float(d_calls), "total_ms": round(max(d_total, 0.0), 3),
             "rows": float(max(d_rows, 0))}
        if d_calls:
            d["mean_ms"] = round(d["total_ms"] / d_calls, 3)
        deltas[st["queryid"]] = d
        points += [(ts.series_id(f"db.statement.{k}", labels), now, v) for k, v in d.items()]
    report["deltas"] = deltas
    if points:
        ts.write(points, now=now)
    pipe = client.pipeline(transaction=True)
    # Only the current top is kept: the hash stays as small as the report.
    pipe.delete(_prev_key())
    if report["top"]:
        pipe.hset(_prev_key(), mapping={
            st["queryid"]: f"{st['calls']} {st['total_ms']!r} {st['rows']}"
            for st in report["top"]})
        pipe.expire(_prev_key(), KEEP_SECONDS)
    pipe.set(_latest_key(), json.dumps(report, separators=(",", ":")), ex=KEEP_SECONDS)
    pipe.execute()
    return report


def latest() -> StatementsReport | None:
    """The report of the last :func:`collect`, or None."""
    raw = store.client().get(_latest_key())
    if raw is None:
        return None
    doc: dict[str, Any] = json.loads(cast(str, raw))
    return cast(StatementsReport, doc)
