"""``hms-tasks db`` and ``hms-tasks queries statements``: the database's health and its
statement statistics, read now from this process.

``db`` shows the server's side (``pg_stat_activity``: connections by state, use of
``max_connections``, sessions idle in a transaction, the longest running query, lock waits)
and the connection pool of every process that published its figures (those current within
``HMS_TASKS_DB_POOL_STALE_SECONDS``) and of this one. Exit codes: 0 healthy, 1 a problem
(connections above 80 % of max_connections, a session idle in a transaction too long, a
request waiting for a pooled connection now, or the database unreachable), 2 bad input.

``statements`` shows the top statements by total time from ``pg_stat_statements`` (query id,
calls, total and mean time, rows, the normalized text cut short), or what to install when the
extension is missing. It reads; ``hms.queries.statements`` records.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from hms_tasks.console import setup, table

__all__ = ["db", "statements"]

#: Use of max_connections above which ``db`` exits 1 (the alert rule's threshold).
SATURATED_PERCENT = 80.0


def _num(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def gather() -> dict[str, Any]:
    """The server figures and the pools (per process and summed per node), read now."""
    from hms_tasks.metrics import collect
    from hms_tasks.queries import pool

    now = time.time()
    server, _ = collect.database_sample(now=now)
    procs = pool.processes(now=now)
    by_node: dict[str, list[pool.PoolFigures]] = {}
    for p in procs:
        by_node.setdefault(p["node"], []).append(p)
    nodes = {name: pool.summarize(group) for name, group in by_node.items()}
    return {"at": now, "server": server, "pools": nodes, "processes": procs}


def problems(report: dict[str, Any]) -> list[str]:
    """What makes ``db`` exit 1, one line each."""
    server = report["server"]
    out: list[str] = []
    if "error" in server:
        out.append(f"database unreachable ({server['error']})")
    if (server.get("connections_used_percent") or 0) > SATURATED_PERCENT:
        out.append(f"connections at {server['connections_used_percent']:.0f} % of"
                   " max_connections")
    if server.get("idle_in_transaction"):
        out.append(f"{server['idle_in_transaction']} session(s) idle in a transaction longer"
                   f" than {server['idle_in_transaction_seconds']} s")
    waiting = sum(p["requests_waiting"] for p in report["processes"])
    if waiting:
        out.append(f"{waiting} request(s) waiting for a pooled connection")
    return out


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def db(as_json: bool) -> None:
    """The database's health: server connections, idle transactions, locks, and pools.

    Exit code 1 when connections exceed 80 % of max_connections, a session sits idle in a
    transaction too long, a request waits for a pooled connection, or the database is down.
    """
    setup()
    report = gather()
    found = problems(report)
    if as_json:
        click.echo(json.dumps({**report, "problems": found}, indent=2, sort_keys=True,
                              default=str))
    else:
        s = report["server"]
        if s.get("vendor") != "postgresql":
            click.echo(f"database: {s.get('vendor')} (no server to watch; pooling is for"
                       " PostgreSQL)")
        elif "error" not in s:
            states = ", ".join(f"{k} {v}" for k, v in sorted(s["by_state"].items())) or "-"
            click.echo(table([
                ["connections (this database)", f"{s['connections']} ({states})"],
                ["server connections / max", f"{s['server_connections']} / "
                 f"{s['max_connections']} ({s['connections_used_percent']:.1f} %)"],
                [f"idle in transaction > {s['idle_in_transaction_seconds']} s",
                 f"{s['idle_in_transaction']} (oldest {s['idle_in_transaction_max_age_s']:.1f}"
                 " s)"],
                ["longest running query", f"{s['longest_query_s']:.1f} s"],
                ["waiting for a lock", str(s["lock_waits"])],
                ["pg_stat_statements", "installed" if s["pg_stat_statements"] else "missing"],
            ], ["SERVER", "NOW"]))
        click.echo("")
        if not report["processes"]:
            click.echo("pools: none published (pooling off, or no process used the database"
                       " in the last HMS_TASKS_DB_POOL_STALE_SECONDS)")
        else:
            click.echo(table([
                [p["node"], str(p["pid"]), f"{p['pool_size']}/{p['pool_max']}",
                 str(p["pool_available"]), str(p["requests_waiting"]), str(p["requests_num"]),
                 str(p["requests_queued"]),
                 _num(p["requests_wait_ms"] / p["requests_num"] if p["requests_num"] else None,
                      2),
                 str(p["requests_errors"] + p["connections_errors"]),
                 f"{time.time() - p['at']:.0f}s"]
                for p in report["processes"]
            ], ["NODE", "PID", "SIZE/MAX", "IDLE", "WAITING", "REQUESTS", "QUEUED",
                "WAIT_MS_MEAN", "ERRORS", "AGE"]))
        for line in found:
            click.echo(f"problem: {line}")
    if found:
        sys.exit(1)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--top", type=click.IntRange(1, 500), default=None,
              help="How many statements (default HMS_TASKS_STATEMENTS_TOP).")
def statements(as_json: bool, top: int | None) -> None:
    """The top statements by total time, from pg_stat_statements (or what to install)."""
    setup()
    from hms_tasks.queries import statements as stmts

    report = stmts.read(top=top)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    elif report["status"] != "ok":
        click.echo(f"statements: {report['status']}: {report['reason']}")
    else:
        click.echo(table([
            [st["queryid"], str(st["calls"]), _num(st["total_ms"]), _num(st["mean_ms"], 2),
             str(st["rows"]), st["text"]]
            for st in report["top"]
        ], ["QUERYID", "CALLS", "TOTAL_MS", "MEAN_MS", "ROWS", "STATEMENT"]))


