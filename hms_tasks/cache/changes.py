"""Invalidation fan-out: from a model change in the HMS to its cached values gone.

Write path, in every HMS process (web or worker)::

    post_save / post_delete of a registered model (or an InvalidatingQuerySet bulk change)
      -> the tags it touches (for tracked fields, the values it was loaded with as well)
      -> transaction.on_commit          (nothing on rollback; savepoints honoured)
      -> the process's Recorder: the committing thread writes the tags to the change log in
         Redis (one Lua call, on the recorder's own connection, the reply not awaited), at
         once or with the rest of the current 10 ms (see :class:`Recorder`)
      -> its flusher thread reads the replies; one says whether a fan-out task must be sent
         (one per burst, not one per change)
      -> hms.cache.fanout_changes       (on a worker)

The HMS's write never waits for an answer from Redis or the broker and never fails because of
them. If Redis or the broker is down or does not answer, tags stay buffered (the failure is
counted and logged once per outage) and are written, and the task sent, when they are back;
past ``HMS_TASKS_CACHE_MAX_PENDING_TAGS`` buffered tags the process invalidates the whole cache
instead (the ``all`` tag), so memory stays bounded and nothing stale survives. A process that
exits gracefully writes what it holds first (for 2 s at most: an ``atexit`` hook, and Celery's
``worker_process_shutdown`` for pool processes). What is not covered: a process killed
(SIGKILL, OOM) in the milliseconds between a commit and the write of its tags loses that
commit's invalidation; the value then lives until its TTL.

Worker side: :func:`apply_changes` takes batches off the change log and invalidates their tags
in the same atomic Lua step, so a worker dying half-way loses nothing either.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import secrets
import select
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Any

from django.db import models, transaction
from django.db.models.signals import post_delete, post_init, post_save
from redis.exceptions import ResponseError

from hms_tasks import conf, names
from hms_tasks.cache.backend import GENERATION_TTL
from hms_tasks.cache.core import backend, heat_key
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
    "recorder",
]

logger = logging.getLogger(__name__)

#: Tags per change-log entry: bounds the work of one atomic apply step.
BATCH_TAGS = 1000
#: Seconds the "a fan-out task is pending" flag lives if its task is lost.
PENDING_TTL = 30
#: The most a process writes to the change log is one command per this much time (seconds):
#: changes committed within it of the last write gather and go with the next. A busy HMS
#: process pays for one write per LINGER rather than one per commit, at the cost of up to this
#: much latency (well inside the 50 ms p99 budget from commit to keys gone).
LINGER = 0.01
#: Bytes a process may have in flight (written, not yet answered) on its direct connection;
#: past this, changes gather for the flusher instead. Below what the sockets' buffers hold, so
#: a commit's write never blocks, even when Redis stops reading.
MAX_IN_FLIGHT_BYTES = 16 * 1024
#: A reply this late (seconds) means Redis or the connection is gone: its tags go back to the
#: flusher, which retries with backoff.
REPLY_TIMEOUT = 2.0
#: A process that sent nothing for this long (seconds) is quiet: its next command's reply is
#: read by the flusher at once (it probably says to send the fan-out task: the last task
#: stopped after 0.1 s without changes). Replies of commands in flight this long after the
#: last send are read by the flusher too; the rest are read by the commits that follow.
QUIET = 0.05
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


@dataclass
class _Direct:
    """The recorder's own Redis connection, written to without waiting for replies."""

    conn: Any
    prefix: bytes  # EVALSHA <sha> 2 <log> <flag>, packed once
    suffix: bytes  # the pending flag's TTL, packed once
    in_flight: deque[tuple[float, frozenset[str], int]] = field(default_factory=deque)
    in_flight_bytes: int = 0
    last_send: float = 0.0
    #: A command whose reply the flusher must read as soon as it comes (see Recorder.add).
    urgent: bool = False

    @classmethod
    def open(cls) -> _Direct:
        be = backend()
        pool = be.client().connection_pool
        # A connection of its own (same parameters as the pool's), never returned to the
        # pool: replies are read later, so nobody else may use it.
        conn = pool.connection_class(**{**pool.connection_kwargs,
                                        "socket_timeout": REPLY_TIMEOUT})
        conn.connect()
        sha = be._scripts["RECORD_CHANGES"].sha
        parts = [b"EVALSHA", sha.encode(), b"2", *(k.encode() for k in _keys())]
        # RESP by hand: the command's first five arguments never change, so a commit packs
        # only its entry (redis-py's pack_command would redo all seven).
        prefix = b"*7\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        ttl = str(PENDING_TTL).encode()
        return cls(conn=conn, prefix=prefix, suffix=b"$%d\r\n%s\r\n" % (len(ttl), ttl))

    def send(self, tags: frozenset[str]) -> bool:
        """Write the command appending ``tags``; False if it would not fit in flight."""
        entry = json.dumps(sorted(tags)).encode()
        command = b"%s$%d\r\n%s\r\n%s" % (self.prefix, len(entry), entry, self.suffix)
        if self.in_flight_bytes + len(command) > MAX_IN_FLIGHT_BYTES:
            return False
        self._check_open()
        self.conn.send_packed_command([command], check_health=False)
        self.last_send = time.monotonic()
        self.in_flight.append((self.last_send, tags, len(command)))
        self.in_flight_bytes += len(command)
        return True

    def replies(self) -> Iterator[tuple[frozenset[str], Any]]:
        """The replies that have arrived, with the tags they acknowledge (never blocks long:
        a reply that has begun to arrive is read to its end)."""
        self._check_open()
        while self.in_flight and self.conn.can_read(0):
            try:
                reply = self.conn.read_response()
            except ResponseError as exc:
                reply = exc
            _, tags, size = self.in_flight.popleft()
            self.in_flight_bytes -= size
            yield tags, reply

    def _check_open(self) -> None:
        # redis-py reconnects a closed connection by itself; here that would pair the new
        # connection's replies with the old one's commands.
        if self.conn._sock is None:
            raise ConnectionError("the recorder's connection was closed")

    def close(self) -> set[str]:
        """Drop the connection; the tags it had not acknowledged, to be sent again."""
        self.conn.disconnect()
        return set[str]().union(*(tags for _, tags, _ in self.in_flight))


