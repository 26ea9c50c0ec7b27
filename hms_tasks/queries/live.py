"""Live sampling: the N+1 patterns production requests run, counted in Redis.

The middleware (:mod:`.middleware`) gives a sampled request a :class:`RequestSample`, an
``execute_wrapper`` that counts statements by (fingerprint, call site). When the request ends,
every pair counted ``HMS_TASKS_QUERIES_N_PLUS_ONE_MIN`` times or more is an N+1 pattern; the
process's :class:`Sampler` adds it to a small in-memory batch, sent to Redis in one Lua call
at most every :data:`FLUSH_S` seconds (from the end of a sampled request: no thread).

What is kept: fingerprints (statement shapes, no literals), call sites (``path:line``),
counts and times. Never parameters, literals, rows, URLs or anything else of the request.

Memory per process is bounded: a request counts at most :data:`MAX_PAIRS` pairs, the batch
holds at most :data:`MAX_BATCH` patterns, the fingerprint and call-site caches are LRUs. A
Redis outage drops the batch (logged once a minute), never the request: the client gives up
after :data:`REDIS_TIMEOUT_S` seconds without retries.

Redis layout (``<p>`` is ``HMS_TASKS_REDIS_PREFIX``; a member is ``<fingerprint id>|<site>``),
every key expiring :data:`TTL` seconds after the last write::

    <p>:queries:live:patterns   ZSET  member -> sampled requests that ran the pattern
    <p>:queries:live:seen       HASH  member -> last time seen (epoch seconds)
    <p>:queries:live:max        HASH  member -> most repeats in one request
    <p>:queries:live:sql        HASH  member -> the fingerprint
    <p>:queries:live:requests   STRING sampled requests

At most ``HMS_TASKS_QUERIES_LIVE_MAX_PATTERNS`` members are kept; beyond that the least seen
are dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypedDict, cast

import redis
from redis.commands.core import Script

from hms_tasks import store
from hms_tasks.queries import settings
from hms_tasks.queries.fingerprint import call_site, fingerprint, fingerprint_id

__all__ = ["LivePattern", "RequestSample", "Sampler", "report", "sampler"]

logger = logging.getLogger(__name__)

FLUSH_S = 5.0
MAX_PAIRS = 2000
MAX_BATCH = 500
REDIS_TIMEOUT_S = 0.25
TTL = 7 * 86400
_WARN_EVERY_S = 60.0

_FLUSH = r"""
-- KEYS: patterns, seen, max, sql, requests. ARGV: now, ttl, cap, requests, then triples of
-- (member, most repeats in one request, requests that ran it) and a fingerprint each.
redis.call('INCRBY', KEYS[5], ARGV[4])
local i = 5
while i <= #ARGV do
  local member, most, hits, sql = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3]
  redis.call('ZINCRBY', KEYS[1], hits, member)
  redis.call('HSET', KEYS[2], member, ARGV[1])
  local old = tonumber(redis.call('HGET', KEYS[3], member) or '0')
  if most > old then redis.call('HSET', KEYS[3], member, most) end
  redis.call('HSET', KEYS[4], member, sql)
  i = i + 4
end
local extra = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[3])
if extra > 0 then
  local gone = redis.call('ZPOPMIN', KEYS[1], extra)
  for j = 1, #gone, 2 do
    redis.call('HDEL', KEYS[2], gone[j])
    redis.call('HDEL', KEYS[3], gone[j])
    redis.call('HDEL', KEYS[4], gone[j])
  end
