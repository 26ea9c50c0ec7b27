"""A run's report: verdict against its thresholds, regression against the previous run of the
same test, and a self-contained HTML page with charts.

Pure functions over plain dicts (no Redis): :mod:`~hms_tasks.loadtest.orchestrate` gathers the
data and stores what these return.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

from hms_tasks.loadtest.spec import LoadTestSpec, Thresholds
from hms_tasks.loadtest.text import count

__all__ = ["REPORT_VERSION", "regression", "render_html", "verdict"]

REPORT_VERSION = 1


def _check(scope: str, metric: str, limit: float, row: Mapping[str, Any] | None) -> dict[str, Any]:
    actual: float | None
    if row is None or not row.get("requests"):
        return {"scope": scope, "metric": metric, "limit": limit, "actual": None,
                "passed": False, "note": "no requests"}
    if metric == "error_rate":
        actual = float(row["error_rate"])
        passed = actual <= limit
    elif metric == "min_rps":
        actual = float(row["rps"])
        passed = actual >= limit
    else:
        value = row.get(metric)
        actual = None if value is None else float(value)
        passed = actual is not None and actual <= limit
    return {"scope": scope, "metric": metric, "limit": limit, "actual": actual,
            "passed": passed}


def verdict(test: LoadTestSpec, summary: Mapping[str, Any], shards: Sequence[Mapping[str, Any]],
            *, aborted: bool) -> dict[str, Any]:
    """Every threshold with its actual value and outcome, and the run's status: ``aborted``
    when asked to stop, ``failed`` when a threshold failed or a shard did not finish (with
    the reasons), ``passed`` otherwise."""
    checks: list[dict[str, Any]] = []
    for metric, limit in test.thresholds.items():
        checks.append(_check("total", metric, limit, summary["total"]))
    rows = {r["name"]: r for r in summary["endpoints"]}
    for key, th in sorted(test.endpoint_thresholds.items()):
        assert isinstance(th, Thresholds)
        for metric, limit in th.items():
            checks.append(_check(key, metric, limit, rows.get(key)))
    reasons: list[str] = []
    for s in shards:
        if s.get("state") != "finished":
            reasons.append(f"shard {s['index']} {s.get('state') or 'never started'}:"
                           f" {s.get('reason') or 'no result by the deadline'}")
    for c in checks:
        if not c["passed"]:
            op = ">=" if c["metric"] == "min_rps" else "<="
            shown = "no value" if c["actual"] is None else f"{c['actual']:g}"
            reasons.append(f"{c['scope']} {c['metric']} {shown} (must be {op} {c['limit']:g})"
                           + (f": {c['note']}" if c.get("note") else ""))
    if aborted:
        status = "aborted"
        reasons.insert(0, "aborted on request")
    else:
        status = "failed" if reasons else "passed"
    return {"status": status, "reasons": reasons, "thresholds": checks}


def regression(current: Mapping[str, Any], previous: Mapping[str, Any] | None, *,
               tolerance: float) -> dict[str, Any]:
    """Compare p95 and requests per second with the previous run of the same test: regressed
    when p95 rose, or RPS fell, by more than ``tolerance`` (a fraction)."""
    out: dict[str, Any] = {"tolerance": tolerance, "previous_run": None, "compared": False,
                           "regressed": False, "metrics": {}}
    if previous is None:
        out["note"] = "no previous run of this test"
        return out
    out["previous_run"] = previous["run_id"]
    cur_def, prev_def = current["definition"], previous["definition"]
    if (cur_def["target"], cur_def["users"], cur_def["scenario"]) != (
            prev_def["target"], prev_def["users"], prev_def["scenario"]):
        out["note"] = "the previous run had another target, scenario or number of users"
        return out
    if current["verdict"]["status"] == "aborted" or not current["total"]["requests"] \
            or not previous["total"]["requests"]:
        out["note"] = "one of the runs was aborted or made no requests"
        return out
    out["compared"] = True
    for metric, worse in (("p95_ms", 1), ("rps", -1)):
        prev = previous["total"].get(metric)
        cur = current["total"].get(metric)
        if prev is None or cur is None or prev <= 0:
            continue
        change = (cur - prev) / prev
        regressed = change * worse > tolerance
        out["metrics"][metric] = {"previous": prev, "current": cur,
                                  "change": round(change, 4), "regressed": regressed}
        out["regressed"] = out["regressed"] or regressed
    return out


# -- HTML ----------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2330;max-width:1100px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px}
table{border-collapse:collapse;margin:4px 0}td,th{padding:3px 10px;border-bottom:1px solid #dde;
text-align:right}th{background:#f3f4f8}td:first-child,th:first-child{text-align:left}
.passed{color:#0a7d32;font-weight:600}.failed,.regressed{color:#b3261e;font-weight:600}
.aborted{color:#8a5a00;font-weight:600}.muted{color:#667}svg{background:#fbfbfd;
border:1px solid #e3e4ea}.legend span{margin-right:14px}
"""
_COLORS = {"p50_ms": "#2f6fdf", "p95_ms": "#e07b00", "p99_ms": "#b3261e", "rps": "#0a7d32",
           "users": "#7a4fd0"}


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _plain(value: Any) -> str:
    """A value of the environment as text: lists joined, mappings as ``key value`` pairs."""
    if value is None or value == [] or value == {}:
        return "-"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    return _fmt(value) if isinstance(value, float) else str(value)