@dataclass
class Recorder:
    """The process's committed changes on their way to the change log in Redis.

    The committing thread writes them itself, on the recorder's own connection, without
    waiting for the reply: at once when nothing was sent in the last :data:`LINGER`, otherwise
    gathered in ``pending`` and written by the first commit after that (a busy process writes
    one entry per ``LINGER``, not one per commit). A background thread, the flusher, writes
    what gathered when no commit follows, reads the replies the commits left unread, sends the
    fan-out task when a reply says so, and takes back the tags of any command that failed or
    went unanswered. Until that connection is up, or while it is down, the flusher appends
    ``pending`` with a round trip of its own, with backoff.

    Why the committing thread, not the flusher, does the writing: on a 2-core machine the
    flusher's wake-ups and the GIL hand-offs around its round trips were most of the write
    path's overhead, and every buffered change waited for them.
    """

    pending: set[str] = field(default_factory=set)
    owe_dispatch: bool = False
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("recorded", "sent", "flushed_entries", "dispatched", "failures", "overflows"), 0))
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _thread: threading.Thread | None = None
    _direct: _Direct | None = None
    _pending_since: float = 0.0
    _sleeping: bool = False
    _busy: bool = False
    _failing_since: float | None = None
    _max_pending: int = field(default_factory=lambda: conf.get().cache_max_pending_tags)

    def add(self, tags: frozenset[str]) -> None:
        """Take committed tags (called from ``on_commit``: must be cheap and never raise)."""
        with self._cond:
            self.stats["recorded"] += 1
            if self._thread is None:
                self._start_flusher()
            direct = self._direct
            if direct is not None and time.monotonic() - direct.last_send >= LINGER:
                batch = frozenset(self.pending | tags) if self.pending else tags
                if self._send(direct, batch):
                    return
            if not self.pending:
                self._pending_since = time.monotonic()
                if self._sleeping:  # otherwise it looks again within LINGER anyway
                    self._cond.notify()  # it writes them if no commit comes in time
            self.pending.update(tags)
            if len(self.pending) > self._max_pending:
                self.pending = {ALL}
                self.stats["overflows"] += 1

    def _start_flusher(self) -> None:
        thread = threading.Thread(target=self._run, name="hms-cache-changes", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no more threads, or the interpreter is exiting: next time
            logger.warning("cache change flusher could not start; changes stay buffered")
            return
        self._thread = thread
        # A graceful exit (gunicorn's max_requests, a deploy's SIGTERM) writes what is
        # buffered first, for a moment at most.
        atexit.register(flush, 2.0)

    def _send(self, direct: _Direct, batch: frozenset[str]) -> bool:
        """Write ``batch`` on the direct connection (locked); False: it could not be."""
        # Replies first: they make room under the in-flight cap, and a dead connection is
        # found here rather than by the write.
        self._take_replies(direct)
        if direct is not self._direct or len(batch) > BATCH_TAGS:
            return False
        # After a quiet spell the reply probably says "send the fan-out task" (the last one
        # stopped when the log ran dry): the flusher reads it at once. In a stream of
        # commits, a later commit reads it.
        quiet = time.monotonic() - direct.last_send > QUIET
        try:
            if not direct.send(batch):
                return False
        except Exception as exc:
            self._drop_direct(exc)
            return False
        self.stats["sent"] += 1
        self.pending = set()
        direct.urgent |= quiet
        if quiet or self._sleeping or self.owe_dispatch:
            self._cond.notify()
        return True

    def idle(self) -> bool:
        with self._cond:
            return not (self.pending or self.owe_dispatch or self._busy
                        or (self._direct is not None and self._direct.in_flight))

    def _take_replies(self, direct: _Direct) -> None:
        """Take in the replies that have arrived (locked)."""
        try:
            for tags, reply in direct.replies():
                if isinstance(reply, Exception):
                    # NOSCRIPT (Redis restarted or its scripts flushed): the flusher's round
                    # trip loads the script again, then reopens the direct connection.
                    self._requeue(tags)
                    raise reply
                if reply == 1:
                    self.owe_dispatch = True
            if direct.in_flight and time.monotonic() - direct.in_flight[0][0] > REPLY_TIMEOUT:
                raise TimeoutError(f"no reply from Redis in {REPLY_TIMEOUT} s")
        except Exception as exc:
            self._drop_direct(exc)

    def _requeue(self, tags: Iterable[str]) -> None:
        if not self.pending:
            self._pending_since = time.monotonic()
        if ALL not in self.pending:
            self.pending.update(tags)

    def _drop_direct(self, exc: Exception) -> None:
        """Close the direct connection, its unacknowledged tags back to pending (locked)."""
        assert self._direct is not None
        unacked, self._direct = self._direct.close(), None
        if unacked:
            self._requeue(unacked)
            # Some of them may have run, one of them setting the pending flag whose reply we
            # lost: without a task of ours, fan-out would wait for the flag to expire. An
            # extra task is harmless.
            self.owe_dispatch = True
        self._note_failure(exc)
        self._cond.notify()

    def _next_job(self) -> str:
        """Wait until there is something to do (locked): "slow" (append ``pending`` with a
        round trip, send the fan-out task if owed), "dispatch" (send it), "send" (write
        ``pending`` on the direct connection) or "replies" (read them)."""
        while True:
            direct, now = self._direct, time.monotonic()
            if self.pending and direct is None:
                return "slow"
            if self.owe_dispatch:
                return "dispatch"  # pending, if any, goes on the direct connection after
            if direct is not None and direct.in_flight and (
                    direct.urgent or now - direct.last_send >= QUIET
                    or direct.in_flight_bytes > MAX_IN_FLIGHT_BYTES // 2):
                return "replies"
            if self.pending:
                due = self._pending_since + LINGER
                if now >= due:
                    return "send"
                self._cond.wait(due - now)
            elif direct is not None and direct.in_flight:
                waited = now - direct.last_send
                # Commits are flowing: look again within LINGER rather than be woken by each
                # window's first buffered change (a wake-up, and a GIL hand-off, per window).
                self._cond.wait(min(QUIET - waited, LINGER))
            else:
                self._sleeping = True
                self._cond.wait()
                self._sleeping = False

    def _run(self) -> None:
        while True:
            try:
                self._loop()
            except Exception:  # a bug must not stop recording for the life of the process
                logger.exception("cache change flusher failed; restarting it")
                with self._cond:
                    self._busy = False
                time.sleep(1)

    def _loop(self) -> None:
        backoff = 0.05
        while True:
            with self._cond:
                job, direct = self._next_job(), self._direct
                if job == "send" and (direct is None
                                      or not self._send(direct, frozenset(self.pending))):
                    job = "slow"
            if job == "replies" and direct is not None:
                # Wait for the replies without the lock or the GIL, then take them in. (poll,
                # not select: select refuses descriptors past 1024.)
                with contextlib.suppress(OSError, AttributeError, ValueError):  # closed
                    poller = select.poll()
                    poller.register(direct.conn._sock.fileno(), select.POLLIN)
                    poller.poll(100)
                with self._cond:
                    if direct is self._direct:
                        self._take_replies(direct)
                        direct.urgent = bool(direct.urgent and direct.in_flight)
            if job not in ("slow", "dispatch"):
                continue
            with self._cond:
                tags: set[str] = set()
                if job == "slow":
                    tags, self.pending = self.pending, set()
                self._busy = True
            try:
                if tags:
                    self._flush(tags)
                    tags = set()
                with self._cond:
                    dispatch, self.owe_dispatch = self.owe_dispatch, False
                if dispatch:
                    self._dispatch()
                if self._direct is None:
                    opened = _Direct.open()
                    with self._cond:
                        self._direct = opened
            except Exception as exc:
                with self._cond:
                    self._requeue(tags)
                    # A failed append or dispatch may have set the pending flag (the reply was
                    # lost, or the task was): send a task when the retry succeeds.
                    self.owe_dispatch = True
                    self._busy = False
                    self._note_failure(exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            with self._cond:
                self._busy = False
                since, self._failing_since = self._failing_since, None
            backoff = 0.05
            if since is not None:
                logger.warning("cache change log reachable again after %.1f s; flushed",
                               time.monotonic() - since)

    def _flush(self, tags: set[str]) -> None:
        be = backend()
        keys = list(_keys())
        record = be._scripts["RECORD_CHANGES"]
        ordered = sorted(tags)
        # One EVALSHA per entry, not a pipeline: a pipeline of scripts first asks SCRIPT
        # EXISTS, a second round trip, and almost every flush is a single entry.
        for start in range(0, len(ordered), BATCH_TAGS):
            entry = json.dumps(ordered[start:start + BATCH_TAGS])
            if record(keys=keys, args=[entry, PENDING_TTL]) == 1:
                self.owe_dispatch = True
            self.stats["flushed_entries"] += 1

    def _dispatch(self) -> None:
        # Imported here: an HMS process loads this module with its models, long before it
        # records a change, and need not build the Celery app for that.
        from hms_tasks.celery import app

        # retry=False: a broker outage must fail fast here, the flusher retries itself.
        app.send_task(names.CACHE_FANOUT_CHANGES, retry=False)
        self.stats["dispatched"] += 1

    def _note_failure(self, exc: Exception) -> None:
        self.stats["failures"] += 1
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            logger.warning("cache changes not flushed (%s); buffering %d tags and retrying",
                           type(exc).__name__, len(self.pending))


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


def flush(timeout: float = 10.0) -> bool:
    """Wait until this process's committed changes are in Redis and their task sent."""
    deadline = time.monotonic() + timeout
    r = recorder()
    while not r.idle():
        if time.monotonic() > deadline:
            return False
        with r._cond:
            r._cond.notify()
        time.sleep(0.001)
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
        heat_key(be), conf.get().cache_hot_score, "1" if clear_if_empty else "0"])
    return Applied(entries=int(out[0]), tags=int(out[1]), unlinked=int(out[2]),
                   hot=[k.decode() for k in out[3:]])


def pending_entries() -> int:
    """Entries waiting in the change log."""
    return int(backend().client().llen(_keys()[0]))
