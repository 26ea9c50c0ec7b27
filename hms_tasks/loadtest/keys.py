"""The Redis layout of load tests, and its atomic updates.

Layout (``<p>`` is ``HMS_TASKS_REDIS_PREFIX``; ``<run>`` a run id, the ``hms.loadtest.run``
task's id)::

    <p>:loadtest:run:<run>                HASH    the run: v, id, test, target, spec (JSON), status,
                                                  created_at, start_at, end_at, deadline, shards,
                                                  node, shard_ids (JSON), done (shards finished),
                                                  abort ("1" once asked), aborted_at,
                                                  merge_queued, verdict, error
    <p>:loadtest:run:<run>:shard:<i>      HASH    one shard: v, state, node, runner_pid,
                                                  claimed_at, started_at, stopped_at, users,
                                                  progress (JSON), result (JSON), error, reason
    <p>:loadtest:run:<run>:shard:<i>:ticks LIST   the runner's per-second lines as they came (a
                                                  checkpoint: a shard whose worker died is merged
                                                  from it); capped, deleted once the result is in
    <p>:loadtest:run:<run>:merge-lock     STRING  the merging task (SET NX, 120 s)
    <p>:loadtest:report:<run>             STRING  JSON report of the run
    <p>:loadtest:runs                     ZSET    run ids by creation time
    <p>:loadtest:history:<test>           LIST    ids of the test's reported runs, newest first
                                                  (the previous run of a regression check)

Run, shard and report keys live ``HMS_TASKS_LOADTEST_KEEP_DAYS``; tick checkpoints a day at
most; ``runs`` is pruned past the same age and the history lists are capped at 100 entries.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal, TypedDict, cast

from hms_tasks import store
from hms_tasks.loadtest import settings

__all__ = [
    "FINAL_SHARD_STATES",
    "FINAL_STATUSES",
    "HISTORY_KEPT",
    "RUN_VERSION",
    "ShardProgress",
    "abort",
    "claim_shard",
    "create_run",
    "finish_shard",
    "history",
    "history_key",
    "merge_lock",
    "recent_runs",
    "record_report",
    "report",
    "report_key",
    "run",
    "run_key",
    "runs_key",
    "save_progress",
    "set_run",
    "shard",
    "shard_key",
    "shards",
    "ticks",
    "ticks_key",
    "ttl",
]

RUN_VERSION = 1
HISTORY_KEPT = 100
TICKS_TTL = 86400
FINAL_STATUSES = ("passed", "failed", "aborted")
FINAL_SHARD_STATES = ("finished", "failed", "aborted", "missed", "lost")
ShardState = Literal["starting", "running", "finished", "failed", "aborted", "missed", "lost"]


class ShardProgress(TypedDict):
    v: int
    at: float
    elapsed_s: float
    users: int
    rps: int
    requests: int
    failures: int


def ttl() -> int:
    return settings.get().loadtest_keep_days * 86400


def run_key(run_id: str) -> str:
    return store.key("loadtest", "run", run_id)


def shard_key(run_id: str, index: int) -> str:
    return store.key("loadtest", "run", run_id, "shard", str(index))


def ticks_key(run_id: str, index: int) -> str:
    return store.key("loadtest", "run", run_id, "shard", str(index), "ticks")


def report_key(run_id: str) -> str:
    return store.key("loadtest", "report", run_id)


def runs_key() -> str:
    return store.key("loadtest", "runs")


def history_key(test: str) -> str:
    return store.key("loadtest", "history", test)


# -- runs ----------------------------------------------------------------------------------------

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], string.match(KEYS[1], '[^:]+$'))
return 1
"""


def create_run(run_id: str, fields: dict[str, Any], *, created_at: float) -> bool:
    """Store a new run record (False if it exists: a redelivered ``run`` message) and index it;
    runs older than the keep time drop out of the index."""
    client = store.client()
    flat: list[Any] = []
    for k, v in {"v": RUN_VERSION, **fields}.items():
        flat += [k, v if isinstance(v, (str, int, float)) else json.dumps(v)]
    created = bool(client.register_script(_CREATE)(
        keys=[run_key(run_id), runs_key()], args=[ttl(), created_at, *flat]))
    client.zremrangebyscore(runs_key(), "-inf", created_at - ttl())
    return created


def run(run_id: str) -> dict[str, str]:
    return cast("dict[str, str]", store.client().hgetall(run_key(run_id)))


def set_run(run_id: str, **fields: Any) -> None:
    store.client().hset(run_key(run_id), mapping={
        k: v if isinstance(v, (str, int, float)) else json.dumps(v) for k, v in fields.items()})


def recent_runs(*, last: int = 20) -> list[str]:
    return cast("list[str]", store.client().zrevrange(runs_key(), 0, max(1, last) - 1))