def _chart(chart_id: str, title: str, timeline: Sequence[Mapping[str, Any]],
           series: Sequence[tuple[str, str]], unit: str) -> str:
    """An inline SVG line chart of ``series`` (field, label) over the timeline's seconds."""
    width, height, left, bottom, top, right = 960, 260, 60, 30, 12, 12
    if not timeline:
        return f'<p class="muted" id="{chart_id}">no data</p>'
    t0 = timeline[0]["t"]
    span = max(1, timeline[-1]["t"] - t0)
    values = [float(p[f]) for p in timeline for f, _ in series if p.get(f) is not None]
    high = max(values) if values else 1.0
    high = 1.0 if high <= 0 else high * 1.1
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(t: int) -> float:
        return float(left + (t - t0) / span * plot_w)

    def y(v: float) -> float:
        return top + plot_h - v / high * plot_h

    parts = [f'<svg id="{chart_id}" xmlns="http://www.w3.org/2000/svg" width="{width}"'
             f' height="{height}" viewBox="0 0 {width} {height}" role="img"'
             f' aria-label="{html.escape(title)}">']
    for i in range(5):  # horizontal grid with labels
        v = high * i / 4
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}"'
                     ' stroke="#e3e4ea"/>')
        parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="11"'
                     f' fill="#667">{v:,.0f}</text>')
    for i in range(6):
        t = t0 + span * i / 5
        parts.append(f'<text x="{x(int(t)):.1f}" y="{height - 10}" text-anchor="middle"'
                     f' font-size="11" fill="#667">{t - t0:.0f} s</text>')
    for field, label in series:
        pts = " ".join(f"{x(p['t']):.1f},{y(float(p[field])):.1f}" for p in timeline
                       if p.get(field) is not None)
        parts.append(f'<polyline data-series="{field}" fill="none" stroke-width="1.8"'
                     f' stroke="{_COLORS.get(field, "#333")}" points="{pts}">'
                     f'<title>{html.escape(label)}</title></polyline>')
    parts.append("</svg>")
    legend = "".join(f'<span style="color:{_COLORS.get(f, "#333")}">&#9632; {html.escape(lb)}'
                     "</span>" for f, lb in series)
    return (f"<h2>{html.escape(title)}</h2><div class=\"legend\">{legend}"
            f' <span class="muted">({html.escape(unit)})</span></div>' + "".join(parts))


