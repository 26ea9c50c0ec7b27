"""Alert rules over the metrics store: state per rule and series, hysteresis, notifications.

A rule (``HMS_TASKS_ALERT_RULES``) watches every series of one name (optionally only those with
given labels), so ``cpu_high`` gives one alert per node. Each alert moves through::

    (inactive) --breach--> pending --breach lasted `for`--> firing --clear lasted `clear_for`-->
    resolved --breach--> pending ...

*Breach* is ``value > threshold`` (or ``<`` for ``op: "<"``); *clear* is ``value <= clear``
(``>=``), where ``clear`` lies on the safe side of the threshold. Between the two (the
hysteresis band) a firing alert keeps firing and a pending one falls back to inactive. A
pending alert whose value stops breaching drops back to inactive silently, and a firing alert
needs ``clear_for`` seconds of uninterrupted clear values to resolve, so a flapping value
neither fires nor re-fires each sample. A series with no current point (older than
``HMS_TASKS_METRICS_STALE_SECONDS``) changes nothing.

Notifications go out on *firing* and *resolved* only: to the log, and to every webhook of
``HMS_TASKS_ALERT_WEBHOOKS`` through the ``hms.metrics.deliver_webhook`` task (retried with
backoff). A notification carries the rule, the series name and labels (node, queue), the
value, threshold and times: never anything about patients.

Layout (``<p>`` is ``HMS_TASKS_REDIS_PREFIX``)::

    <p>:alerts:state    HASH  "<rule>|<series>" -> JSON AlertState (resolved ones kept a day)
    <p>:alerts:events   LIST  JSON Transition, newest first, capped at 1,000
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, cast

import aiohttp

from hms_tasks import netguard, store
from hms_tasks.allowlist import allowed
from hms_tasks.errors import ConfigurationError, HmsTasksError, TransientError
from hms_tasks.metrics import settings
from hms_tasks.metrics import store as ts

__all__ = [
    "AlertState",
    "Rule",
    "Transition",
    "WebhookRefused",
    "deliver",
    "evaluate",
    "evaluate_and_store",
    "events",
    "rules",
    "states",
]

logger = logging.getLogger(__name__)

STATE_VERSION = 1
#: Resolved alerts stay listed this long.
RESOLVED_KEEP = 86400
EVENTS_KEPT = 1000

State = Literal["pending", "firing", "resolved"]


@dataclass(frozen=True)
class Rule:
    name: str
    series: str
    op: Literal[">", "<"]
    threshold: float
    clear: float
    for_s: int
    clear_for_s: int
    labels: tuple[tuple[str, str], ...]
    severity: str

    def breach(self, v: float) -> bool:
        return v > self.threshold if self.op == ">" else v < self.threshold

    def cleared(self, v: float) -> bool:
        return v <= self.clear if self.op == ">" else v >= self.clear


class AlertState(TypedDict):
    v: int
    id: str
    rule: str
    series: str
    state: State
    #: When the alert entered its current state.
    since: float
    value: float | None
    pending_since: float | None
    firing_since: float | None
    resolved_at: float | None
    #: While firing: since when the value has been clear (None while it is not).
    clearing_since: float | None
    updated_at: float


class Transition(TypedDict):
    v: int
    id: str
    rule: str
    series: str
    name: str
    labels: dict[str, str]
    severity: str
    #: "inactive" for a new or a dropped pending alert.
    old: str
    new: str
    value: float | None
    threshold: float
    op: str
    at: float
    since: float | None


class WebhookRefused(HmsTasksError, ValueError):
    """A webhook request that will not be made (not allowlisted, a redirect, a 4xx answer).
    Permanent: never retried."""


def rules() -> list[Rule]:
    """The validated rules of ``HMS_TASKS_ALERT_RULES`` (defaults merged in)."""
    return [
        Rule(name=name, series=r.series, op=r.op, threshold=r.threshold,
             clear=r.threshold if r.clear is None else r.clear, for_s=r.for_s,
             clear_for_s=r.for_s if r.clear_for is None else r.clear_for,
             labels=tuple(sorted((r.labels or {}).items())), severity=r.severity)
        for name, r in sorted(settings.get().alert_rules.items())
    ]


def evaluate(rule_list: list[Rule], values: Mapping[str, ts.RawPoint],
             current: Mapping[str, AlertState], *, now: float,
             stale: float) -> tuple[dict[str, AlertState | None], list[Transition]]:
    """Pure evaluation: the changed states (None = delete) and the transitions.

    ``values`` are the newest point of each series; ``current`` the stored states by id.
    """
    by_name: dict[str, list[str]] = {}
    for sid in values:
        by_name.setdefault(ts.parse_series(sid)[0], []).append(sid)
    changed: dict[str, AlertState | None] = {}
    transitions: list[Transition] = []
    seen: set[str] = set()
    for rule in rule_list:
        wanted = set(rule.labels)
        for sid in by_name.get(rule.series, ()):
            if wanted and not wanted <= set(ts.parse_series(sid)[1]):
                continue
            aid = f"{rule.name}|{sid}"
            seen.add(aid)
            point = values[sid]
            value = point.value if now - point.ts <= stale else None
            new, old_name, new_name = _step(rule, aid, sid, current.get(aid), value, now)
            if new is not current.get(aid):
                changed[aid] = new
            if new_name != old_name:
                transitions.append(_transition(rule, aid, sid, old_name, new_name, value, now,
                                               new))
    for aid, st in current.items():
        # Resolved alerts age out; alerts whose rule or series is gone are dropped.
        if aid not in seen or (st["state"] == "resolved" and now - st["since"] > RESOLVED_KEEP):
            changed[aid] = None
    return changed, transitions


def _name(st: AlertState | None) -> str:
    return "inactive" if st is None else st["state"]


def _step(rule: Rule, aid: str, sid: str, st: AlertState | None, value: float | None,
          now: float) -> tuple[AlertState | None, str, str]:
    old = _name(st)
    if value is None:
        return st, old, old
    breach = rule.breach(value)
    if st is None or st["state"] == "resolved":
        if not breach:
            return st, old, old
        if rule.for_s == 0:
            return _new(aid, rule, sid, "firing", value, now, pending_since=now,
                        firing_since=now), old, "firing"
        return _new(aid, rule, sid, "pending", value, now, pending_since=now), old, "pending"
    if st["state"] == "pending":
        if not breach:
            return None, old, "inactive"
        pending_since = st["pending_since"] or st["since"]
        if now - pending_since >= rule.for_s:
            return _new(aid, rule, sid, "firing", value, now, pending_since=pending_since,
                        firing_since=now), old, "firing"
        return {**st, "value": value, "updated_at": now}, old, old
    # firing
    if rule.cleared(value):
        clearing_since = st["clearing_since"] if st["clearing_since"] is not None else now
        if now - clearing_since >= rule.clear_for_s:
            return {**st, "state": "resolved", "since": now, "value": value,
                    "resolved_at": now, "clearing_since": None, "updated_at": now}, old, \
                "resolved"
        return {**st, "value": value, "clearing_since": clearing_since,
                "updated_at": now}, old, old
    return {**st, "value": value, "clearing_since": None, "updated_at": now}, old, old


def _new(aid: str, rule: Rule, sid: str, state: State, value: float, now: float, *,
         pending_since: float | None = None, firing_since: float | None = None) -> AlertState:
    return {"v": STATE_VERSION, "id": aid, "rule": rule.name, "series": sid, "state": state,
            "since": now, "value": value, "pending_since": pending_since,
            "firing_since": firing_since, "resolved_at": None, "clearing_since": None,
            "updated_at": now}


def _transition(rule: Rule, aid: str, sid: str, old: str, new: str, value: float | None,
                now: float, st: AlertState | None) -> Transition:
    name, labels = ts.parse_series(sid)
    return {"v": STATE_VERSION, "id": aid, "rule": rule.name, "series": sid, "name": name,
            "labels": dict(labels), "severity": rule.severity, "old": old, "new": new,
            "value": value, "threshold": rule.threshold, "op": rule.op, "at": now,
            "since": None if st is None else st["since"]}


# -- storage -----------------------------------------------------------------------------------


def _state_key() -> str:
    return store.key("alerts", "state")


def _events_key() -> str:
    return store.key("alerts", "events")


def states() -> dict[str, AlertState]:
    """Every stored alert (pending, firing, recently resolved) by id."""
    raw = cast("dict[str, str]", store.client().hgetall(_state_key()))
    return {aid: cast(AlertState, json.loads(doc)) for aid, doc in raw.items()}


def events(*, last: int = 50) -> list[Transition]:
    """The most recent transitions, newest first."""
    docs = cast("list[str]", store.client().lrange(_events_key(), 0, max(last, 1) - 1))
    return [cast(Transition, json.loads(d)) for d in docs]


def evaluate_and_store(*, now: float | None = None) -> tuple[dict[str, int], list[Transition]]:
    """Evaluate every rule against the store's newest points, persist the changed states and
    the transitions (one MULTI), log them. Returns (counts, transitions to notify)."""
    now = time.time() if now is None else now
    s = settings.get()
    rule_list = rules()
    values = ts.latest()
    current = states()
    changed, transitions = evaluate(rule_list, values, current, now=now,
                                    stale=s.metrics_stale_seconds)
    if changed or transitions:
        pipe = store.client().pipeline(transaction=True)
        gone = [aid for aid, st in changed.items() if st is None]
        kept = {aid: json.dumps(st, separators=(",", ":")) for aid, st in changed.items()
                if st is not None}
        if gone:
            pipe.hdel(_state_key(), *gone)
        if kept:
            pipe.hset(_state_key(), mapping=cast(Any, kept))
        for t in transitions:
            pipe.lpush(_events_key(), json.dumps(t, separators=(",", ":")))
        if transitions:
            pipe.ltrim(_events_key(), 0, EVENTS_KEPT - 1)
        pipe.execute()
    for t in transitions:
        level = logging.WARNING if t["new"] == "firing" else logging.INFO
        logger.log(level, "alert %s %s -> %s: %s value=%s threshold %s %s", t["rule"],
                   t["old"], t["new"], t["series"], t["value"], t["op"], t["threshold"])
    merged = {**current, **{k: v for k, v in changed.items() if v is not None}}
    for k, v in changed.items():
        if v is None:
            merged.pop(k, None)
    counts = {
        "rules": len(rule_list), "series": len(values),
        "pending": sum(1 for st in merged.values() if st["state"] == "pending"),
        "firing": sum(1 for st in merged.values() if st["state"] == "firing"),
        "transitions": len(transitions),
    }
    notify = [t for t in transitions if t["new"] in ("firing", "resolved")]
    return counts, notify


# -- webhooks ----------------------------------------------------------------------------------


def webhook_url(name: str) -> str:
    """The URL of configured webhook ``name``; ConfigurationError if there is none."""
    hooks = settings.get().alert_webhooks
    if name not in hooks:
        raise ConfigurationError(
            f"HMS_TASKS_ALERT_WEBHOOKS has no webhook {name!r}; configured: {sorted(hooks)}"
        )
    return hooks[name]


def deliver(url: str, payload: Mapping[str, Any], *, timeout: float | None = None) -> int:
    """POST ``payload`` as JSON to ``url`` if HMS_TASKS_WEBHOOK_ALLOWLIST allows it.

    The request goes to the URL's canonical form (:func:`hms_tasks.allowlist.parse_url`: what
    the allowlist checked), through aiohttp with :class:`hms_tasks.netguard.PinnedResolver`
    (a host name is resolved once and the connection goes to exactly the checked address),
    no proxies from the environment and no redirects followed.

    Returns the HTTP status (2xx). Raises :class:`WebhookRefused` before any network traffic
    for a URL the allowlist does not allow or a host that resolves only to addresses never
    contacted, and for redirects and 4xx answers (permanent); :class:`TransientError` for
    connection errors, timeouts, 408, 429 and 5xx (worth a retry).
    """
    s = settings.get()
    target = allowed(url, s.webhook_allowlist)
    if target is None:
        raise WebhookRefused("the webhook URL is not allowed by HMS_TASKS_WEBHOOK_ALLOWLIST")
    body = json.dumps(payload, separators=(",", ":"), default=str).encode()
    return asyncio.run(_post(target.url, body, timeout or s.webhook_timeout))


async def _post(url: str, body: bytes, timeout: float) -> int:
    connector = aiohttp.TCPConnector(resolver=netguard.PinnedResolver(), force_close=True)
    try:
        async with aiohttp.ClientSession(
            connector=connector, trust_env=False, timeout=aiohttp.ClientTimeout(total=timeout),
            headers={"User-Agent": "hms-tasks-alerts/1"},
        ) as session, session.post(url, data=body, allow_redirects=False,
                                   headers={"Content-Type": "application/json"}) as resp:
            code = resp.status
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, netguard.ForbiddenAddress):
            raise WebhookRefused("the webhook's host resolves only to addresses a host name may"
                                 " not lead to (see hms_tasks.netguard)") from None
        raise TransientError(f"webhook unreachable ({type(exc).__name__})") from None
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise TransientError(f"webhook unreachable ({type(exc).__name__})") from None
    if 300 <= code < 400:
        raise WebhookRefused(f"the webhook answered with a redirect ({code}); redirects are"
                             " never followed")
    if code in (408, 425, 429) or code >= 500:
        raise TransientError(f"webhook answered HTTP {code}")
    if code >= 400:
        raise WebhookRefused(f"webhook answered HTTP {code}")
    return code
