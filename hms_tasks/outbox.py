"""The publish outbox: task messages a process published over Sentinel, remembered for a
while with the master that took each, and published again when a failover discarded them.

Why. Redis replication is asynchronous, and a publish that returned can still be lost: in a
``SENTINEL FAILOVER`` the old master keeps taking writes for about a second after a replica
was promoted (it still has its other replica, so ``min-replicas-to-write`` does not refuse),
and those writes are dropped when it resyncs from the new master; a SIGKILL drops what the
replicas had not received yet. Nothing after the publish tells the caller.

How. The Sentinel transport (:class:`hms_tasks.broker.SentinelChannel`) sends each message's
``LPUSH`` with ``INFO replication`` in one pipeline, on one connection: the answer names the
master that took the message (its replication id, new at every promotion) and an offset of
its replication stream at or after the message. :meth:`Outbox.landed` keeps the message with
that (replication id, offset) for ``HMS_TASKS_PUBLISH_OUTBOX_SECONDS``. A publish that lands on
a master with another replication id is the process's first sight of a new master: a replica
promoted from the old one names it in ``master_replid2`` and gives, in ``second_repl_offset``,
where its copy of the old history ends. Every kept message of the old master at or past that
offset is one the promoted replica never had: it is published again, on the new master, with
a new delivery tag (a new master that does not descend from the old one directly: all of them).
A publish that lands on a master already known to be superseded, past the cut (a connection
still on the old master in the window), raises a connection error, so that kombu's publish
retry sends it again, to the new master.

What it costs and what it does not do. One ``INFO replication`` per publish, in the same round
trip. Duplicates: a message is published again when its offset bound is past the cut, which a
message that made it can also be (other clients' writes between its ``LPUSH`` and the
``INFO``): hms tasks are idempotent and ``acks_late``, so a duplicate runs twice, harmlessly.
The switch is also seen by the process's store clients (:func:`hms_tasks.store.on_new_master`:
a cache read, a run report), which publish the lost messages again on their first connection
to the new master. Limits: a process that neither publishes nor uses the store after the
switch keeps them until it does; a message kept shorter than the time from its publish to the
process's first sight of the new master is not published again; a master that keeps taking
writes while cut off from the sentinels but not from a replica (a partition) can lose more
than any client sees. A write in Redis is durable only once a replica has it:
docs/reliability.md, "Redis failover".

Why not a library. kombu's Redis transport has no publisher confirms, and Celery's publish
retry covers a publish that failed, not one that returned; redbeat keeps a schedule; a
transactional outbox (django-celery-outbox) keeps a message until its publish returns, which
is exactly when this loss begins. None compares a message's place in a master's replication
stream with where the promoted replica's copy ends.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis
from kombu.utils.json import dumps, loads
from kombu.utils.uuid import uuid

from hms_tasks import conf, store

__all__ = [
    "MAX_ENTRIES",
    "Master",
    "MasterSuperseded",
    "Outbox",
    "Sent",
    "outbox",
    "with_new_tag",
]

logger = logging.getLogger(__name__)

#: Messages kept at most (the oldest go first): at 200 publishes per second, a minute.
MAX_ENTRIES = 12_000
#: Superseded replication ids remembered (one per failover this process saw).
MAX_SUPERSEDED = 64


class MasterSuperseded(redis.ConnectionError):
    """A publish landed on a master that a failover already replaced, past the point where
    the promoted replica's copy of it ends: the write will be discarded. A connection error,
    so that kombu's publish retry sends the message again (to the new master)."""


@dataclass(frozen=True)
class Master:
    """What ``INFO replication`` said right after a publish, on the connection that made it."""

    replid: str
    #: ``master_repl_offset``: at or after the end of the publish in the replication stream.
    offset: int
    #: The replication id this master continued (promoted replicas), and the offset from
    #: which its copy of that history ends (``second_repl_offset``; -1: none).
    replid2: str
    second_offset: int

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> Master:
        return cls(replid=str(info.get("master_replid", "")),
                   offset=int(info.get("master_repl_offset", 0)),
                   replid2=str(info.get("master_replid2", "")),
                   second_offset=int(info.get("second_repl_offset", -1)))


@dataclass(frozen=True)
class Sent:
    """A message a master took: its Redis list, its kombu payload, where it landed."""

    key: str
    payload: str
    replid: str
    offset: int
    at: float  # time.monotonic()


def with_new_tag(payload: str) -> str:
    """``payload`` (a kombu message, JSON) with a new delivery tag: a re-published copy must
    not share the original's tag, which kombu's ``unacked`` hash and ack are keyed on."""
    message: Any = loads(payload)
    message["properties"]["delivery_tag"] = uuid()
    return str(dumps(message))