def render_html(doc: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML page: summary, verdict, regression, two charts
    (latency percentiles and RPS with users, per second), the per-endpoint table, errors,
    shards and environment. The whole report is embedded as JSON in
    ``<script type="application/json" id="hms-loadtest-report">``; no external resource."""
    e = html.escape
    status = doc["verdict"]["status"]
    total = doc["total"]
    d = doc["definition"]
    head = [
        f"<h1>Load test <code>{e(doc['test'])}</code>: <span class=\"{e(status)}\">"
        f"{e(status.upper())}</span></h1>",
        f"<p class=\"muted\">run {e(doc['run_id'])} &middot; target <code>{e(d['target'])}"
        f"</code> &middot; {count(d['users'], 'user')} over {count(d['shards'], 'shard')} &middot;"
        f" {d['duration']:g} s &middot; load window {doc['window_s']:g} s</p>",
    ]
    summary = _table(["requests", "failures", "error rate", "req/s", "p50 ms", "p95 ms",
                      "p99 ms", "max ms"],
                     [[_fmt(total["requests"]), _fmt(total["failures"]),
                       f"{total['error_rate'] * 100:.2f} %", _fmt(total["rps"]),
                       _fmt(total.get("p50_ms")), _fmt(total.get("p95_ms")),
                       _fmt(total.get("p99_ms")), _fmt(total.get("max_ms"))]])
    checks = doc["verdict"]["thresholds"]
    verdict_html = (_table(["scope", "threshold", "limit", "actual", "outcome"], [
        [e(c["scope"]), e(c["metric"]), _fmt(c["limit"], 3), _fmt(c["actual"], 3),
         f'<span class="{"passed" if c["passed"] else "failed"}">'
         f'{"pass" if c["passed"] else "FAIL"}</span>'] for c in checks])
        if checks else '<p class="muted">no thresholds</p>')
    reasons = "".join(f"<li>{e(r)}</li>" for r in doc["verdict"]["reasons"])
    reg = doc.get("regression") or {}
    if reg.get("compared"):
        reg_html = _table(["metric", "previous", "current", "change", "outcome"], [
            [e(m), _fmt(v["previous"]), _fmt(v["current"]), f"{v['change'] * 100:+.1f} %",
             '<span class="regressed">REGRESSED</span>' if v["regressed"] else "ok"]
            for m, v in reg.get("metrics", {}).items()])
        reg_html = (f"<p>against run {e(str(reg['previous_run']))}, tolerance"
                    f" {reg['tolerance'] * 100:g} %</p>" + reg_html)
    else:
        reg_html = f'<p class="muted">{e(str(reg.get("note", "not compared")))}</p>'
    pct_cols = ["p50_ms", "p75_ms", "p90_ms", "p95_ms", "p99_ms", "p99.9_ms"]
    endpoints = _table(
        ["endpoint", "requests", "failures", "req/s", "min", "avg", *[c[:-3] for c in pct_cols],
         "max"],
        [[e(r["name"]), _fmt(r["requests"]), _fmt(r["failures"]), _fmt(r["rps"]),
          _fmt(r["min_ms"]), _fmt(r["avg_ms"]), *[_fmt(r.get(c)) for c in pct_cols],
          _fmt(r["max_ms"])] for r in [*doc["endpoints"], doc["total"]]])
    errors = (_table(["endpoint", "error", "count"], [[e(x["endpoint"]), e(x["error"]),
                                                       _fmt(x["count"])] for x in doc["errors"]])
              if doc["errors"] else '<p class="muted">none</p>')
    contained = {True: "namespace", False: "Python guard only", None: "-"}
    shards = _table(["shard", "node", "state", "users", "requests", "failures", "contained",
                     "reason"], [
        [str(s["index"]), e(str(s.get("node") or "-")), e(str(s.get("state") or "-")),
         _fmt(s.get("users")), _fmt(s.get("requests")), _fmt(s.get("failures")),
         contained[s.get("contained")], e(str(s.get("reason") or "-"))]
        for s in doc["shards"]])
    env_html = _table(["", ""], [[e(k.replace("_", " ")), e(_plain(v))]
                                 for k, v in doc["environment"].items()])
    timeline = doc["timeline"]
    charts = [
        _chart("chart-latency", "Latency percentiles per second", timeline,
               [("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99")], "milliseconds"),
        _chart("chart-rps", "Requests per second and users", timeline,
               [("rps", "requests/s"), ("users", "users")], "per second; users"),
    ]
    data = json.dumps(doc, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return "".join([
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>Load test {e(doc['test'])} {e(doc['run_id'])}</title>",
        f"<style>{_CSS}</style></head><body>", *head,
        "<h2>Summary</h2>", summary,
        "<h2>Verdict</h2>", verdict_html, f"<ul>{reasons}</ul>" if reasons else "",
        "<h2>Against the previous run</h2>", reg_html,
        *charts,
        "<h2>Endpoints</h2><p class=\"muted\">response times in ms</p>", endpoints,
        "<h2>Errors</h2>", errors,
        "<h2>Shards</h2>", shards,
        "<h2>Environment</h2>", env_html,
        f'<script type="application/json" id="hms-loadtest-report">{data}</script>',
        "</body></html>",
    ])
