"""The dead-letter list: task messages a worker refused, kept as reasons and never as bodies.

A message that does not decode, does not have the shape of a Celery protocol 2 task message,
names a task no worker knows, or uses a content type other than JSON would otherwise crash the
worker (Celery's strategy assumes the shape) or be logged with its body. The worker's guard
(:mod:`hms_tasks.worker_guard`) checks every message with :func:`problem` before Celery sees it,
and a refused message is acknowledged off its queue after :func:`record` wrote an entry here.

Layout (``<p>`` is ``HMS_TASKS_REDIS_PREFIX``)::

    <p>:deadletter          LIST    JSON DeadLetter entries, newest first, capped at MAX_ENTRIES
    <p>:deadletter:total    STRING  how many messages were ever dead-lettered (a counter)

An entry holds the reason, the queue, the message id (only when it is a plain identifier, as
Celery's uuids are), the task name (same rule) and the time. It never holds the body, headers
or arguments: they may quote patient data. The metrics collection reads :func:`total` and
:func:`recent` into the series ``celery.deadletter_total`` and ``celery.deadletter_recent``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Any, TypedDict, cast

from hms_tasks import store

__all__ = [
    "ENTRY_VERSION",
    "MAX_BODY_BYTES",
    "MAX_ENTRIES",
    "DeadLetter",
    "body_problem",
    "entries",
    "envelope_problem",
    "header_problem",
    "plain",
    "recent",
    "record",
    "total",
]

ENTRY_VERSION = 1
#: Entries kept (LTRIM): a flood of bad messages cannot grow Redis without bound.
MAX_ENTRIES = 1000
#: hms-tasks messages carry ids and counts (a few KiB at most); anything past this is refused
#: before it is parsed, so one message cannot make the worker build a huge object.
MAX_BODY_BYTES = 1024 * 1024
#: Content types the workers accept: JSON only (pickle from a reachable Redis is code execution).
CONTENT_TYPES = frozenset({"application/json"})
#: Keys of the third element of a protocol 2 body (Celery's canvas fields).
EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord", "group_id", "group_index"})

_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,199}")


class DeadLetter(TypedDict):
    v: int
    #: Unix time the worker refused the message.
    at: float
    #: Why, in words that never quote the message.
    reason: str
    queue: str | None
    #: The message id and task name, only when they are plain identifiers.
    id: str | None
    task: str | None


def plain(value: Any) -> str | None:
    """``value`` if it is a short plain identifier (letters, digits, ``_.:@-``), else None.

    Ids and task names come from whoever wrote the message; only values of this shape are
    stored or logged, so a field holding free text (a name, a note) is never copied.
    """
    return value if isinstance(value, str) and _PLAIN.fullmatch(value) else None


def _key(*parts: str) -> str:
    return store.key("deadletter", *parts)


def record(reason: str, *, queue: Any = None, message_id: Any = None,
           task: Any = None, now: float | None = None) -> DeadLetter:
    """Add an entry to the capped list and count it, in one MULTI/EXEC round trip."""
    entry: DeadLetter = {
        "v": ENTRY_VERSION,
        "at": time.time() if now is None else now,
        "reason": reason,
        "queue": plain(queue),
        "id": plain(message_id),
        "task": plain(task),
    }
    pipe = store.client().pipeline(transaction=True)
    pipe.lpush(_key(), json.dumps(entry, separators=(",", ":")))
    pipe.ltrim(_key(), 0, MAX_ENTRIES - 1)
    pipe.incr(_key("total"))
    pipe.execute()
    return entry


def entries(*, last: int = 100) -> list[DeadLetter]:
    """Up to ``last`` newest entries, newest first."""
    docs = cast("list[str]", store.client().lrange(_key(), 0, max(last, 1) - 1))
    return [cast(DeadLetter, json.loads(d)) for d in docs]


def total() -> int:
    """How many messages were dead-lettered since the counter was created."""
    return int(cast("str | None", store.client().get(_key("total"))) or 0)


def recent(*, window: float = 3600, now: float | None = None) -> int:
    """Entries newer than ``window`` seconds (the alert rule's series: above 0 fires)."""
    since = (time.time() if now is None else now) - window
    return sum(1 for e in entries(last=MAX_ENTRIES) if e["at"] >= since)


# -- Checks. Each returns None when the part is fine, or a reason that quotes no value.


def envelope_problem(payload: Any) -> str | None:
    """What is wrong with a kombu Redis envelope (the JSON document on the queue list)."""
    if not isinstance(payload, dict):
        return "envelope is not a JSON object"
    props = payload.get("properties")
    if not isinstance(props, dict):
        return "envelope has no properties object"
    if not isinstance(props.get("delivery_tag"), str):
        return "envelope has no delivery_tag string"
    info = props.get("delivery_info")
    if not isinstance(info, dict) or not all(
            isinstance(info.get(k), str) for k in ("exchange", "routing_key")):
        return "envelope has no delivery_info with exchange and routing_key"
    if not isinstance(payload.get("headers", {}), dict | None):
        return "envelope headers are not an object"
    body = payload.get("body")
    if body is not None and not isinstance(body, str):
        return "envelope body is not a string"
    if props.get("body_encoding") not in (None, "base64", "utf-8"):
        return "unsupported body_encoding"
    if isinstance(body, str) and len(body) > MAX_BODY_BYTES * 4 // 3 + 4:
        return f"body is larger than {MAX_BODY_BYTES} bytes"
    return None


def _iso(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def header_problem(headers: Any, *, content_type: Any, content_encoding: Any,
                   known_tasks: Collection[str]) -> str | None:
    """What is wrong with a protocol 2 task message's content type and headers."""
    if content_type not in CONTENT_TYPES:
        return "unsupported content type (JSON only)"
    if content_encoding not in ("utf-8", None):
        return "unsupported content encoding (utf-8 only)"
    if not isinstance(headers, Mapping):
        return "headers are not an object"
    if headers.get("compression") is not None:
        return "compressed messages are not accepted"
    task = headers.get("task")
    if not isinstance(task, str) or not task:
        return "header task is missing"
    if plain(headers.get("id")) is None:
        return "header id is missing or not a plain identifier"
    if task not in known_tasks:
        return "unknown task"
    if not (_iso(headers.get("eta")) and _iso(headers.get("expires"))):
        return "header eta or expires is not an ISO 8601 time"
    limits = headers.get("timelimit", (None, None))
    if not (isinstance(limits, list | tuple) and len(limits) == 2
            and all(_number_or_none(x) for x in limits)):
        return "header timelimit is not a pair of numbers"
    retries = headers.get("retries", 0)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        return "header retries is not a count"
    for name in ("root_id", "parent_id", "group", "shadow", "argsrepr", "kwargsrepr", "origin"):
        if not isinstance(headers.get(name), str | None):
            return f"header {name} is not a string"
    return None


def body_problem(body: Any) -> str | None:
    """What is wrong with a protocol 2 body: ``[args (list), kwargs (object), embed]``."""
    if not isinstance(body, list | tuple) or len(body) != 3:
        return "body is not a list of [args, kwargs, embed]"
    args, kwargs, embed = body
    if not isinstance(args, list | tuple):
        return "body args are not a list"
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        return "body kwargs are not an object"
    if embed is not None and not (
            isinstance(embed, dict) and set(embed) <= EMBED_KEYS
            and all(v is None or isinstance(v, list | dict) for v in embed.values())):
        return "body embed is not a canvas object"
    return None
