"""Invalidation fan-out: from a model change in the HMS to its cached values gone.

Write path, in every HMS process (web or worker)::

    post_save / post_delete of a registered model (or an InvalidatingQuerySet bulk change)
      -> the tags it touches (for tracked fields, the values it was loaded with as well)
      -> transaction.on_commit          (nothing on rollback; savepoints honoured)
      -> the process's Recorder         (in memory: a set, so a burst of changes coalesces)
      -> its flusher thread: one Lua call appends the tags to the change log in Redis and
         says whether a fan-out task must be sent (one per burst, not one per change)
      -> hms.cache.fanout_changes       (on a worker)

The HMS's write never waits for Redis or the broker and never fails because of them: the
flusher works in the background. If Redis or the broker is down, tags stay buffered (the failure
is counted and logged once per outage) and are flushed, and the task sent, when they are back;
past ``HMS_TASKS_CACHE_MAX_PENDING_TAGS`` buffered tags the process invalidates the whole cache
instead (the ``all`` tag), so memory stays bounded and nothing stale survives. What is not
covered: a process killed (SIGKILL, OOM) in the milliseconds between a commit and its flush
loses that commit's invalidation; the value then lives until its TTL.

Worker side: :func:`apply_changes` takes batches off the change log and invalidates their tags
in the same atomic Lua step, so a worker dying half-way loses nothing either.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Any

from django.db import models, transaction
from django.db.models.signals import post_delete, post_init, post_save

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
#: How long the flusher lets changes gather after the first one (seconds): a burst becomes
#: one log entry and one task, and a busy HMS process pays for one flush per this much time
#: rather than one per commit, at the cost of this much latency (well inside the 50 ms p99
#: budget from commit to keys gone).
LINGER = 0.01
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


# -- the flusher ------------------------------------------------------------------------------


@dataclass
class Recorder:
    """The process's buffer of committed changes, flushed to Redis by a background thread."""

    pending: set[str] = field(default_factory=set)
    owe_dispatch: bool = False
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("recorded", "flushed_entries", "dispatched", "failures", "overflows"), 0))
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _thread: threading.Thread | None = None
    _busy: bool = False
    _failing_since: float | None = None
    _max_pending: int = field(default_factory=lambda: conf.get().cache_max_pending_tags)

    def add(self, tags: Iterable[str]) -> None:
        """Take committed tags (called from ``on_commit``: must be cheap and never raise)."""
        with self._cond:
            was_empty = not self.pending
            self.pending.update(tags)
            self.stats["recorded"] += 1
            if len(self.pending) > self._max_pending:
                self.pending = {ALL}
                self.stats["overflows"] += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hms-cache-changes",
                                                daemon=True)
                self._thread.start()
            if was_empty:  # otherwise the flusher is already on its way
                self._cond.notify()

    def idle(self) -> bool:
        with self._cond:
            return not self.pending and not self.owe_dispatch and not self._busy

    def _run(self) -> None:
        backoff = 0.05
        while True:
            with self._cond:
                while not self.pending and not self.owe_dispatch:
                    self._cond.wait()
            time.sleep(LINGER)
            with self._cond:
                tags, self.pending = self.pending, set()
                self._busy = True
            try:
                if tags:
                    self._flush(tags)
                if self.owe_dispatch:
                    self._dispatch()
            except Exception as exc:
                with self._cond:
                    self.pending |= tags if ALL not in self.pending else set()
                    self._busy = False
                self._failed(exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            with self._cond:
                self._busy = False
            backoff = 0.05
            if self._failing_since is not None:
                logger.warning("cache change log reachable again after %.1f s; flushed",
                               time.monotonic() - self._failing_since)
                self._failing_since = None

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
        self.owe_dispatch = False
        self.stats["dispatched"] += 1

    def _failed(self, exc: Exception) -> None:
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
