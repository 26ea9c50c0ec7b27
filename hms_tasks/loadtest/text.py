"""What ``hms-tasks loadtest`` needs besides click: definitions from a file and flags, and the
text of status lines and reports."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hms_tasks.loadtest.spec import METHODS

__all__ = ["bar", "count", "definition_from", "fraction_done", "progress_line", "progress_stats",
           "report_text"]


def count(n: int, singular: str, plural: str | None = None) -> str:
    """``1 shard``, ``2 shards``, ``0 processes`` (``plural`` when adding an s is wrong)."""
    return f"{n:,} {singular if n == 1 else plural or singular + 's'}"


def _number(text: str) -> Any:
    try:
        value = float(text)
    except ValueError:
        return text  # the definition check names the field and its expected type
    return int(value) if value.is_integer() and "." not in text else value


def _load_file(path: str) -> Any:
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


def definition_from(*, base: dict[str, Any] | None, file: str | None, name: str | None,
                    target: str | None, scenario: str | None, endpoints: Sequence[str],
                    users: int | None, spawn_rate: float | None, ramp_up: float | None,
                    duration: float | None, shards: int | None,
                    thresholds: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """A definition from a settings test (``base``), a JSON/YAML ``file`` and flags (later ones
    win), and the problems met reading the flags (each naming its flag)."""
    problems: list[str] = []
    d: dict[str, Any] = dict(base or {})
    if file is not None:
        try:
            loaded = _load_file(file)
        except (OSError, ValueError) as exc:
            problems.append(f"--file: cannot read a JSON or YAML definition"
                            f" ({type(exc).__name__})")
            loaded = {}
        except Exception as exc:  # yaml.YAMLError and friends
            problems.append(f"--file: not valid YAML ({type(exc).__name__})")
            loaded = {}
        if not isinstance(loaded, dict):
            problems.append("--file: expected an object (a load test definition)")
        else:
            d.update(loaded)
            if isinstance(loaded.get("thresholds"), dict) and base:
                d["thresholds"] = loaded["thresholds"]
    for key, value in (("name", name), ("target", target), ("users", users),
                       ("duration", duration), ("shards", shards)):
        if value is not None:
            d[key] = value
    if spawn_rate is not None:
        d.pop("ramp_up", None)
        d["spawn_rate"] = spawn_rate
    if ramp_up is not None:
        d.pop("spawn_rate", None)
        d["ramp_up"] = ramp_up
    if scenario is not None:
        d["scenario"] = "demo" if scenario == "demo" else {"locustfile": scenario}
    if endpoints:
        eps = []
        for text in endpoints:
            parts = text.split()
            if len(parts) not in (2, 3) or parts[0].upper() not in METHODS:
                problems.append("--endpoint: expected \"METHOD /path [WEIGHT]\"")
                continue
            ep: dict[str, Any] = {"method": parts[0].upper(), "path": parts[1]}
            if len(parts) == 3:
                ep["weight"] = _number(parts[2])
            eps.append(ep)
        d["scenario"] = {"endpoints": eps}
    if thresholds:
        th: dict[str, Any] = dict(d.get("thresholds") or {})
        for text in thresholds:
            scope, sep, rest = text.rpartition(":") if " " in text else ("", "", text)
            metric, eq, value = rest.partition("=")
            if not eq or not metric:
                problems.append("--threshold: expected METRIC=VALUE or \"METHOD /path:METRIC="
                                "VALUE\" (metrics: p50_ms, p95_ms, p99_ms, error_rate, min_rps)")
                continue
            if sep:
                th.setdefault("endpoints", {}).setdefault(scope.strip(), {})[metric] = \
                    _number(value)
            else:
                th[metric] = _number(value)
        d["thresholds"] = th
    return d, problems


def bar(fraction: float, width: int = 30) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def fraction_done(st: dict[str, Any]) -> float:
    if st["status"] in ("passed", "failed", "aborted"):
        return 1.0
    return min(1.0, float(st["elapsed_s"]) / max(float(st["duration_s"]), 0.001))


def progress_stats(st: dict[str, Any]) -> str:
    state = st["status"] + (" (aborting)" if st.get("aborting") else "")
    return (f"{st['elapsed_s']:.0f}/{st['duration_s']:.0f} s  users {st['users']}  rps"
            f" {st['rps']}  requests {st['requests']}  failures {st['failures']}  {state}")


def progress_line(st: dict[str, Any]) -> str:
    fraction = fraction_done(st)
    return f"{bar(fraction)} {fraction * 100:3.0f}%  {progress_stats(st)}"


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:,.0f}" if isinstance(v, (int, float)) else str(v)


def report_text(doc: dict[str, Any]) -> str:
    """The report for a terminal: summary, verdict, regression, endpoints, shards."""
    t = doc["total"]
    v = doc["verdict"]
    lines = [
        f"load test {doc['test']}  run {doc['run_id']}  {v['status'].upper()}",
        f"target {doc['definition']['target']}  users {doc['definition']['users']}  shards"
        f" {doc['definition']['shards']}  window {doc['window_s']:g} s",
        f"requests {t['requests']:,}  failures {t['failures']:,}"
        f" ({t['error_rate'] * 100:.2f} %)  rps {t['rps']:,.1f}  p50 {_ms(t.get('p50_ms'))}"
        f"  p95 {_ms(t.get('p95_ms'))}  p99 {_ms(t.get('p99_ms'))} ms",
        "",
    ]
    for c in v["thresholds"]:
        op = ">=" if c["metric"] == "min_rps" else "<="
        actual = "-" if c["actual"] is None else f"{c['actual']:g}"
        lines.append(f"  {'pass' if c['passed'] else 'FAIL'}  {c['scope']} {c['metric']}"
                     f" {actual} {op} {c['limit']:g}")
    lines += [f"  - {r}" for r in v["reasons"]]
    reg = doc.get("regression") or {}
    if reg.get("compared"):
        changes = ", ".join(f"{m} {x['change'] * 100:+.1f} %" for m, x in reg["metrics"].items())
        flag = "REGRESSION" if reg["regressed"] else "no regression"
        lines.append(f"against run {reg['previous_run']}: {changes} ({flag}, tolerance"
                     f" {reg['tolerance'] * 100:g} %)")
    else:
        lines.append(f"against the previous run: {reg.get('note', 'not compared')}")
    lines.append("")
    header = ["ENDPOINT", "REQS", "FAILS", "RPS", "P50", "P95", "P99", "MAX"]
    rows = [[r["name"], f"{r['requests']:,}", f"{r['failures']:,}", f"{r['rps']:,.1f}",
             _ms(r.get("p50_ms")), _ms(r.get("p95_ms")), _ms(r.get("p99_ms")),
             _ms(r.get("max_ms"))] for r in [*doc["endpoints"], t]]
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    lines.append("")
    for s in doc["shards"]:
        lines.append(f"shard {s['index']}  {s.get('state')}  {s.get('node') or '-'}  requests"
                     f" {s.get('requests', 0):,}  {s.get('reason') or ''}".rstrip())
    return "\n".join(lines)
