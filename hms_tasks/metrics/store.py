"""A time-series store in Redis whose memory stays bounded whatever the uptime.

A *series* is a metric name plus labels, written ``name{label=value,...}`` (labels sorted), for
example ``host.cpu.percent{node=w1@db-1}``. Points are ``(series, timestamp, value)``.

Layout (``<p>`` is ``HMS_TASKS_REDIS_PREFIX``; ``<s>`` a series id)::

    <p>:ts:last            HASH    <s> -> "<ts> <value>" of its newest point
    <p>:ts:raw:<s>:<h>     STRING  raw points of epoch hour h, appended in arrival order as
                                   12-byte records: uint32 ms within the hour, float64 value
    <p>:ts:1m:<s>:<d>      STRING  1-minute aggregates of epoch day d: 1,440 slots of 16 bytes
                                   (float32 min, max, mean; uint32 count; count 0 = no data)
    <p>:ts:1h:<s>:<b>      STRING  1-hour aggregates of epoch week b: 168 slots of 16 bytes
    <p>:ts:dirty           SET     "<s>|<h>": raw blocks holding points not yet rolled up
    <p>:ts:folded          HASH    "<s>|<h>" -> bytes of that raw block already rolled up
    <p>:ts:expiry          ZSET    block key -> time its retention ends

Writing is one Lua call per batch (APPEND per series and hour, in one round trip), so points
from many writers never conflict and need no ordering. :func:`rollup` (the ``hms.metrics.rollup``
task, every minute) folds the bytes appended since the last fold into the 1-minute and 1-hour
slots (one atomic Lua call per dirty block: a late point merges into its slot), then deletes
every block whose retention ended (a block goes when its newest slot is older than the
retention; queries never return points older than it). Each block also carries a Redis TTL an
hour past its retention, a safety net if rollups stop. Memory per series is therefore at most:
raw points of ``retention['raw']`` plus an hour (12 bytes each), plus
``retention['1m'] / 1 day + 2`` blocks of 23,040 bytes, plus ``retention['1h'] / 7 days + 2``
blocks of 2,688 bytes.

Every function takes ``now`` so a test can simulate a month in seconds.
"""

from __future__ import annotations

import math
import re
import struct
import time
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any, Literal, NamedTuple, TypedDict, cast

from redis.commands.core import Script

from hms_tasks import store
from hms_tasks.errors import InvalidArguments
from hms_tasks.metrics import settings

__all__ = [
    "AGG",
    "RAW",
    "RESOLUTIONS",
    "AggPoint",
    "RawPoint",
    "Resolution",
    "RollupSummary",
    "WriteSummary",
    "fold",
    "labels_of",
    "latest",
    "memory_usage",
    "parse_duration",
    "parse_series",
    "prune",
    "query",
    "rollup",
    "series_id",
    "series_names",
    "write",
]

#: One raw point: ms offset within its hour (uint32), value (float64).
RAW = struct.Struct("<Id")
#: One aggregate slot: min, max, mean (float32), count (uint32).
AGG = struct.Struct("<fffI")
RAW_BLOCK = 3600
#: Resolution name -> (seconds per slot, slots per block).
RESOLUTIONS: dict[str, tuple[int, int]] = {"1m": (60, 1440), "1h": (3600, 168)}
Resolution = Literal["auto", "raw", "1m", "1h"]
#: A block written for points already past their retention lives at least this long, so the
#: next rollup can still fold it into the aggregates.
MIN_KEEP = 300
#: Redis TTL beyond a block's retention: the safety net if rollups stop running.
TTL_GRACE = 3600
#: Points further in the future than this are refused (a clock gone wrong).
MAX_FUTURE = 300
_BLOCK_BYTES = {res: slots * AGG.size for res, (_, slots) in RESOLUTIONS.items()}
#: Groups (series x hour) per Lua call when writing; members per pipeline when folding.
_CHUNK = 500

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")
_LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9_.@:/+-]{1,128}$")
_SID_RE = re.compile(r"^([^{}|]+?)(?:\{([^{}|]*)\})?$")
_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)([smhdw]))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class RawPoint(NamedTuple):
    ts: float
    value: float


class AggPoint(NamedTuple):
    #: Start of the slot.
    ts: float
    min: float
    max: float
    mean: float
    #: Points in the slot.
    n: int


class WriteSummary(TypedDict):
    points: int
    series: int
    blocks: int


class RollupSummary(TypedDict):
    blocks_folded: int
    points_folded: int
    keys_pruned: int
    series_pruned: int


