"""Check results kept in Redis, and what they say over time.

Every check of a service leaves one sample for the service and one per instance in a sorted
set scored by time (the last 24 h, at most ``HISTORY_MAX`` samples, 25-hour TTL), the
service's latest result as one JSON document, and feeds the breakers (the service's and each
instance's) through the RECORD script: all of it in one pipelined round trip. Availability
(share of samples not ``down``) and latency percentiles (of the samples that answered) are
computed on read, over 5 minutes, 1 hour and 24 hours.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from functools import cache
from typing import Any, TypedDict, cast

import redis
from redis.commands.core import Script

from hms_tasks import conf, store
from hms_tasks.health import keys, lua, registry
from hms_tasks.health.breaker import Breaker, Transition, breaker_for, emit
from hms_tasks.health.checks import ErrorKind, ServiceResult, Status

__all__ = [
    "HISTORY_MAX",
    "WINDOWS",
    "InstanceDoc",
    "LatestDoc",
    "Sample",
    "Window",
    "latest",
    "record",
    "samples",
    "windows",
]

SAMPLE_VERSION = 1
HISTORY_SECONDS = 86_400
#: Samples kept per service or instance (a sweep every 30 s leaves 2,880 a day).
HISTORY_MAX = 6000
HISTORY_TTL = 25 * 3600
LATEST_TTL = 86_400
WINDOWS: tuple[tuple[str, int], ...] = (("5m", 300), ("1h", 3600), ("24h", 86_400))


class Sample(TypedDict):
    v: int
    #: Unix time (s) of the check.
    at: float
    status: Status
    latency_ms: float | None
    error: ErrorKind | None


class InstanceDoc(TypedDict):
    id: str
    status: Status
    latency_ms: float
    attempts: int
    error: ErrorKind | None
    http_status: int | None


class LatestDoc(TypedDict):
    v: int
    service: str
    at: float
    source: str
    status: Status
    latency_ms: float | None
    instances: list[InstanceDoc]


class Window(TypedDict):
    samples: int
    #: Share of samples that were up or degraded; None without samples.
    availability: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


@cache
def _record_script(url: str) -> Script:
    return store.client().register_script(lua.RECORD)


def _dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))


def record(results: Sequence[ServiceResult], *, source: str) -> list[Transition]:
    """Store samples and latest results, and feed every breaker; returns (and emits) the
    breaker state changes the results caused."""
    client = store.client()
    script = _record_script(conf.get().redis_url)
    now = time.time()
    now_ms = int(now * 1000)
    pipe = client.pipeline(transaction=False)

    def sample(target: str, status: Status, latency: float | None,
               error: ErrorKind | None) -> None:
        key = keys.history(target)
        doc: Sample = {"v": SAMPLE_VERSION, "at": now, "status": status, "latency_ms": latency,
                       "error": error}
        pipe.zadd(key, {_dumps(doc): now_ms})
        pipe.zremrangebyscore(key, "-inf", now_ms - HISTORY_SECONDS * 1000)
        pipe.zremrangebyrank(key, 0, -(HISTORY_MAX + 1))
        pipe.expire(key, HISTORY_TTL)

    fed: list[tuple[Breaker, int]] = []
    for r in results:
        svc = registry.get(r.service)
        sample(r.service, r.status, r.latency_ms, None)
        latest_doc: LatestDoc = {
            "v": SAMPLE_VERSION, "service": r.service, "at": now, "source": source,
            "status": r.status, "latency_ms": r.latency_ms,
            "instances": [{"id": i.instance, "status": i.status, "latency_ms": i.latency_ms,
                           "attempts": i.attempts, "error": i.error,
                           "http_status": i.http_status} for i in r.instances],
        }
        pipe.set(keys.latest(r.service), _dumps(latest_doc), ex=LATEST_TTL)
        for i in r.instances:
            sample(keys.name(r.service, i.instance), i.status,
                   None if i.status == "down" else i.latency_ms, i.error)
        weight = svc.breaker.sweep_failure_weight
        if weight == 0:
            continue  # this service's breakers hear from real calls only
        outcomes = [(breaker_for(r.service), r.status != "down")]
        outcomes += [(breaker_for(r.service, i.instance), i.status != "down")
                     for i in r.instances]
        for b, ok in outcomes:
            k, a = b.record_args(ok, epoch=None, source=source, weight=weight)
            fed.append((b, len(pipe)))
            script(keys=k, args=a, client=pipe)
    out = pipe.execute()
    transitions = [t for b, pos in fed if (t := b.transition(out[pos], source)) is not None]
    for t in transitions:
        emit(t)
    return transitions


def latest(service: str, *, client: redis.Redis | None = None) -> LatestDoc | None:
    """The service's last check result, or None if it was never checked (or long ago)."""
    doc = cast("str | None", (client or store.client()).get(keys.latest(service)))
    return cast(LatestDoc, json.loads(doc)) if doc else None


def samples(target: str, *, since: float) -> list[Sample]:
    """Samples of a service (``"ehr"``) or instance (``"ehr@host:port"``) since a Unix time."""
    raw = cast("list[str]", store.client().zrangebyscore(
        keys.history(target), int(since * 1000), "+inf"))
    return [cast(Sample, json.loads(m)) for m in raw]


def _percentile(ordered: list[float], p: float) -> float | None:
    if not ordered:
        return None
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]


def windows(found: Sequence[Sample], *, now: float | None = None) -> dict[str, Window]:
    """Availability and latency percentiles (nearest rank) over 5 min, 1 h and 24 h."""
    now = time.time() if now is None else now
    out: dict[str, Window] = {}
    for label, seconds in WINDOWS:
        sel = [s for s in found if s["at"] >= now - seconds]
        ok = sorted(s["latency_ms"] for s in sel
                    if s["status"] != "down" and s["latency_ms"] is not None)
        up = sum(s["status"] != "down" for s in sel)
        out[label] = {
            "samples": len(sel),
            "availability": round(up / len(sel), 5) if sel else None,
            "p50_ms": _percentile(ok, 50), "p95_ms": _percentile(ok, 95),
            "p99_ms": _percentile(ok, 99),
        }
    return out
