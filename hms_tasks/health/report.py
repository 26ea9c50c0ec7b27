"""What ``hms-tasks health`` shows: each service's last result, breakers, availability."""

from __future__ import annotations

import json
import time
from typing import Literal, TypedDict, cast

from hms_tasks import store
from hms_tasks.health import breaker, history, keys, registry
from hms_tasks.health.breaker import State
from hms_tasks.health.checks import ErrorKind, Status

__all__ = ["InstanceReport", "ServiceReport", "status"]


class InstanceReport(TypedDict):
    id: str
    status: Status | Literal["unknown"]
    latency_ms: float | None
    error: ErrorKind | None
    breaker: State


class ServiceReport(TypedDict):
    v: int
    service: str
    #: ``unknown`` when no check result is stored (never checked, or over a day ago).
    status: Status | Literal["unknown"]
    checked_at: float | None
    latency_ms: float | None
    breaker: State
    #: Seconds until an open breaker admits trial calls (by this machine's clock), or None.
    breaker_retry_in: float | None
    instances: list[InstanceReport]
    windows: dict[str, history.Window]


def status(services: list[str] | None = None) -> list[ServiceReport]:
    """Reports of the given registered services (all by default), in registry order."""
    specs = [registry.get(n) for n in services] if services is not None else list(
        registry.services().values())
    now = time.time()
    client = store.client()
    pipe = client.pipeline(transaction=False)
    for svc in specs:
        pipe.get(keys.latest(svc.name))
        pipe.zrangebyscore(keys.history(svc.name), int((now - 86_400) * 1000), "+inf")
    raw = pipe.execute()
    targets: list[tuple[str, str | None]] = []
    for svc in specs:
        targets.append((svc.name, None))
        targets += [(svc.name, i.id) for i in svc.instances]
    states = {(s["service"], s["instance"]): s for s in breaker.states(targets)}
    out: list[ServiceReport] = []
    for n, svc in enumerate(specs):
        doc = cast("history.LatestDoc | None", json.loads(raw[2 * n]) if raw[2 * n] else None)
        samples = [cast(history.Sample, json.loads(m)) for m in raw[2 * n + 1]]
        by_id = {i["id"]: i for i in doc["instances"]} if doc else {}
        b = states[(svc.name, None)]
        retry_in = None
        if b["state"] == "open" and b["opened_at"] is not None:
            retry_in = max(b["opened_at"] + svc.breaker.reset_timeout - now, 0.0)
        out.append({
            "v": 1, "service": svc.name,
            "status": doc["status"] if doc else "unknown",
            "checked_at": doc["at"] if doc else None,
            "latency_ms": doc["latency_ms"] if doc else None,
            "breaker": b["state"], "breaker_retry_in": retry_in,
            "instances": [{
                "id": i.id,
                "status": by_id[i.id]["status"] if i.id in by_id else "unknown",
                "latency_ms": by_id[i.id]["latency_ms"] if i.id in by_id else None,
                "error": by_id[i.id]["error"] if i.id in by_id else None,
                "breaker": states[(svc.name, i.id)]["state"],
            } for i in svc.instances],
            "windows": history.windows(samples, now=now),
        })
    return out