# -- series ids and durations ------------------------------------------------------------------


def series_id(name: str, labels: dict[str, str] | None = None) -> str:
    """The id of series ``name`` with ``labels``; ValueError naming what is wrong."""
    if not isinstance(name, str) or len(name) > 128 or not _NAME_RE.match(name):
        raise ValueError("series names are dotted lower-case words like host.cpu.percent")
    if not labels:
        return name
    parts = []
    for k in sorted(labels):
        v = labels[k]
        if not isinstance(k, str) or not _LABEL_KEY_RE.match(k):
            raise ValueError("label names are lower-case words like node or queue")
        if not isinstance(v, str) or not _LABEL_VALUE_RE.match(v):
            raise ValueError(f"label {k}: values are 1 to 128 of A-Z a-z 0-9 _ . @ : / + -")
        parts.append(f"{k}={v}")
    return f"{name}{{{','.join(parts)}}}"


@lru_cache(maxsize=65536)
def parse_series(sid: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``(name, ((label, value), ...))`` of a series id; ValueError if it is not one."""
    m = _SID_RE.match(sid) if isinstance(sid, str) and len(sid) <= 2048 else None
    if m is None:
        raise ValueError("not a series id like name or name{label=value}")
    name, body = m.group(1), m.group(2)
    labels: dict[str, str] = {}
    if body:
        for pair in body.split(","):
            k, sep, v = pair.partition("=")
            if not sep:
                raise ValueError("labels are written label=value")
            labels[k] = v
    if series_id(name, labels) != sid:  # validates, and insists on the canonical order
        raise ValueError("labels must be sorted by name, without spaces")
    return name, tuple(sorted(labels.items()))


def labels_of(sid: str) -> dict[str, str]:
    return dict(parse_series(sid)[1])


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``15m``, ``1h``, ``7d``, ``2w`` or combinations like ``1h30m``."""
    if not isinstance(text, str) or not _DURATION_RE.match(text.strip()):
        raise ValueError("expected a duration like 90s, 15m, 1h, 7d or 1h30m (units s m h d w)")
    seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(text.strip()))
    if seconds <= 0:
        raise ValueError("a duration must be above zero")
    return seconds


# -- Lua ---------------------------------------------------------------------------------------

# KEYS: 1 last hash, 2 dirty set, 3 expiry zset.
# ARGV: 1 raw key prefix ("<p>:ts:raw:"), 2 groups, 3 now, 4 raw retention, 5 min keep,
# 6 ttl grace; then 5 per group: series, hour, packed records, newest ts ('' unless this group
# holds the series' newest point of the batch), newest value.
_WRITE = r"""
local prefix, n = ARGV[1], tonumber(ARGV[2])
local now, ret, keep, grace = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
  tonumber(ARGV[6])
local i = 7
for _ = 1, n do
  local sid, hour, recs, lts, lval = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  i = i + 5
  local key = prefix .. sid .. ':' .. hour
  if redis.call('APPEND', key, recs) == #recs then
    local due = math.max((tonumber(hour) + 1) * 3600 + ret, now + keep)
    redis.call('ZADD', KEYS[3], due, key)
    redis.call('EXPIRE', key, math.ceil(due - now) + grace)
  end
  redis.call('SADD', KEYS[2], sid .. '|' .. hour)
  if lts ~= '' then
    local cur = redis.call('HGET', KEYS[1], sid)
    if (not cur) or tonumber(string.match(cur, '^(%S+)')) <= tonumber(lts) then
      redis.call('HSET', KEYS[1], sid, lts .. ' ' .. lval)
    end
  end
end
return n
"""

