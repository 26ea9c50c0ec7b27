"""Invalidation at commit: from a model change in the HMS to its cached values dead, then gone.

Write path, in every HMS process (web or worker)::

    post_save / post_delete of a registered model (or an InvalidatingQuerySet bulk change)
      -> the tags it touches (for tracked fields, the values it was loaded with as well)
      -> transaction.on_commit          (nothing on rollback; savepoints honoured)
      -> the committing thread, before the commit returns to the HMS: one Lua call gives each
         tag a new generation and appends the tags to the change log (:func:`record_changes`);
         its reply says whether a fan-out task must be sent (one per burst, not per change)
      -> hms.cache.fanout_changes       (on a worker: unlinks the dead keys, re-warms hot ones)

Read after commit. Every read through the cache (a hit too) compares the generations a value
was built under with its tags' current ones, in the same Lua call that reads it (see
:mod:`hms_tasks.cache.lua`). Once the commit's call has bumped them, no read anywhere returns
a value built before the commit, and no fill that read the database before it can store one.
So a read that starts after ``save()``/``atomic()`` returned never sees the pre-commit payload,
in any process, whenever Redis answered that call within :data:`COMMIT_TIMEOUT`.

When it did not (Redis down, hung or slow), the write still succeeds: the tags are buffered,
the failure is logged once per outage, and the process's courier thread writes them (bumping
the generations then) with backoff until Redis answers. Meanwhile each later commit still makes
its call, the buffered tags with its own, when the failure was fast (an error reply such as a
failing-over master's ``NOREPLICAS``, a refused connection): the first commit that gets through
lands them all at once. After a timeout, later commits buffer without waiting, until the
courier gets through or, behind sentinels, until any pool of the process reaches a new master:
the buffered tags land there before that pool's first command. Past
``HMS_TASKS_CACHE_MAX_PENDING_TAGS`` buffered tags it invalidates the whole cache instead (the
``all`` tag), so memory stays bounded. A process that exits gracefully writes what it holds
first (2 s at most: ``atexit``, and Celery's ``worker_process_shutdown``). A process killed
(SIGKILL, OOM) with tags buffered loses their invalidation; the values then live until their
TTL. docs/cache.md states these limits.

Worker side: :func:`apply_changes` takes batches off the change log and invalidates their tags
in the same atomic Lua step, so a worker dying half-way loses nothing either.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial
from types import SimpleNamespace
from typing import Any

import redis
from django.conf import settings
from django.db import models, transaction
from django.db.models.signals import post_delete, post_init, post_save
from redis.commands.core import Script

from hms_tasks import store
from hms_tasks.cache import lua
from hms_tasks.cache import names as cache_names
from hms_tasks.cache import settings as cache_settings
from hms_tasks.cache.backend import GENERATION_TTL
from hms_tasks.cache.core import _token, backend, heat_key
from hms_tasks.cache.registry import TrackedModel, tracked_models
from hms_tasks.cache.tags import ALL

__all__ = [
    "Applied",
    "InvalidatingQuerySet",
    "Recorder",
    "apply_changes",
    "changed",
    "changed_everything",
    "connect",
    "flush",
    "pending_entries",
    "record_changes",
    "recorder",
]

logger = logging.getLogger(__name__)

#: Tags per change-log entry: bounds the work of one atomic apply step.
BATCH_TAGS = 1000
#: Seconds the "a fan-out task is pending" flag lives if its task is lost.
PENDING_TTL = 30
#: The commit's Redis call gives up after this long (seconds): far above a healthy round trip
#: (about 0.2 ms on loopback), short enough that nobody notices a commit held up by it. With
#: Redis hung, a process's commits wait this long once, then buffer without waiting.
COMMIT_TIMEOUT = 0.1
#: A failed call that timed out (or took as long) makes commits buffer without calling until
#: the courier gets through; a faster failure (an error reply, a refused connection, with
#: the reconnect to a new master before it) costs a commit less than the timeout it may wait
#: anyway, so commits keep calling (with 25 ms here, a failover benchmark on a loaded 2-core
#: machine still read values of buffered commits up to 0.3 s after the master took writes).
SLOW_FAILURE = COMMIT_TIMEOUT
#: The courier's retry delays while Redis or the broker fails: the first, doubling to the last
#: (seconds). The last bounds how long after Redis is back commits keep being buffered.
RETRY_FIRST, RETRY_LAST = 0.05, 0.5
#: The courier's Redis call gives up after this long (seconds), and is not retried by the
#: client: its own next try goes through the sentinels again. With the client's defaults (a
#: 5 s timeout, then redis-py's retries with backoff) one call on a hung master held the
#: buffered tags for seconds while other clients were served by the new one. Writing
#: ``HMS_TASKS_CACHE_MAX_PENDING_TAGS`` tags takes milliseconds.
COURIER_TIMEOUT = 1.0
_LOADED = "_hms_cache_loaded"


def _keys() -> tuple[str, str]:
    be = backend()
    return be.internal_key("changes"), be.internal_key("fanout-pending")


# -- the write path ---------------------------------------------------------------------------


def _loaded_tags(tracked: TrackedModel, instance: Any) -> set[str]:
    loaded = instance.__dict__.get(_LOADED)
    if not loaded or instance.pk is None:
        return set()
    return set(tracked.tags(SimpleNamespace(pk=instance.pk, **dict(zip(tracked.fields, loaded,
                                                                        strict=True)))))


def _snapshot(tracked: TrackedModel, instance: Any) -> None:
    instance.__dict__[_LOADED] = tuple(instance.__dict__.get(f) for f in tracked.fields)


def _record(tags: set[str], using: str) -> None:
    if tags:
        transaction.on_commit(partial(recorder().add, frozenset(tags)), using=using, robust=True)


def _on_change(tracked: TrackedModel, instance: Any, using: str, *, deleted: bool) -> None:
    try:
        tags = set(tracked.tags(instance)) | _loaded_tags(tracked, instance)
        if tracked.fields and not deleted:
            _snapshot(tracked, instance)  # a second save of this instance moves from here
    except Exception:
        # A tag function that fails must not fail the HMS's write; without its tags, the
        # only safe invalidation is all of it.
        logger.exception("cache tags of a %s change could not be computed; invalidating all",
                         tracked.model.__name__)
        tags = {ALL}
    _record(tags, using)


def connect(tracked: TrackedModel) -> None:
    """Hook a registered model's signals (idempotent: dispatch uids)."""
    model = tracked.model
    uid = f"hms_tasks.cache:{model._meta.label}"

    def saved(sender: Any, instance: Any, using: str, **_: Any) -> None:
        _on_change(tracked, instance, using, deleted=False)

    def deleted(sender: Any, instance: Any, using: str, **_: Any) -> None:
        _on_change(tracked, instance, using, deleted=True)

    post_save.connect(saved, sender=model, weak=False, dispatch_uid=f"{uid}:save")
    post_delete.connect(deleted, sender=model, weak=False, dispatch_uid=f"{uid}:delete")
    if tracked.fields:
        def loaded(sender: Any, instance: Any, **_: Any) -> None:
            if instance.pk is not None:
                _snapshot(tracked, instance)

        post_init.connect(loaded, sender=model, weak=False, dispatch_uid=f"{uid}:init")


