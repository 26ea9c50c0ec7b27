"""Request timings of the HMS's own API, recorded cheaply and turned into series each minute.

Each web process keeps a small in-memory histogram per minute (fixed millisecond buckets, plus
count, 5xx count and total time) and flushes it to Redis at most every
:data:`FLUSH_SECONDS` with one pipelined round trip (``HINCRBY`` per non-empty bucket), so the
many processes of an API add up without coordination. :func:`convert` (run by
``hms.metrics.rollup``) turns every completed minute into points of ``api.requests``,
``api.errors``, ``api.error_rate`` (percent of 5xx), ``api.duration_mean_ms`` and
``api.duration_p95_ms`` (interpolated within its bucket), the inputs of the p95 and error-rate
alert rules.

Layout: ``<p>:ts:api:<minute>`` HASH (``b<i>`` bucket counts, ``n``, ``e``, ``sum``; 2-hour TTL)
and ``<p>:ts:api:done`` STRING, the last minute converted.

A Redis outage never fails a request: the buffer is dropped (and counted) instead.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from typing import cast

from hms_tasks import store

__all__ = ["BUCKETS_MS", "FLUSH_SECONDS", "Recorder", "convert", "percentile", "recorder"]

logger = logging.getLogger(__name__)

#: Upper bounds (ms) of the histogram buckets; one more bucket takes everything slower.
BUCKETS_MS: tuple[float, ...] = (
    5, 10, 25, 50, 75, 100, 150, 200, 300, 400, 500, 750, 1000, 1500, 2000, 2500, 3000, 4000,
    5000, 7500, 10000, 20000, 60000,
)
FLUSH_SECONDS = 5.0
#: Minutes are converted this long after they end (every process flushed by then).
SETTLE_SECONDS = 10.0
_KEY_TTL = 7200
#: Minutes a conversion looks back when it has never run.
_FIRST_LOOKBACK = 60


def _key(minute: int) -> str:
    return store.key("ts", "api", str(minute))


class Recorder:
    """The per-process buffer of request timings. Thread-safe; flushes inline, rarely."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._minutes: dict[int, list[float]] = {}
        self._last_flush = time.monotonic()
        self.dropped = 0

    def record(self, duration_ms: float, status: int, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        minute = int(now // 60)
        slot = bisect.bisect_left(BUCKETS_MS, duration_ms)
        with self._lock:
            row = self._minutes.get(minute)
            if row is None:
                # buckets..., n, errors, sum_ms
                row = self._minutes[minute] = [0.0] * (len(BUCKETS_MS) + 4)
            row[slot] += 1
            row[-3] += 1
            if status >= 500:
                row[-2] += 1
            row[-1] += duration_ms
            due = time.monotonic() - self._last_flush >= FLUSH_SECONDS or len(self._minutes) > 1
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            minutes, self._minutes = self._minutes, {}
            self._last_flush = time.monotonic()
        if not minutes:
            return
        try:
            pipe = store.client().pipeline(transaction=False)
            for minute, row in minutes.items():
                key = _key(minute)
                for i, n in enumerate(row[: len(BUCKETS_MS) + 1]):
                    if n:
                        pipe.hincrby(key, f"b{i}", int(n))
                pipe.hincrby(key, "n", int(row[-3]))
                if row[-2]:
                    pipe.hincrby(key, "e", int(row[-2]))
                pipe.hincrbyfloat(key, "sum", round(row[-1], 3))
                pipe.expire(key, _KEY_TTL)
            pipe.execute()
        except Exception:
            # Timings are telemetry: a Redis outage must never fail the HMS's request.
            self.dropped += int(sum(row[-3] for row in minutes.values()))
            logger.warning("dropped %d request timings (Redis unavailable)", self.dropped,
                           exc_info=False)


_recorder: Recorder | None = None
_recorder_lock = threading.Lock()


def recorder() -> Recorder:
    """This process's recorder."""
    global _recorder
    if _recorder is None:
        with _recorder_lock:
            if _recorder is None:
                _recorder = Recorder()
    return _recorder


def percentile(counts: list[int], q: float) -> float | None:
    """The ``q`` quantile (0-1) of a histogram over :data:`BUCKETS_MS`, interpolated linearly
    within its bucket; None for an empty histogram."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0.0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            low = BUCKETS_MS[i - 1] if i > 0 else 0.0
            high = BUCKETS_MS[i] if i < len(BUCKETS_MS) else BUCKETS_MS[-1] * 2
            return low + (high - low) * (rank - seen) / n
        seen += n
    return BUCKETS_MS[-1] * 2


def convert(*, now: float | None = None) -> list[tuple[str, float, float]]:
    """Points for every minute that ended since the last conversion (and settled), marking
    them converted. The caller writes them to the store."""
    now = time.time() if now is None else now
    client = store.client()
    done_key = store.key("ts", "api", "done")
    upto = int((now - SETTLE_SECONDS) // 60) - 1  # the last minute that has settled
    done = client.get(done_key)
    start = int(cast(str, done)) + 1 if done else upto - _FIRST_LOOKBACK + 1
    start = max(start, upto - _FIRST_LOOKBACK + 1)
    if start > upto:
        return []
    minutes = list(range(start, upto + 1))
    pipe = client.pipeline(transaction=False)
    for m in minutes:
        pipe.hgetall(_key(m))
    points: list[tuple[str, float, float]] = []
    for m, row in zip(minutes, pipe.execute(), strict=True):
        n = int(row.get("n", 0))
        if not n:
            continue
        ts = float(m * 60)
        errors = int(row.get("e", 0))
        counts = [int(row.get(f"b{i}", 0)) for i in range(len(BUCKETS_MS) + 1)]
        p95 = percentile(counts, 0.95)
        points += [
            ("api.requests", ts, float(n)),
            ("api.errors", ts, float(errors)),
            ("api.error_rate", ts, round(100.0 * errors / n, 4)),
            ("api.duration_mean_ms", ts, round(float(row.get("sum", 0)) / n, 3)),
        ]
        if p95 is not None:
            points.append(("api.duration_p95_ms", ts, round(p95, 3)))
    client.set(done_key, str(upto), ex=7 * 86400)
    return points