# Fold the raw bytes appended since the last fold into the aggregate slots, atomically.
# KEYS: 1 raw block, 2 folded hash, 3 dirty set, 4 1m block, 5 1h block, 6 expiry zset.
# ARGV: 1 member "<s>|<h>", 2 hour, 3 first minute of the 1m block, 4 first hour of the 1h
# block, 5 1m due time, 6 1h due time, 7 now, 8 ttl grace, 9 1m block bytes, 10 1h block bytes.
# A new aggregate block is created at its full size with SET: grown by SETRANGE, Redis would
# double its allocation as it grows.
# Returns the number of points folded.
_FOLD = r"""
local off = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
redis.call('SREM', KEYS[3], ARGV[1])
local data = redis.call('GETRANGE', KEYS[1], off, -1)
local n = math.floor(#data / 12)
if n == 0 then return 0 end
local hour = tonumber(ARGV[2])
local base_ms = hour * 3600000
local m0, h0 = tonumber(ARGV[3]), tonumber(ARGV[4])
local due1m, due1h, now, grace = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]),
  tonumber(ARGV[8])
local mins = {}
local hmin, hmax, hsum = math.huge, -math.huge, 0
local pos = 1
for _ = 1, n do
  local ms, v
  ms, v, pos = struct.unpack('<I4d', data, pos)
  local slot = math.floor((base_ms + ms) / 60000) - m0
  local a = mins[slot]
  if not a then
    a = {v, v, 0, 0}
    mins[slot] = a
  end
  if v < a[1] then a[1] = v end
  if v > a[2] then a[2] = v end
  a[3] = a[3] + v
  a[4] = a[4] + 1
  if v < hmin then hmin = v end
  if v > hmax then hmax = v end
  hsum = hsum + v
end
local function merge(key, slot, mn, mx, s, c)
  local at = slot * 16
  local rec = redis.call('GETRANGE', key, at, at + 15)
  if #rec == 16 then
    local omn, omx, omean, oc = struct.unpack('<fffI4', rec)
    if oc > 0 then
      if omn < mn then mn = omn end
      if omx > mx then mx = omx end
      s = s + omean * oc
      c = c + oc
    end
  end
  redis.call('SETRANGE', key, at, struct.pack('<fffI4', mn, mx, s / c, c))
end
local function create(key, size)
  if redis.call('EXISTS', key) == 0 then
    redis.call('SET', key, string.rep('\0', size))
  end
end
local function keep(key, due)
  redis.call('ZADD', KEYS[6], due, key)
  redis.call('EXPIRE', key, math.ceil(due - now) + grace)
end
if due1m > now then
  create(KEYS[4], tonumber(ARGV[9]))
  for slot, a in pairs(mins) do merge(KEYS[4], slot, a[1], a[2], a[3], a[4]) end
  keep(KEYS[4], due1m)
end
if due1h > now then
  create(KEYS[5], tonumber(ARGV[10]))
  merge(KEYS[5], hour - h0, hmin, hmax, hsum, n)
  keep(KEYS[5], due1h)
end
redis.call('HSET', KEYS[2], ARGV[1], off + n * 12)
return n
"""

_scripts: dict[tuple[int, str], Script] = {}


def _script(name: str, source: str) -> Script:
    client = store.client()
    key = (id(client), name)
    if key not in _scripts:
        _scripts[key] = client.register_script(source)
    return _scripts[key]


def _k(*parts: str) -> str:
    return store.key("ts", *parts)


# -- writing -----------------------------------------------------------------------------------


