"""Response-time statistics of load tests, and their exact merge across shards.

A shard's runner reports, per wall-clock second and per request key (``"GET /api/patients/"``),
the requests and failures that completed, the sum, minimum and maximum of their response times
and their histogram in Locust's rounded buckets (``{bucket_ms: count}``; see :func:`bucket`).
Adding those up, across seconds and across shards, loses nothing: the merged histogram is the
one a single Locust process would have built from the same requests, so :func:`percentile` of
it (Locust's own algorithm) gives the percentiles that process would report. Averages of
percentiles are never taken.

Pure functions and small accumulators: no Redis, no Celery, no Locust (this module is imported
by workers, which must never import Locust).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PERCENTILES",
    "EndpointStats",
    "RunData",
    "bucket",
    "merge",
    "percentile",
    "percentile_key",
    "summarize",
]

#: The percentiles of every report (Locust's PERCENTILES_TO_REPORT, without 99.99 %).
PERCENTILES = (0.5, 0.66, 0.75, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999, 1.0)
#: Error rows a report keeps (the most frequent).
MAX_ERROR_ROWS = 50


def bucket(response_time: float) -> int:
    """Locust's rounding of a response time (ms) to its histogram bucket: whole milliseconds
    below 100, then two significant digits (147 -> 150, 3432 -> 3400, 58760 -> 59000)."""
    if response_time < 100:
        return round(response_time)
    if response_time < 1000:
        return int(round(response_time, -1))
    if response_time < 10000:
        return int(round(response_time, -2))
    return int(round(response_time, -3))


def percentile(hist: Mapping[int, int], count: int, percent: float) -> int:
    """The response time ``percent`` (0 to 1) of ``count`` requests finished within: Locust's
    ``calculate_response_time_percentile`` over a bucket histogram."""
    wanted = int(count * percent)
    processed = 0
    for rt in sorted(hist, reverse=True):
        processed += hist[rt]
        if count - processed <= wanted:
            return rt
    return 0


def percentile_key(p: float) -> str:
    """``0.95`` -> ``"p95_ms"``, ``0.999`` -> ``"p99.9_ms"``."""
    text = f"{p * 100:.4f}".rstrip("0").rstrip(".")
    return f"p{text}_ms"


@dataclass
class EndpointStats:
    """Counters of one request key (or of all of them)."""

    requests: int = 0
    failures: int = 0
    #: Requests without a response time (Locust's num_none_requests).
    no_time: int = 0
    sum_ms: float = 0.0
    min_ms: float | None = None
    max_ms: float = 0.0
    hist: dict[int, int] = field(default_factory=dict)

    def add_row(self, row: list[Any]) -> None:
        """Add a runner's row ``[n, f, sum_ms, min_ms, max_ms, none, {bucket: count}]``."""
        n, f, total, low, high, none, hist = row
        self.requests += int(n)
        self.failures += int(f)
        self.no_time += int(none)
        self.sum_ms += float(total)
        if low is not None:
            self.min_ms = float(low) if self.min_ms is None else min(self.min_ms, float(low))
        self.max_ms = max(self.max_ms, float(high))
        mine = self.hist
        for b, c in hist.items():
            k = int(b)
            mine[k] = mine.get(k, 0) + int(c)

    def add(self, other: EndpointStats) -> None:
        self.add_row(other.row())

    def row(self) -> list[Any]:
        return [self.requests, self.failures, self.sum_ms, self.min_ms, self.max_ms,
                self.no_time, self.hist]

    @property
    def timed(self) -> int:
        return self.requests - self.no_time

    def percentile(self, p: float) -> int | None:
        return percentile(self.hist, self.timed, p) if self.timed else None