end
for k = 1, 5 do redis.call('EXPIRE', KEYS[k], ARGV[2]) end
return redis.call('ZCARD', KEYS[1])
"""


class LivePattern(TypedDict):
    fingerprint: str
    site: str
    #: Sampled requests that ran the pattern.
    count: int
    #: Most repeats of the statement in one request.
    max_per_request: int
    last_seen: float


class RequestSample:
    """The ``execute_wrapper`` of one sampled request: statements per (fingerprint, site)."""

    def __init__(self) -> None:
        self.pairs: dict[tuple[str, str], int] = {}

    def __call__(self, execute: Callable[..., Any], sql: str, params: Any, many: bool,
                 context: dict[str, Any]) -> Any:
        try:
            pair = (fingerprint(sql), call_site())
            if pair in self.pairs:
                self.pairs[pair] += 1
            elif len(self.pairs) < MAX_PAIRS:
                self.pairs[pair] = 1
        except Exception:  # counting must never fail a statement
            logger.debug("could not fingerprint a statement", exc_info=True)
        return execute(sql, params, many, context)

    def patterns(self, threshold: int) -> list[tuple[str, str, int]]:
        """``(fingerprint, site, repeats)`` of every pair repeated ``threshold`` times."""
        return [(fp, site, n) for (fp, site), n in self.pairs.items() if n >= threshold]


class Sampler:
    """The process's batch of live patterns, sent to Redis every :data:`FLUSH_S` seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batch: dict[str, list[Any]] = {}  # member -> [fingerprint, site, most, hits]
        self._requests = 0
        self._last_flush = time.monotonic()
        self._last_warning = 0.0
        self.dropped = 0

    def add(self, sample: RequestSample) -> None:
        """Count one sampled request's patterns; flush when the interval has passed. Never
        raises."""
        try:
            found = sample.patterns(settings.get().queries_n_plus_one_min)
            with self._lock:
                self._requests += 1
                for fp, site, n in found:
                    member = f"{fingerprint_id(fp)}|{site}"
                    entry = self._batch.get(member)
                    if entry is None:
                        if len(self._batch) >= MAX_BATCH:
                            continue
                        entry = self._batch[member] = [fp, site, 0, 0]
                    entry[2] = max(entry[2], n)
                    entry[3] += 1
                due = time.monotonic() - self._last_flush >= FLUSH_S
            if due:
                self.flush()
        except Exception:
            logger.debug("could not count a sampled request", exc_info=True)

    def flush(self, *, now: float | None = None) -> bool:
        """Send the batch to Redis in one call; on a Redis error drop it. True if sent."""
        with self._lock:
            batch, requests = self._batch, self._requests
            self._batch, self._requests = {}, 0
            self._last_flush = time.monotonic()
        if not batch and not requests:
            return True
        now = time.time() if now is None else now
        s = settings.get()
        args: list[Any] = [repr(now), TTL, s.queries_live_max_patterns, requests]
        for member, (fp, _site, most, hits) in batch.items():
            args += [member, most, hits, fp]
        try:
            client = store.client(socket_timeout=REDIS_TIMEOUT_S)
            Script(client, _FLUSH)(keys=_keys(), args=args)
        except (redis.RedisError, OSError):
            self.dropped += 1
            if time.monotonic() - self._last_warning >= _WARN_EVERY_S:
                self._last_warning = time.monotonic()
                logger.warning("live query sample dropped: Redis unreachable")
            return False
        return True


def _keys() -> list[str]:
    return [store.key("queries", "live", part)
            for part in ("patterns", "seen", "max", "sql", "requests")]


_sampler: Sampler | None = None
_sampler_lock = threading.Lock()


def sampler() -> Sampler:
    """This process's :class:`Sampler`."""
    global _sampler
    with _sampler_lock:
        if _sampler is None:
            _sampler = Sampler()
        return _sampler


def report(*, limit: int = 50) -> dict[str, Any]:
    """What live sampling has seen: sampled requests and the most frequent N+1 patterns."""
    patterns_key, seen_key, max_key, sql_key, requests_key = _keys()
    client = store.client()
    top = cast(list[tuple[str, float]],
               client.zrevrange(patterns_key, 0, max(0, limit - 1), withscores=True))
    members = [m for m, _ in top]
    seen = client.hmget(seen_key, members) if members else []
    most = client.hmget(max_key, members) if members else []
    sql = client.hmget(sql_key, members) if members else []
    out: list[LivePattern] = []
    for (member, count), s_, m_, q_ in zip(top, seen, most, sql, strict=True):
        out.append(LivePattern(fingerprint=str(q_ or ""), site=member.partition("|")[2],
                               count=int(count), max_per_request=int(m_ or 0),
                               last_seen=float(s_ or 0)))
    return {"requests": int(client.get(requests_key) or 0),
            "patterns_total": int(client.zcard(patterns_key)), "patterns": out}