def write(points: Iterable[tuple[str, float, float]], *, now: float | None = None) -> WriteSummary:
    """Store ``(series id, timestamp, value)`` points in one round trip.

    Every point is checked first; a bad one raises :class:`InvalidArguments` naming its index
    and field, and nothing is written. Values must be finite; timestamps no older than the
    longest retention and no more than 5 minutes ahead of ``now``.
    """
    now = time.time() if now is None else now
    ret = settings.get().metrics_retention.as_dict()
    oldest = now - max(ret.values())
    newest = now + MAX_FUTURE
    groups: dict[tuple[str, int], bytearray] = {}
    last: dict[str, tuple[float, float, int]] = {}
    problems: list[str] = []
    count = 0
    for i, point in enumerate(points):
        try:
            sid, ts, value = point
        except (TypeError, ValueError):
            problems.append(f"points[{i}]: expected (series, timestamp, value)")
            continue
        try:
            parse_series(sid)
        except (ValueError, TypeError) as exc:
            problems.append(f"points[{i}].series: {exc}")
            continue
        if not _finite(ts) or not oldest <= ts <= newest:
            problems.append(f"points[{i}].timestamp: must be within the retention and not ahead"
                            " of now")
            continue
        if not _finite(value):
            problems.append(f"points[{i}].value: must be a finite number")
            continue
        hour = int(ts // RAW_BLOCK)
        ms = min(int((ts - hour * RAW_BLOCK) * 1000), RAW_BLOCK * 1000 - 1)
        groups.setdefault((sid, hour), bytearray()).extend(RAW.pack(ms, value))
        prev = last.get(sid)
        if prev is None or ts >= prev[0]:
            last[sid] = (ts, value, hour)
        count += 1
    if problems:
        raise InvalidArguments("metrics.write", problems[:20] + (
            [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []))
    if not groups:
        return {"points": 0, "series": 0, "blocks": 0}
    script = _script("write", _WRITE)
    keys = [_k("last"), _k("dirty"), _k("expiry")]
    head = [_k("raw") + ":", 0, repr(now), ret["raw"], MIN_KEEP, TTL_GRACE]
    pipe = store.client().pipeline(transaction=False)
    items = list(groups.items())
    for start in range(0, len(items), _CHUNK):
        chunk = items[start:start + _CHUNK]
        args: list[Any] = [*head]
        args[1] = len(chunk)
        for (sid, hour), recs in chunk:
            lts, lval, lhour = last[sid]
            newest_here = lhour == hour
            args += [sid, hour, bytes(recs), repr(float(lts)) if newest_here else "",
                     repr(float(lval)) if newest_here else ""]
        script(keys=keys, args=args, client=pipe)
    pipe.execute()
    return {"points": count, "series": len(last), "blocks": len(groups)}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# -- rollup and pruning ------------------------------------------------------------------------


def _block_of(resolution: str, ts: float) -> tuple[int, int]:
    """(block number, first slot number of the block) of ``ts`` at ``resolution``."""
    step, slots = RESOLUTIONS[resolution]
    bucket = int(ts // step)
    block = bucket // slots
    return block, block * slots


def fold(*, now: float | None = None) -> tuple[int, int]:
    """Fold every dirty raw block into its aggregates; returns (blocks, points) folded."""
    now = time.time() if now is None else now
    ret = settings.get().metrics_retention.as_dict()
    client = store.client()
    members = sorted(cast("set[str]", client.smembers(_k("dirty"))))
    script = _script("fold", _FOLD)
    blocks = points = 0
    for start in range(0, len(members), _CHUNK):
        pipe = client.pipeline(transaction=False)
        for member in members[start:start + _CHUNK]:
            sid, _, hour_text = member.rpartition("|")
            hour = int(hour_text)
            t = hour * RAW_BLOCK
            day, m0 = _block_of("1m", t)
            hblock, h0 = _block_of("1h", t)
            due1m = (day + 1) * 86400 + ret["1m"]
            due1h = (hblock + 1) * RESOLUTIONS["1h"][1] * 3600 + ret["1h"]
            script(
                keys=[_k("raw", sid, hour_text), _k("folded"), _k("dirty"),
                      _k("1m", sid, str(day)), _k("1h", sid, str(hblock)), _k("expiry")],
                args=[member, hour, m0, h0, due1m, due1h, repr(now), TTL_GRACE,
                      _BLOCK_BYTES["1m"], _BLOCK_BYTES["1h"]],
                client=pipe,
            )
        for n in pipe.execute():
            blocks += 1
            points += int(n)
    return blocks, points


def prune(*, now: float | None = None) -> tuple[int, int]:
    """Delete every block whose retention ended by ``now``, and forget series with no point
    within the longest retention. Returns (keys deleted, series forgotten)."""
    now = time.time() if now is None else now
    client = store.client()
    raw_prefix = _k("raw") + ":"
    deleted = 0
    while True:
        due = cast("list[str]", client.zrangebyscore(_k("expiry"), "-inf", now, 0, 5000))
        if not due:
            break
        members = [k[len(raw_prefix):].rpartition(":") for k in due if k.startswith(raw_prefix)]
        fields = [f"{sid}|{hour}" for sid, _, hour in members]
        pipe = client.pipeline(transaction=True)
        pipe.unlink(*due)
        pipe.zrem(_k("expiry"), *due)
        if fields:
            pipe.hdel(_k("folded"), *fields)
            pipe.srem(_k("dirty"), *fields)
        pipe.execute()
        deleted += len(due)
        if len(due) < 5000:
            break
    horizon = now - settings.get().metrics_retention.longest
    stale = [sid for sid, (ts, _) in _read_last().items() if ts < horizon]
    if stale:
        client.hdel(_k("last"), *stale)
    return deleted, len(stale)


def rollup(*, now: float | None = None) -> RollupSummary:
    """Fold new raw points into the 1-minute and 1-hour aggregates, then prune."""
    now = time.time() if now is None else now
    blocks, points = fold(now=now)
    deleted, forgotten = prune(now=now)
    return {"blocks_folded": blocks, "points_folded": points, "keys_pruned": deleted,
            "series_pruned": forgotten}


# -- reading -----------------------------------------------------------------------------------


def _read_last() -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    for sid, doc in cast("dict[str, str]", store.client().hgetall(_k("last"))).items():
        ts, _, value = doc.partition(" ")
        out[sid] = (float(ts), float(value))
    return out


def latest(*, now: float | None = None, max_age: float | None = None) -> dict[str, RawPoint]:
    """The newest point of every series (only those newer than ``max_age`` seconds, if given)."""
    now = time.time() if now is None else now
    return {sid: RawPoint(ts, v) for sid, (ts, v) in _read_last().items()
            if max_age is None or now - ts <= max_age}


def series_names() -> list[str]:
    """Names (without labels) of every series with points, sorted."""
    return sorted({parse_series(sid)[0] for sid in _read_last()})


def _kept_since(resolution: str, now: float) -> float:
    return now - settings.get().metrics_retention.as_dict()[resolution]


def _pick(resolution: Resolution, since: float, now: float) -> str:
    if resolution != "auto":
        return resolution
    ret = settings.get().metrics_retention.as_dict()
    if since >= now - ret["raw"]:
        return "raw"
    if since >= now - ret["1m"]:
        return "1m"
    return "1h"


def query(sid: str, *, since: float, until: float | None = None,
          resolution: Resolution = "auto",
          now: float | None = None) -> tuple[str, list[RawPoint] | list[AggPoint]]:
    """Points of series ``sid`` from ``since`` to ``until`` (default now), oldest first.

    ``auto`` reads raw points when ``since`` is within the raw retention, else 1-minute
    aggregates within theirs, else 1-hour ones. Returns (resolution used, points). Raw points
    not yet rolled up are included; aggregates cover what the last rollup folded.
    """
    now = time.time() if now is None else now
    until = now if until is None else until
    parse_series(sid)
    res = _pick(resolution, since, now)
    since = max(since, _kept_since(res, now))
    client = store.binary_client()
    if res == "raw":
        hours = range(int(since // RAW_BLOCK), int(until // RAW_BLOCK) + 1)
        pipe = client.pipeline(transaction=False)
        for h in hours:
            pipe.get(_k("raw", sid, str(h)))
        raw: list[RawPoint] = []
        for h, blob in zip(hours, pipe.execute(), strict=True):
            if not blob:
                continue
            base = h * RAW_BLOCK
            for ms, value in RAW.iter_unpack(blob[: len(blob) - len(blob) % RAW.size]):
                ts = base + ms / 1000
                if since <= ts <= until:
                    raw.append(RawPoint(ts, value))
        raw.sort()
        return res, raw
    step, slots = RESOLUTIONS[res]
    first, _ = _block_of(res, since)
    last_block, _ = _block_of(res, until)
    blocks = range(first, last_block + 1)
    pipe = client.pipeline(transaction=False)
    for b in blocks:
        pipe.get(_k(res, sid, str(b)))
    agg: list[AggPoint] = []
    for b, blob in zip(blocks, pipe.execute(), strict=True):
        if not blob:
            continue
        for slot, (mn, mx, mean, count) in enumerate(AGG.iter_unpack(
                blob[: len(blob) - len(blob) % AGG.size])):
            if count == 0:
                continue
            ts = (b * slots + slot) * step
            if since - step < ts <= until:
                agg.append(AggPoint(float(ts), _r(mn), _r(mx), _r(mean), count))
    return res, agg


def _r(x: float) -> float:
    """A float32 read back, rounded to the 7 significant digits it carries."""
    return float(f"{x:.7g}")


def matching(name: str, labels: dict[str, str] | None = None,
             among: Sequence[str] | None = None) -> list[str]:
    """Series ids named ``name`` whose labels include ``labels``, sorted."""
    wanted = set((labels or {}).items())
    pool = among if among is not None else list(_read_last())
    return sorted(sid for sid in pool
                  if (p := parse_series(sid))[0] == name and wanted <= set(p[1]))


def memory_usage() -> dict[str, int]:
    """Bytes Redis uses for the store, by kind (raw, 1m, 1h, index), via MEMORY USAGE on every
    key: for benchmarks and tests, not for a hot path (it scans)."""
    client = store.client()
    out = {"raw": 0, "1m": 0, "1h": 0, "index": 0, "keys": 0}
    prefix = _k("")
    for key in client.scan_iter(match=prefix + "*", count=1000):
        kind = key[len(prefix):].split(":", 1)[0]
        used = int(cast(int, client.memory_usage(key, samples=0)) or 0)
        out[kind if kind in ("raw", "1m", "1h") else "index"] += used
        out["keys"] += 1
    return out