def changed(model: type[models.Model], rows: Iterable[Any], *, using: str = "default") -> None:
    """Record that ``rows`` of ``model`` changed outside the ORM's signals (raw SQL, say).

    ``rows`` are instances, or objects or dicts with ``pk`` and the model's tracked fields.
    Takes effect when the current transaction commits.
    """
    tracked = tracked_models().get(model)
    if tracked is None:
        return
    tags: set[str] = set()
    for row in rows:
        obj = SimpleNamespace(**row) if isinstance(row, Mapping) else row
        tags.update(tracked.tags(obj))
    _record(tags, using)


def changed_everything(*, using: str = "default") -> None:
    """Record that the whole cache is stale (data reloaded, a migration rewrote rows): on
    commit, every cached value dies at once."""
    _record({ALL}, using)


class InvalidatingQuerySet(models.QuerySet[Any]):
    """A QuerySet whose bulk changes (``update``, ``bulk_update``, ``bulk_create``) invalidate
    like saves do; ``delete`` already sends signals. Costs one query per bulk change (two
    when the change moves tracked fields), never one per row."""

    def _tracked(self) -> TrackedModel | None:
        return tracked_models().get(self.model)

    def _rows(self, tracked: TrackedModel, pks: Sequence[Any] | None = None) -> list[dict[str,
                                                                                    Any]]:
        qs = self if pks is None else self.model._base_manager.using(self.db).filter(pk__in=pks)
        return list(qs.values("pk", *tracked.fields))

    def update(self, **kwargs: Any) -> int:
        tracked = self._tracked()
        if tracked is None:
            return super().update(**kwargs)
        before = self._rows(tracked)
        count = super().update(**kwargs)
        moved = {f.removesuffix("_id") for f in tracked.fields} & {
            k.removesuffix("_id") for k in kwargs}
        after = self._rows(tracked, [r["pk"] for r in before]) if moved else []
        changed(self.model, [*before, *after], using=self.db)
        return count

    def bulk_update(self, objs: Iterable[Any], fields: Iterable[str],
                    batch_size: int | None = None) -> int:
        tracked = self._tracked()
        objs = list(objs)
        if tracked is None:
            return super().bulk_update(objs, fields, batch_size=batch_size)
        before = self._rows(tracked, [o.pk for o in objs]) if tracked.fields else []
        count = super().bulk_update(objs, fields, batch_size=batch_size)
        changed(self.model, [*before, *objs], using=self.db)
        return count

    def bulk_create(self, objs: Iterable[Any], *args: Any, **kwargs: Any) -> list[Any]:
        created = super().bulk_create(objs, *args, **kwargs)
        if self._tracked() is not None:
            changed(self.model, [o for o in created if o.pk is not None], using=self.db)
        return created