@dataclass
class RunData:
    """Everything one shard (or the merge of several) measured."""

    endpoints: dict[str, EndpointStats] = field(default_factory=dict)
    #: Per second: [requests, failures, users, {bucket: count}] over every key.
    seconds: dict[int, list[Any]] = field(default_factory=dict)
    #: ``"<key>\\t<error>"`` -> occurrences.
    errors: dict[str, int] = field(default_factory=dict)
    #: Connections refused because they did not go to the target.
    blocked: int = 0
    started_at: float | None = None
    stopped_at: float | None = None

    def add_tick(self, tick: Mapping[str, Any]) -> None:
        """Fold one runner tick (one second of deltas) in."""
        t = int(tick["t"])
        sec = self.seconds.get(t)
        if sec is None:
            sec = self.seconds[t] = [0, 0, 0, {}]
        sec[2] = max(sec[2], int(tick.get("u", 0)))
        shist = sec[3]
        for key, row in tick.get("e", {}).items():
            ep = self.endpoints.get(key)
            if ep is None:
                ep = self.endpoints[key] = EndpointStats()
            ep.add_row(row)
            sec[0] += int(row[0])
            sec[1] += int(row[1])
            for b, c in row[6].items():
                k = int(b)
                shist[k] = shist.get(k, 0) + int(c)
        for err, count in tick.get("x", {}).items():
            self.errors[err] = self.errors.get(err, 0) + int(count)
        self.blocked = max(self.blocked, int(tick.get("b", 0)))

    def to_json(self) -> dict[str, Any]:
        return {
            "endpoints": {k: e.row() for k, e in self.endpoints.items()},
            "seconds": [[t, *s] for t, s in sorted(self.seconds.items())],
            "errors": self.errors, "blocked": self.blocked,
            "started_at": self.started_at, "stopped_at": self.stopped_at,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RunData:
        data = cls(errors={k: int(v) for k, v in doc.get("errors", {}).items()},
                   blocked=int(doc.get("blocked", 0)), started_at=doc.get("started_at"),
                   stopped_at=doc.get("stopped_at"))
        for key, row in doc.get("endpoints", {}).items():
            ep = data.endpoints[key] = EndpointStats()
            ep.add_row(row)
        for t, n, f, u, hist in doc.get("seconds", []):
            data.seconds[int(t)] = [int(n), int(f), int(u), {int(b): int(c)
                                                             for b, c in hist.items()}]
        return data


def merge(parts: Iterable[RunData]) -> RunData:
    """The sum of shards' data: counters and histograms added, users added per second, the
    load window from the earliest start to the latest stop."""
    out = RunData()
    for part in parts:
        for key, ep in part.endpoints.items():
            mine = out.endpoints.get(key)
            if mine is None:
                mine = out.endpoints[key] = EndpointStats()
            mine.add(ep)
        for t, (n, f, u, hist) in part.seconds.items():
            sec = out.seconds.get(t)
            if sec is None:
                out.seconds[t] = [n, f, u, dict(hist)]
                continue
            sec[0] += n
            sec[1] += f
            sec[2] += u
            shist = sec[3]
            for b, c in hist.items():
                shist[b] = shist.get(b, 0) + c
        for err, count in part.errors.items():
            out.errors[err] = out.errors.get(err, 0) + count
        out.blocked += part.blocked
        if part.started_at is not None:
            out.started_at = part.started_at if out.started_at is None else min(
                out.started_at, part.started_at)
        if part.stopped_at is not None:
            out.stopped_at = part.stopped_at if out.stopped_at is None else max(
                out.stopped_at, part.stopped_at)
    return out


def _row(name: str, ep: EndpointStats, window: float) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": name, "requests": ep.requests, "failures": ep.failures,
        "error_rate": round(ep.failures / ep.requests, 6) if ep.requests else 0.0,
        "rps": round(ep.requests / window, 3) if window > 0 else 0.0,
        "min_ms": None if ep.min_ms is None else round(ep.min_ms, 3),
        "avg_ms": round(ep.sum_ms / ep.timed, 3) if ep.timed else None,
        "max_ms": round(ep.max_ms, 3) if ep.timed else None,
    }
    for p in PERCENTILES:
        row[percentile_key(p)] = ep.percentile(p)
    return row


def summarize(data: RunData) -> dict[str, Any]:
    """The report's numbers: totals, the per-endpoint table, the per-second timeline (RPS,
    failures, users, p50/p95/p99) and the most frequent errors."""
    if data.started_at is not None and data.stopped_at is not None:
        window = max(0.0, data.stopped_at - data.started_at)
    else:
        window = float(len(data.seconds))
    total = EndpointStats()
    for ep in data.endpoints.values():
        total.add(ep)
    timeline = []
    for t in sorted(data.seconds):
        n, f, u, hist = data.seconds[t]
        timed = sum(hist.values())
        timeline.append({
            "t": t, "rps": n, "failures": f, "users": u,
            "p50_ms": percentile(hist, timed, 0.5) if timed else None,
            "p95_ms": percentile(hist, timed, 0.95) if timed else None,
            "p99_ms": percentile(hist, timed, 0.99) if timed else None,
        })
    errors = sorted(data.errors.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_ERROR_ROWS]
    return {
        "window_s": round(window, 3),
        "total": _row("Aggregated", total, window),
        "endpoints": [_row(k, data.endpoints[k], window) for k in sorted(data.endpoints)],
        "timeline": timeline,
        "errors": [{"endpoint": e.split("\t", 1)[0], "error": e.split("\t", 1)[-1],
                    "count": c} for e, c in errors],
        "blocked_connections": data.blocked,
    }
