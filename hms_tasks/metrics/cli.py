"""``hms-tasks metrics``, ``alerts`` and ``exporter``: read the store, the alerts, and serve
them to Prometheus. Mounted on the root CLI by :func:`hms_tasks.cli.mount`.

Exit codes: 0 ok, 1 a service failed (Redis unreachable, a port taken), 2 bad input (nothing
written).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Any

import click

from hms_tasks.console import fail, fmt_time, redis_needed, setup, table

__all__ = ["alerts", "commands", "exporter", "metrics"]


def _age(ts: float, now: float) -> str:
    age = max(0.0, now - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if age >= size:
            return f"{age / size:.0f}{unit}"
    return f"{age:.0f}s"


@click.command()
@click.argument("series", metavar="[SERIES]", required=False)
@click.option("--node", help="Only series whose node label is N.", metavar="N")
@click.option("--since", default="1h", show_default=True,
              help="How far back: 90s, 15m, 1h, 7d, 1h30m.")
@click.option("--resolution", type=click.Choice(["auto", "raw", "1m", "1h"]), default="auto",
              show_default=True, help="Raw points or aggregates (auto: by --since).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def metrics(series: str | None, node: str | None, since: str, resolution: str,
            as_json: bool) -> None:
    """List the series in the metrics store, or show the points of SERIES (a name such as
    host.cpu.percent, or a full id such as host.cpu.percent{node=w1@h})."""
    setup()
    with redis_needed():
        _metrics(series, node, since, resolution, as_json)


def unknown_series_message(series: str, name: str, node: str | None, among: list[str]) -> str:
    """Why SERIES (``name`` once parsed, filtered by ``node``) matched nothing in ``among``
    (the current series ids): the name is unknown, or the node, or the labels."""
    from hms_tasks.metrics import store as ts

    same_name = [sid for sid in among if ts.parse_series(sid)[0] == name]
    if not same_name:
        known = ", ".join(sorted({ts.parse_series(sid)[0] for sid in among})) or "none yet"
        return f"unknown series {series!r}; known: {known}"
    if node is not None:
        nodes = sorted({n for sid in same_name if (n := ts.labels_of(sid).get("node"))})
        if node not in nodes:
            if not nodes:
                return f"series {name} has no node label; leave out --node"
            return f"unknown node {node!r} for series {name}; known nodes: {', '.join(nodes)}"
    return f"no series matches {series!r}; known: {', '.join(sorted(same_name))}"


def _metrics(series: str | None, node: str | None, since: str, resolution: str,
             as_json: bool) -> None:
    from hms_tasks.metrics import settings
    from hms_tasks.metrics import store as ts

    try:
        seconds = ts.parse_duration(since)
    except ValueError as exc:
        fail(f"--since: {exc}")
    longest = settings.get().metrics_retention.longest
    if seconds > longest:
        fail(f"--since: at most the longest retention, {longest // 86400} days")
    now = time.time()
    latest = ts.latest(now=now)
    wanted = {"node": node} if node else {}
    if series is None:
        rows = [(sid, p) for sid, p in sorted(latest.items())
                if not node or ts.labels_of(sid).get("node") == node]
        if as_json:
            click.echo(json.dumps([{"series": sid, "ts": p.ts, "value": p.value}
                                   for sid, p in rows], indent=2))
        elif not rows:
            click.echo("no series yet" + (f" for node {node}" if node else ""))
        else:
            click.echo(table([[sid, f"{p.value:g}", _age(p.ts, now)] for sid, p in rows],
                              ["SERIES", "LAST", "AGE"]))
        return
    try:
        name, labels = ts.parse_series(series)
    except ValueError as exc:
        fail(f"SERIES: {exc}")
    ids = ts.matching(name, {**dict(labels), **wanted}, among=list(latest))
    if not ids:
        fail(unknown_series_message(series, name, node, list(latest)))
    out: dict[str, Any] = {}
    for sid in ids:
        used, points = ts.query(sid, since=now - seconds, now=now,
                                resolution=resolution)  # type: ignore[arg-type]
        out[sid] = {"resolution": used, "points": [p._asdict() for p in points]}
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for sid, body in out.items():
        click.echo(f"{sid}  ({body['resolution']}, {len(body['points'])} points)")
        if body["resolution"] == "raw":
            cells = [[fmt_time(p["ts"]), f"{p['value']:g}"] for p in body["points"]]
            click.echo(table(cells, ["TIME", "VALUE"]) if cells else "  no points")
        else:
            cells = [[fmt_time(p["ts"]), f"{p['min']:g}", f"{p['max']:g}", f"{p['mean']:g}",
                      str(p["n"])] for p in body["points"]]
            click.echo(table(cells, ["TIME", "MIN", "MAX", "MEAN", "COUNT"]) if cells
                       else "  no points (rolled up every minute)")


@click.command()
@click.option("--all", "show_all", is_flag=True, help="Include recently resolved alerts.")
@click.option("--events", "last", type=click.IntRange(0, 1000), default=0,
              help="Also show the last N transitions.")
@click.option("--rules", "show_rules", is_flag=True, help="List the configured rules instead.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def alerts(show_all: bool, last: int, show_rules: bool, as_json: bool) -> None:
    """List the alerts that are pending or firing (with --all, resolved ones too)."""
    setup()
    with redis_needed():
        _alerts(show_all, last, show_rules, as_json)


def _alerts(show_all: bool, last: int, show_rules: bool, as_json: bool) -> None:
    from hms_tasks.metrics import alerts as al

    if show_rules:
        rules = al.rules()
        if as_json:
            click.echo(json.dumps([r.__dict__ for r in rules], indent=2, default=list))
            return
        click.echo(table([[r.name, r.series, f"{r.op} {r.threshold:g}", f"{r.clear:g}",
                            f"{r.for_s}s", f"{r.clear_for_s}s", r.severity] for r in rules],
                          ["RULE", "SERIES", "FIRES", "CLEARS AT", "FOR", "CLEAR FOR",
                           "SEVERITY"]))
        return
    states = sorted(al.states().values(), key=lambda st: (st["state"] != "firing", st["id"]))
    if not show_all:
        states = [st for st in states if st["state"] != "resolved"]
    recent = al.events(last=last) if last else []
    if as_json:
        click.echo(json.dumps({"alerts": states, "events": recent}, indent=2))
        return
    if states:
        click.echo(table([[st["rule"], st["series"], st["state"], fmt_time(st["since"]),
                            "-" if st["value"] is None else f"{st['value']:g}"]
                           for st in states], ["RULE", "SERIES", "STATE", "SINCE", "VALUE"]))
    else:
        click.echo("no alerts" + ("" if show_all else " pending or firing"))
    if recent:
        click.echo("")
        click.echo(table([[fmt_time(e["at"]), e["rule"], e["series"],
                            f"{e['old']} -> {e['new']}",
                            "-" if e["value"] is None else f"{e['value']:g}"] for e in recent],
                          ["AT", "RULE", "SERIES", "TRANSITION", "VALUE"]))


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="IP address to listen on; anything but loopback exposes the metrics.")
@click.option("--port", type=click.IntRange(1, 65535), default=9808, show_default=True,
              help="Port to listen on.")
def exporter(host: str, port: int) -> None:
    """Serve the metrics store in Prometheus text format at http://HOST:PORT/metrics."""
    setup()
    from hms_tasks.metrics.prometheus import ExporterServer

    try:
        server = ExporterServer(host, port)
    except ValueError:
        fail("--host: expected an IP address such as 127.0.0.1 or ::1")
    except OSError as exc:
        fail(f"cannot listen on {host}:{port} ({exc.strerror or type(exc).__name__})", 1)
    signal.signal(signal.SIGTERM,
                  lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"serving http://{shown}:{server.server_address[1]}/metrics", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


#: Mounted on ``hms-tasks`` (replacing the core's commands of the same names).
commands: list[click.Command] = [metrics, alerts, exporter]