# -- the recorder -----------------------------------------------------------------------------


def _cache_url() -> str:
    """The cache's Redis: the first server of its ``LOCATION``, the one Django's backend
    writes to."""
    cache: Any = settings.CACHES[cache_settings.get().cache_alias]
    location = cache["LOCATION"]
    servers = location if isinstance(location, (list, tuple)) else re.split("[;,]", location)
    return str(servers[0]).strip()


@lru_cache(maxsize=8)
def _script(client: redis.Redis) -> Script:
    # redis-py's Script: EVALSHA, loading the script again after a NOSCRIPT (Redis restarted).
    return client.register_script(lua.RECORD_CHANGES)


def _record_args(tags: Iterable[str]) -> list[Any]:
    """``RECORD_CHANGES``'s keys and arguments for ``tags``."""
    be = backend()
    ordered = sorted(tags)
    entries = [json.dumps(ordered[i:i + BATCH_TAGS]) for i in range(0, len(ordered), BATCH_TAGS)]
    # A unique token without a system call per commit (secrets.token_hex reads urandom).
    return [*_keys(), be.gen_prefix, _token(), GENERATION_TTL, PENDING_TTL,
            *entries]


def record_changes(tags: Iterable[str], *, timeout: float | None = None) -> bool:
    """Give each of ``tags`` a new generation and append them to the change log: one atomic
    call, waiting at most ``timeout`` seconds for Redis (None: the client's default). From the
    reply on, no read returns a value cached under them. Returns whether the fan-out task
    must be sent (no other is pending). Raises what redis-py raises."""
    client = store.client(decode=False, url=_cache_url(), socket_timeout=timeout)
    args = _record_args(tags)
    out = _script(client)(keys=args[:2], args=args[2:], client=client)
    return bool(out == 1)


_RECORD_SHA = hashlib.sha1(lua.RECORD_CHANGES.encode(), usedforsecurity=False).hexdigest()


#: The committing thread's own connection for the commit's call (:func:`_record_at_commit`).
#: Why not :func:`record_changes` (redis-py's ``Script``, through the client): each call
#: checks a connection out of the pool and back in, and the checkout polls the socket for
#: stray data first. Profiled in the write benchmark (2026-12-01, SQLite): about 40 us of
#: the commit's 160 us.
_line = store.HeldConnection(
    lambda: store.client(decode=False, url=_cache_url(),
                         socket_timeout=COMMIT_TIMEOUT).connection_pool)


