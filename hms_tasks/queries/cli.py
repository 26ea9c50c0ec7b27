"""``hms-tasks queries``: audit probes, read their reports and plans, see live N+1 patterns.

Mounted on the ``hms-tasks`` command line by :func:`hms_tasks.cli.mount`. Exit codes: 0 fine,
1 a probe over budget or failing, 2 bad input (an unknown probe, a bad setting such as a
negative ``HMS_TASKS_QUERIES_SAMPLE_RATE``; nothing runs).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from hms_tasks.console import fail, fmt_time, setup, table
from hms_tasks.queries.db_cli import db, statements

__all__ = ["commands", "queries"]


def _checked(probe: str | None = None) -> None:
    """Django set up, the settings valid and ``probe`` known: or exit 2 with nothing run."""
    setup()
    from hms_tasks.errors import ConfigurationError, InvalidArguments
    from hms_tasks.queries import probes, settings

    try:
        settings.get()
        if probe is not None:
            probes.get(probe)
    except (ConfigurationError, InvalidArguments) as exc:
        fail(str(exc))


def _budget(b: dict[str, Any]) -> str:
    limit = b["limit"]
    return "-" if limit is None else f"{b['actual']:g}/{limit:g}" + ("" if b["ok"] else " !")


@click.group()
def queries() -> None:
    """Query audits (probes, N+1 patterns, plans, index advice) and live N+1 sampling."""


@queries.command("audit")
@click.argument("probe", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON.")
def audit_command(probe: str | None, as_json: bool) -> None:
    """Audit PROBE (default: every registered probe) now, in this process, and store the
    reports. Exit 1 when a probe is over budget or fails."""
    _checked(probe)
    from hms_tasks.queries import audits, probes

    chosen = [probe] if probe else probes.names()
    reports: list[dict[str, Any]] = []
    failed: list[str] = []
    for name in chosen:
        try:
            report = audits.audit(name)
        except audits.ProbeFailed as exc:
            failed.append(str(exc))
            continue
        summary = audits.record(report)
        reports.append({**report, "regressed": summary["regressed"]})
    if as_json:
        click.echo(json.dumps(reports, indent=2, sort_keys=True))
    elif not chosen:
        click.echo("no probes registered (docs/queries.md says how to add them)")
    else:
        click.echo(table([
            [r["probe"], str(r["queries"]), f"{r['ms']:.1f}", str(len(r["n_plus_one"])),
             str(len(r["duplicates"])), str(len(r["advice"])), _budget(r["budget"]["queries"]),
             _budget(r["budget"]["ms"]), "yes" if r["regressed"] else "no"]
            for r in reports], ["PROBE", "QUERIES", "MS", "N+1", "DUPS", "ADVICE",
                                "BUDGET_Q", "BUDGET_MS", "REGRESSED"]))
        for r in reports:
            for p in r["n_plus_one"]:
                click.echo(f"{r['probe']}: N+1 x{p['count']} at {p['site']}: {p['fingerprint']}")
            for a in r["advice"]:
                click.echo(f"{r['probe']}: advice: {a['sql']}")
    for line in failed:
        click.echo(f"error: {line}", err=True)
    if failed or any(not all(b["ok"] for b in r["budget"].values()) for r in reports):
        sys.exit(1)


@queries.command("report")
@click.option("--json", "as_json", is_flag=True, help="Print the stored documents as JSON.")
def report_command(as_json: bool) -> None:
    """The last stored audit of every probe (from the nightly task or `queries audit`)."""
    _checked()
    from hms_tasks.queries import audits

    docs = audits.reports()
    if as_json:
        click.echo(json.dumps(docs, indent=2, sort_keys=True))
    elif not docs:
        click.echo("no audits stored yet (run `hms-tasks queries audit`)")
    else:
        click.echo(table([
            [d["report"]["probe"], fmt_time(d["at"]), str(d["report"]["queries"]),
             f"{d['report']['ms']:.1f}", str(len(d["report"]["n_plus_one"])),
             str(len(d["report"]["duplicates"])), str(len(d["report"]["advice"])),
             _budget(d["report"]["budget"]["queries"]), _budget(d["report"]["budget"]["ms"]),
             "yes" if d["regressed"] else "no"]
            for d in docs], ["PROBE", "AUDITED", "QUERIES", "MS", "N+1", "DUPS", "ADVICE",
                             "BUDGET_Q", "BUDGET_MS", "REGRESSED"]))
    if any(not all(b["ok"] for b in d["report"]["budget"].values()) for d in docs):
        sys.exit(1)


@queries.command("explain")
@click.argument("probe")
@click.option("--json", "as_json", is_flag=True, help="Print plans and advice as JSON.")
def explain_command(probe: str, as_json: bool) -> None:
    """Run PROBE (rolled back) and show the plan of each distinct statement and the index
    advice. Stores nothing."""
    _checked(probe)
    from hms_tasks.queries import audits

    try:
        report = audits.audit(probe)
    except audits.ProbeFailed as exc:
        fail(str(exc), code=1)
    if as_json:
        click.echo(json.dumps({"plans": report["plans"], "advice": report["advice"]},
                              indent=2, sort_keys=True))
        return
    for plan in report["plans"]:
        analyzed = " (analyzed)" if plan.get("analyzed") else ""
        click.echo(f"-- x{plan['count']} {plan['ms']:.1f} ms{analyzed}: {plan['fingerprint']}")
        if "error" in plan:
            click.echo(f"   could not explain: {plan['error']}")
        elif isinstance(plan.get("plan"), list):
            for row in plan["plan"]:
                click.echo(f"   {row['detail']}")
        else:
            _tree(plan.get("plan") or {}, 1)
    for a in report["advice"]:
        click.echo(f"advice: {a['sql']}")
    if not report["advice"]:
        click.echo("advice: none")


def _tree(node: dict[str, Any], depth: int) -> None:
    parts = [str(node.get("Node Type", "?"))]
    if node.get("Relation Name"):
        parts.append(f"on {node['Relation Name']}")
    if node.get("Index Name"):
        parts.append(f"using {node['Index Name']}")
    parts.append(f"rows={node.get('Actual Rows', node.get('Plan Rows', '?'))}")
    for cond in ("Index Cond", "Filter", "Hash Cond", "Join Filter"):
        if node.get(cond):
            parts.append(f"{cond.lower()}: {node[cond]}")
    click.echo("   " * depth + " ".join(parts))
    for child in node.get("Plans") or ():
        _tree(child, depth + 1)


@queries.command("live")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="Patterns shown.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def live_command(limit: int, as_json: bool) -> None:
    """N+1 patterns the live sampling middleware saw (HMS_TASKS_QUERIES_SAMPLE_RATE)."""
    _checked()
    from hms_tasks.queries import live, settings

    data = live.report(limit=limit)
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    click.echo(f"sample rate {settings.get().queries_sample_rate:g}; sampled requests"
               f" {data['requests']}; patterns {data['patterns_total']}")
    if data["patterns"]:
        click.echo(table([
            [str(p["count"]), str(p["max_per_request"]), fmt_time(p["last_seen"]), p["site"],
             p["fingerprint"][:100]] for p in data["patterns"]],
            ["REQUESTS", "MAX_REPEATS", "LAST_SEEN", "SITE", "FINGERPRINT"]))


# `queries statements` (pg_stat_statements) and `db` (server and pool health) live in db_cli.
queries.add_command(statements)

#: Mounted on ``hms-tasks`` (replacing a same-named command of the core).
commands: list[click.Command] = [queries, db]