_ABORT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'passed' or status == 'failed' or status == 'aborted' then return 0 end
if redis.call('HGET', KEYS[1], 'abort') == '1' then return 2 end
redis.call('HSET', KEYS[1], 'abort', '1', 'aborted_at', ARGV[1])
return 1
"""


def abort(run_id: str, *, now: float | None = None) -> int:
    """Ask every shard of the run to stop: 1 asked now, 2 already asked, 0 the run is over,
    -1 no such run."""
    return int(store.client().register_script(_ABORT)(
        keys=[run_key(run_id)], args=[repr(now or time.time())]))


# -- shards --------------------------------------------------------------------------------------

_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'unknown' end
local state = redis.call('HGET', KEYS[2], 'state')
if state then return 'duplicate' end
local now = ARGV[2]
if redis.call('HGET', KEYS[1], 'abort') == '1' then
  -- Taken, to be finished as aborted at once (finish_shard counts it done).
  redis.call('HSET', KEYS[2], 'v', ARGV[4], 'state', 'starting', 'node', ARGV[1],
             'claimed_at', now)
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  return 'aborted'
end
redis.call('HSET', KEYS[2], 'v', ARGV[4], 'state', 'starting', 'node', ARGV[1], 'claimed_at', now)
redis.call('EXPIRE', KEYS[2], ARGV[3])
if redis.call('HGET', KEYS[1], 'status') == 'scheduled' then
  redis.call('HSET', KEYS[1], 'status', 'running')
end
return 'ok'
"""


def claim_shard(run_id: str, index: int, *, node: str, now: float) -> str:
    """Take shard ``index`` of the run: ``ok``, ``duplicate`` (it was taken before: a
    redelivered message), ``aborted`` (taken; the run was aborted before it started: finish it
    as such) or ``unknown`` (no such run)."""
    return str(store.client().register_script(_CLAIM)(
        keys=[run_key(run_id), shard_key(run_id, index)],
        args=[node, repr(now), ttl(), RUN_VERSION]))


def save_progress(run_id: str, index: int, *, progress: ShardProgress | None,
                  tick_lines: list[str], fields: dict[str, Any] | None = None) -> bool:
    """Checkpoint a shard (its progress and the runner's new tick lines, in one MULTI); returns
    whether the run was asked to stop."""
    s = settings.get()
    pipe = store.client().pipeline(transaction=True)
    skey = shard_key(run_id, index)
    mapping: dict[str, Any] = dict(fields or {})
    if progress is not None:
        mapping["progress"] = json.dumps(progress, separators=(",", ":"))
    if mapping:
        pipe.hset(skey, mapping=cast(Any, mapping))
    if tick_lines:
        tkey = ticks_key(run_id, index)
        pipe.rpush(tkey, *tick_lines)
        # One line a second: the longest run, its grace and a margin.
        pipe.ltrim(tkey, -(s.loadtest_max_duration + 600), -1)
        pipe.expire(tkey, TICKS_TTL)
    pipe.hget(run_key(run_id), "abort")
    return bool(pipe.execute()[-1] == "1")


_FINISH = """
local state = redis.call('HGET', KEYS[2], 'state')
if state ~= 'starting' and state ~= 'running' then return -1 end
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
local done = redis.call('HINCRBY', KEYS[1], 'done', 1)
local shards = tonumber(redis.call('HGET', KEYS[1], 'shards') or '0')
if done >= shards and redis.call('HSETNX', KEYS[1], 'merge_queued', ARGV[2]) == 1 then
  return 1
end
return 0
"""


def finish_shard(run_id: str, index: int, *, state: ShardState, fields: dict[str, Any],
                 now: float) -> int:
    """Record a shard's end (state, result, reason) and count it done, atomically: 1 when it
    was the last shard (the caller queues the merge), 0 otherwise, -1 if it had already ended.
    The tick checkpoint is deleted: the result supersedes it."""
    flat: list[Any] = ["state", state]
    for k, v in fields.items():
        flat += [k, v if isinstance(v, (str, int, float)) else json.dumps(v)]
    return int(store.client().register_script(_FINISH)(
        keys=[run_key(run_id), shard_key(run_id, index), ticks_key(run_id, index)],
        args=[ttl(), repr(now), *flat]))


def shard(run_id: str, index: int) -> dict[str, str]:
    return cast("dict[str, str]", store.client().hgetall(shard_key(run_id, index)))


def shards(run_id: str, count: int) -> list[dict[str, str]]:
    pipe = store.client().pipeline(transaction=False)
    for i in range(count):
        pipe.hgetall(shard_key(run_id, i))
    return cast("list[dict[str, str]]", pipe.execute())


def ticks(run_id: str, index: int) -> list[str]:
    return cast("list[str]", store.client().lrange(ticks_key(run_id, index), 0, -1))


def merge_lock(run_id: str, token: str) -> bool:
    return bool(store.client().set(store.key("loadtest", "run", run_id, "merge-lock"), token,
                                   nx=True, ex=120))


# -- reports -------------------------------------------------------------------------------------


def record_report(run_id: str, test: str, doc: dict[str, Any], *, status: str) -> None:
    """Store the report, mark the run with its status and verdict, and put it at the head of
    its test's history: one MULTI."""
    pipe = store.client().pipeline(transaction=True)
    pipe.set(report_key(run_id), json.dumps(doc, separators=(",", ":")), ex=ttl())
    pipe.hset(run_key(run_id), mapping={"status": status, "verdict": doc["verdict"]["status"]})
    pipe.lrem(history_key(test), 0, run_id)
    pipe.lpush(history_key(test), run_id)
    pipe.ltrim(history_key(test), 0, HISTORY_KEPT - 1)
    pipe.expire(history_key(test), ttl())
    pipe.execute()


def report(run_id: str) -> dict[str, Any] | None:
    doc = cast("str | None", store.client().get(report_key(run_id)))
    return cast("dict[str, Any]", json.loads(doc)) if doc else None


def history(test: str, *, last: int = 10) -> list[str]:
    return cast("list[str]", store.client().lrange(history_key(test), 0, max(1, last) - 1))