def _call_at_commit(args: Sequence[Any]) -> Any:
    try:
        return _line.call("EVALSHA", _RECORD_SHA, 2, *args, disable_decoding=True)
    except redis.exceptions.NoScriptError:  # Redis restarted without its scripts
        return _line.call("EVAL", lua.RECORD_CHANGES, 2, *args, disable_decoding=True)


def _record_at_commit(tags: Iterable[str]) -> bool:
    """:func:`record_changes` for the committing thread, on its own connection, waiting at
    most :data:`COMMIT_TIMEOUT`."""
    args = _record_args(tags)
    try:
        out = _call_at_commit(args)
    except redis.ConnectionError:
        # A connection that broke while it was idle (Redis restarted, an idle timeout, a
        # failover): once more on a fresh one, as redis-py's client does. Running the call
        # twice is harmless (new generations again, the tags logged again). A timeout is not
        # retried: no commit waits for it twice.
        out = _call_at_commit(args)
    return bool(out == 1)


class Recorder:
    """This process's committed changes on their way to Redis (see the module docstring).

    The committing thread makes the Redis call itself: read after commit needs it done before
    the commit returns. A second thread, the courier, does what must not hold up a commit:
    sending the fan-out task and, while Redis fails, writing the buffered tags with backoff (a
    process may commit nothing more for hours; without the courier, its buffered tags would
    wait for its next commit). It starts on first need. Measured (2026-11-30, loopback Redis
    as broker, `send_task(retry=False)`): 0.53 ms median, 2.4 ms p90 with the broker healthy;
    6 s before raising with it down, 30 s with it SIGSTOPped: no commit may wait for that.
    """

    def __init__(self) -> None:
        #: Tags committed but not yet in Redis (while Redis fails).
        self.pending: set[str] = set()
        #: The tags the courier is writing now (out of ``pending``).
        self._inflight: set[str] = set()
        #: A fan-out task is owed (the commit's call said so, or a call's reply was lost).
        self.owe_dispatch = False
        #: Counters: commits recorded, written at commit, buffered, buffers landed later,
        #: tasks sent, failed calls (slow ones: timed out), buffer overflows (to ``all``).
        self.stats = dict.fromkeys(("recorded", "at_commit", "buffered", "landed",
                                    "dispatched", "failures", "slow_failures", "overflows"), 0)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._busy = False
        self._failing_since: float | None = None  # Redis calls failing: commits buffer
        self._failed_slowly = False  # ... and the last failure was slow: without calling
        self._recovered_at = 0.0  # when a call last got through after failures (monotonic)
        self._dispatch_failing_since: float | None = None
        self._max_pending = cache_settings.get().cache_max_pending_tags

    def add(self, tags: frozenset[str]) -> None:
        """Record committed ``tags`` (the ``on_commit`` hook): returns within
        :data:`COMMIT_TIMEOUT` plus a connect, and never raises.

        While Redis fails, the call is still made at each commit if the last failure was fast
        (an error reply such as ``NOREPLICAS`` or ``READONLY`` from a master in a failover, a
        refused connection): the first commit on a master that takes writes again lands the
        buffered tags with its own, in the same call, instead of the courier's next try up
        to :data:`RETRY_LAST` later (reads served meanwhile would be stale). Only after a
        slow failure (a timeout) do commits buffer without calling, until the courier gets
        through: no commit waits out a hung Redis twice."""
        with self._cond:
            self.stats["recorded"] += 1
            if self._failing_since is not None and self._failed_slowly:
                self.stats["buffered"] += 1
                self._buffer(tags)
                return
            # Small enough to ride along within the commit's timeout; a bigger buffer (or
            # `all`, which kills everything anyway once it lands) is the courier's. Taken out
            # of ``pending``: a commit buffering the same tag meanwhile must keep it.
            carried: set[str] = set()
            if len(self.pending) <= BATCH_TAGS:
                carried, self.pending = self.pending, set()
        started = time.monotonic()
        try:
            dispatch = _record_at_commit(tags | carried)
        except Exception as exc:  # a broken cache must never fail a committed write
            with self._cond:
                self.stats["buffered"] += 1
                # The call may have run all the same (a timeout): writing it again is harmless.
                self._buffer(tags | carried)
                self._note_failure(exc, time.monotonic() - started)
                # It may also have set the pending flag, its reply lost: send a task later.
                self.owe_dispatch = True
            return
        with self._cond:
            self.stats["at_commit"] += 1
            if carried:
                self.stats["landed"] += 1
            self._recovered()
            if dispatch:
                self.owe_dispatch = True
                self._wake()

    def land_on(self, execute: Callable[..., Any]) -> None:
        """Write the buffered tags with ``execute`` (a connection of this process to a master
        it has not used before, before anything else uses it: :func:`_on_new_master`), and
        let commits call Redis again. Raises what the call raises: the connection is then
        not used (the cache reads the database)."""
        with self._cond:
            if self._failing_since is None:
                return
            # Taken out of ``pending``, as the courier takes them: a commit buffering the
            # same tag meanwhile must keep it. What the courier is writing too it may write
            # again: harmless.
            taken, self.pending = self.pending, set()
            tags = taken | self._inflight
        try:
            out = execute("EVAL", lua.RECORD_CHANGES, 2, *_record_args(tags)) if tags else 0
        except BaseException:
            with self._cond:
                self._buffer(taken)
            raise
        with self._cond:
            if tags:
                self.stats["landed"] += 1
            self._recovered()
            if out == 1:
                self.owe_dispatch = True
                self._wake()

    def idle(self) -> bool:
        """Nothing buffered, no task owed, the courier not at work."""
        with self._cond:
            return self._idle()

    def _idle(self) -> bool:
        return not (self.pending or self.owe_dispatch or self._busy)

    def _buffer(self, tags: Iterable[str]) -> None:
        """Keep ``tags`` for the courier (locked)."""
        if ALL not in self.pending:
            self.pending.update(tags)
            if len(self.pending) > self._max_pending:
                self.pending = {ALL}
                self.stats["overflows"] += 1
        self._wake()

    def _wake(self) -> None:
        """Have the courier look at the buffer and the owed task (locked)."""
        if self._thread is None:
            thread = threading.Thread(target=self._run, name="hms-cache-courier", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # no more threads, or the interpreter is exiting
                logger.warning("cache change courier could not start; changes stay buffered")
                return
            self._thread = thread
            # A graceful exit (gunicorn's max_requests, a deploy's SIGTERM) writes what is
            # buffered first, for a moment at most.
            atexit.register(flush, 2.0)
        self._cond.notify_all()

    def _note_failure(self, exc: Exception, took: float) -> None:
        """Count a failed Redis call that took ``took`` seconds; say it once per outage
        (locked). A call that started before the last recovery (the courier's, hung on the
        old master while the process reached the new one) says nothing of Redis now: its
        tags are buffered again, and commits keep calling."""
        self.stats["failures"] += 1
        if time.monotonic() - took < self._recovered_at:
            return
        self._failed_slowly = isinstance(exc, redis.TimeoutError) or took >= SLOW_FAILURE
        self.stats["slow_failures"] += self._failed_slowly
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            logger.warning(
                "cache invalidation not written at commit (%s); buffering %d tags and retrying:"
                " until they land, reads may return values older than the commit",
                type(exc).__name__, len(self.pending))

    def _recovered(self) -> None:
        """A call got through (locked): commits call Redis again."""
        since, self._failing_since = self._failing_since, None
        self._recovered_at = time.monotonic()
        if since is not None:
            logger.warning("cache invalidations written after %.1f s of Redis failures",
                           time.monotonic() - since)

    def _run(self) -> None:
        delay = RETRY_FIRST
        while True:
            with self._cond:
                while not (self.pending or self.owe_dispatch):
                    self._cond.wait()
                tags, self.pending = self.pending, set()
                self._inflight = tags
                dispatch, self.owe_dispatch = self.owe_dispatch, False
                self._busy = True
            failed = self._deliver(tags, dispatch)
            with self._cond:
                self._busy = False
                self._inflight = set()
                self._cond.notify_all()  # flush() waits for this
            if failed:
                time.sleep(delay)
                delay = min(delay * 2, RETRY_LAST)
            else:
                delay = RETRY_FIRST

    def _deliver(self, tags: set[str], dispatch: bool) -> bool:
        """Write buffered ``tags``, then send the task if owed; True if something failed
        (what failed is owed again)."""
        if tags:
            started = time.monotonic()
            try:
                dispatch = record_changes(tags, timeout=COURIER_TIMEOUT) or dispatch
            except Exception as exc:
                with self._cond:
                    self._buffer(tags)
                    self._note_failure(exc, time.monotonic() - started)
                    self.owe_dispatch = True  # its reply may be what was lost
                return True
            with self._cond:
                self.stats["landed"] += 1
                self._recovered()
        if dispatch:
            try:
                self._dispatch()
            except Exception as exc:  # the broker: the bumps landed, only fan-out waits
                with self._cond:
                    self.owe_dispatch = True
                    if self._dispatch_failing_since is None:
                        self._dispatch_failing_since = time.monotonic()
                        logger.warning("cache fan-out task not sent (%s); retrying",
                                       type(exc).__name__)
                return True
            self._dispatch_failing_since = None
        return False

    def _dispatch(self) -> None:
        # Imported here: an HMS process loads this module with its models, long before it
        # records a change, and need not build the Celery app for that.
        from hms_tasks.celery import app

        # retry=False: a broker outage must fail fast here, the courier retries itself.
        # Nobody reads this task's result: ignore_result spares the result backend a
        # subscription per commit burst (docs/scaling.md).
        app.send_task(cache_names.CACHE_FANOUT_CHANGES, retry=False, ignore_result=True)
        with self._cond:
            self.stats["dispatched"] += 1


_recorder: Recorder | None = None
_recorder_pid: int | None = None
_recorder_lock = threading.Lock()


def recorder() -> Recorder:
    """This process's recorder (a new one after fork: threads do not survive it)."""
    global _recorder, _recorder_pid
    pid = os.getpid()
    if _recorder is None or _recorder_pid != pid:
        with _recorder_lock:
            if _recorder is None or _recorder_pid != pid:
                _recorder, _recorder_pid = Recorder(), pid
    return _recorder


def _on_new_master(execute: Callable[..., Any], replid: str, switched: bool) -> None:
    """A pool of this process connects to a master it has not used before (a failover, see
    :func:`hms_tasks.store.on_new_master`): the tags this process buffered land there before
    that pool's first command, and commits call Redis again.

    Why here and not only at the next commit or the courier's next try: after a slow failure
    (the commit's call timed out on a master that hangs, or while the sentinels were slow)
    commits buffer without calling until the courier gets through, and the courier backs off.
    Meanwhile this process's reads, and other processes', were served by the new master:
    values those commits killed, read as valid. Now the first pool of the process to reach the
    new master (a read, a run report, a commit) writes them; ``tests/test_sentinel.py``
    fails without it."""
    r = _recorder
    if r is None or _recorder_pid != os.getpid() or not store.sentinel_managed(_cache_url()):
        return
    r.land_on(execute)


store.on_new_master(_on_new_master)


def flush(timeout: float = 10.0) -> bool:
    """Wait until this process's committed changes are in Redis and their task sent; False
    if that took longer than ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    r = recorder()
    with r._cond:
        while not r._idle():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            r._cond.wait(min(left, 0.05))
    return True


# -- the worker side --------------------------------------------------------------------------


@dataclass
class Applied:
    entries: int = 0
    tags: int = 0
    unlinked: int = 0
    hot: list[str] = field(default_factory=list)


def apply_changes(*, max_entries: int = 100, clear_if_empty: bool) -> Applied:
    """Take up to ``max_entries`` change-log entries and invalidate their tags, atomically.

    With ``clear_if_empty`` and the log empty afterwards, the pending flag is cleared in the
    same step, so the next recorded change dispatches a new task.
    """
    be = backend()
    out = be._scripts["APPLY_CHANGES"](keys=list(_keys()), args=[
        max_entries, be.gen_prefix, be.index_prefix, secrets.token_hex(8), GENERATION_TTL,
        heat_key(be), cache_settings.get().cache_hot_score, "1" if clear_if_empty else "0"])
    return Applied(entries=int(out[0]), tags=int(out[1]), unlinked=int(out[2]),
                   hot=[k.decode() for k in out[3:]])


def pending_entries() -> int:
    """Entries waiting in the change log."""
    return int(backend().client().llen(_keys()[0]))