class Outbox:
    """The messages this process published over Sentinel, and the masters they went to.

    Thread-safe: kombu's publishers (any thread) call :meth:`landed` after each push, and
    :meth:`unclaim` when pushing the messages it returned failed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: deque[Sent] = deque()
        #: Superseded replication id -> offset from which its writes are lost (0: all).
        self._superseded: dict[str, int] = {}
        self._current: str | None = None
        #: Messages known lost, taken by no publisher yet (or whose re-publish failed).
        self._pending: list[Sent] = []
        self.stats = {"kept": 0, "republished": 0, "refused": 0, "expired_full": 0}

    def landed(self, master: Master, pushed: Iterable[tuple[str, str]], *, seconds: float,
               republished: bool = False) -> list[Sent]:
        """Keep ``pushed`` ((list key, payload) pairs) as taken by ``master``; returns the
        messages to publish again now, on this same master (claimed: :meth:`unclaim` them if
        that fails). Raises :class:`MasterSuperseded` when ``master`` is an old master past
        its cut: nothing is kept then, but ``republished`` messages stay to be re-published."""
        now = time.monotonic()
        with self._lock:
            self._prune(now, seconds)
            if master.replid != self._current and master.replid not in self._superseded:
                self._new_master(master)
            cut = self._superseded.get(master.replid)
            if cut is not None and master.offset >= cut:
                self.stats["refused"] += 1
                if republished:
                    self._pending.extend(Sent(key, payload, master.replid, master.offset, now)
                                         for key, payload in pushed)
                raise MasterSuperseded(
                    "a publish landed on a Redis master that a failover replaced: retried on "
                    "the new master")
            for key, payload in pushed:
                self._entries.append(Sent(key, payload, master.replid, master.offset, now))
                self.stats["kept"] += 1
            while len(self._entries) > MAX_ENTRIES:
                self._entries.popleft()
                self.stats["expired_full"] += 1
            claimed, self._pending = self._pending, []
            self.stats["republished"] += len(claimed)
        if claimed:
            logger.warning("Redis failover: publishing %d task message(s) again that the old "
                           "master took after the promotion (or had not replicated)",
                           len(claimed))
        return claimed

    def unclaim(self, entries: Iterable[Sent]) -> None:
        """Messages :meth:`landed` returned whose re-publish failed: keep them for the next."""
        with self._lock:
            entries = list(entries)
            self._pending.extend(entries)
            self.stats["republished"] -= len(entries)

    def kept(self) -> int:
        """Messages kept (for tests and the benchmark)."""
        with self._lock:
            return len(self._entries) + len(self._pending)

    def _prune(self, now: float, seconds: float) -> None:
        while self._entries and now - self._entries[0].at > seconds:
            self._entries.popleft()

    def _new_master(self, master: Master) -> None:
        """``master`` replaces every other master this process published to: the messages
        each of those took past its cut (where ``master``'s copy of its history ends; all of
        them when ``master`` does not continue it) become pending."""
        others = {e.replid for e in self._entries}
        if self._current is not None:
            others.add(self._current)
        others.discard(master.replid)
        for replid in others:
            if replid not in self._superseded:
                continued = replid == master.replid2 and master.second_offset >= 0
                self._superseded[replid] = master.second_offset if continued else 0
        while len(self._superseded) > MAX_SUPERSEDED:
            del self._superseded[next(iter(self._superseded))]
        keep: deque[Sent] = deque()
        for entry in self._entries:
            cut = self._superseded.get(entry.replid)
            if cut is not None and entry.offset >= cut:
                self._pending.append(entry)
            else:
                keep.append(entry)
        self._entries = keep
        self._current = master.replid


#: The process's outbox (kombu's channels of every connection share it).
outbox = Outbox()


def _text(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def _info(execute: Callable[..., Any]) -> Master:
    fields = dict(line.split(":", 1) for line in _text(execute("INFO", "replication"))
                  .splitlines() if ":" in line)
    return Master.from_info({k: v.strip() for k, v in fields.items()})


def _on_new_master(execute: Callable[..., Any], replid: str, switched: bool) -> None:
    """A store client's first connection to a master (:func:`hms_tasks.store.on_new_master`):
    publish again, there, what the outbox knows a failover discarded, so that a process that
    publishes nothing after the switch but uses the store (a cache read, a run report) does
    not keep them until its next publish. The store runs it only on a connection to its own
    database, the broker's."""
    seconds = conf.get().publish_outbox_seconds
    box = outbox
    if not seconds or not box.kept():
        return
    try:
        again = box.landed(_info(execute), [], seconds=seconds)
        while again:
            copies = [(entry.key, with_new_tag(entry.payload)) for entry in again]
            try:
                for key, payload in copies:
                    execute("LPUSH", key, payload)
                master = _info(execute)
            except BaseException:
                box.unclaim(again)
                raise
            again = box.landed(master, copies, seconds=seconds, republished=True)
    except MasterSuperseded:
        return  # an old master: the store's own retry finds the new one
    except redis.ResponseError:
        # INFO refused (an ACL user without it): the messages wait for the process's next
        # publish, which warns that the outbox is off.
        return


store.on_new_master(_on_new_master)


def _forget_in_child() -> None:
    # A prefork child starts with a copy of its parent's outbox: messages it never sent.
    global outbox
    outbox = Outbox()


os.register_at_fork(after_in_child=_forget_in_child)
