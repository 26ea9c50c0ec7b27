"""kombu's Redis transport, guarded so that no message on a queue can crash a worker.

kombu turns each queue entry into a message inside the transport, before any Celery hook runs:
an entry that is not JSON, lacks the envelope fields, or has a body that is not valid base64
raises there, and the worker exits (the entry, already popped, is lost). This transport
subclass (``CELERY_BROKER_TRANSPORT = "hms_tasks.broker:Transport"``, set by default for
``redis://`` and ``rediss://`` broker URLs) changes only that:

- :class:`Message` checks the envelope first; a broken one becomes an empty stub message that
  carries the reason in ``hms_problem`` (never the body), so it is tracked in ``unacked`` like
  any other and the worker's guard (:mod:`hms_tasks.worker_guard`) dead-letters and acks it;
- base64 bodies are decoded strictly (kombu's decoder skips invalid characters);
- an entry that is not JSON at all is dead-lettered where kombu parses it.

Taking a message is one atomic step (:data:`TAKE`, :meth:`Channel._brpop_start`). kombu pops it
with ``BRPOP`` and then records it in ``unacked``; when Redis dies after the pop but before its
reply reached the worker (a ``SIGTERM`` runs the shutdown in the event-loop turn that popped,
with the reply unsent; a kill can come between the AOF write and the reply), the message was
gone from Redis and never in the worker: lost (1 to 3 messages a graceful restart under
four busy consumers, tests/faults/test_take.py).
Here a Lua script pops the message and records it in ``unacked`` together, and notes its tag
under the channel's own key; a take whose reply never came is restored from that key on
reconnect, like the parked tags below.

It also keeps a Redis crash from stopping the worker or losing a message (:class:`QoS`). When
the connection to Redis is lost, Celery closes it and kombu restores the channel's unacked
messages to their queues, AMQP-style: the delivery tags of a closed channel cannot be acked any
more. With Redis down that restore cannot run, and after Celery collected the connection kombu
raised ``AttributeError: 'NoneType' object has no attribute 'hostname'`` (kombu#970), which
stopped the worker ("Unrecoverable error"). Here the tags that could not be restored are
*parked* in the process, and the next channel that connects to the same Redis restores them
(they are still in Redis's ``unacked`` hash, which the AOF keeps); an ack or reject arriving
later on the closed channel is dropped instead of deleting a message that is being restored.
Every message whose task had started therefore runs again, at once after the reconnect rather
than after the visibility timeout (all hms tasks are idempotent and ``acks_late``).

Publishing: a channel closed under a publish by kombu's nested retry is a connection error
(the publish is retried) instead of an ``AttributeError`` (:meth:`Channel.basic_publish`);
over Sentinel, each push also tells the publish outbox which master took the message
(:mod:`hms_tasks.outbox`: what a failover discards is published again). Everything else
(restores on a live connection, visibility timeout) is kombu's own.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Collection, Iterator, Sequence
from queue import Empty
from typing import Any
from urllib.parse import urlsplit

import redis
from celery.backends import redis as celery_redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from hms_tasks import conf, deadletter, outbox, store

__all__ = [
    "SENTINEL_BACKEND",
    "SENTINEL_TRANSPORT",
    "TRANSPORT",
    "Channel",
    "Message",
    "QoS",
    "SentinelBackend",
    "SentinelChannel",
    "SentinelTransport",
    "Transport",
    "keep_sentinels",
    "parked",
    "pause_on_noreplicas",
    "transport_for",
]

logger = logging.getLogger(__name__)

#: Seconds a publish refused for want of replicas (``NOREPLICAS``) waits before kombu's
#: publish retry tries again (:func:`pause_on_noreplicas`): with the 20 retries of
#: ``task_publish_retry_policy``, a publish rides out about 5 s of a master refusing writes,
#: then raises in the caller.
NOREPLICAS_PAUSE = 0.25
#: The value of ``broker_transport`` that selects this transport.
TRANSPORT = "hms_tasks.broker:Transport"
#: The same, over Redis Sentinel (``sentinel://`` broker URLs).
SENTINEL_TRANSPORT = "hms_tasks.broker:SentinelTransport"
#: Celery's result backend over Sentinel, as ``<this>+sentinel://...`` selects it.
SENTINEL_BACKEND = "hms_tasks.broker:SentinelBackend"


def transport_for(broker_url: str) -> str | None:
    """This transport for a Redis broker URL (its Sentinel variant for ``sentinel://``); None
    (kombu's choice) for any other scheme."""
    scheme = urlsplit(broker_url).scheme
    if scheme == "sentinel":
        return SENTINEL_TRANSPORT
    return TRANSPORT if scheme in ("redis", "rediss") else None


def keep_sentinels(urls: Sequence[str]) -> Iterator[str]:
    """Celery's ``broker_failover_strategy`` for ``sentinel://`` broker URLs (set with the
    sentinels). kombu takes each URL of a list for another broker and, on a connection
    error, switches to the next one; a switch to a URL also replaces the transport with the
    one its scheme names (kombu's own Sentinel transport, without the guards here). The URLs
    are the sentinels of one master, which the transport asks at each connect anyway: this
    strategy stays, naming the first URL's host only (a bare host keeps the transport)."""
    return itertools.repeat(urlsplit(urls[0]).hostname or "" if urls else "")


def pause_on_noreplicas(exc: BaseException, interval: float) -> None:
    """kombu's ``Connection.ensure`` errback, in ``task_publish_retry_policy`` with sentinels:
    after a master refused a publish (or the declaration before it) for want of replicas,
    wait :data:`NOREPLICAS_PAUSE` before the retry. Nothing was written, and the master
    refuses until the sentinels give it a replica, about a second after a promotion; kombu's
    retry reconnects first, which succeeds at once here, so without a pause its retries went
    by within milliseconds and the publish raised in the caller."""
    if isinstance(exc, store.NoReplicasError):
        time.sleep(NOREPLICAS_PAUSE)


def _stub(payload: Any) -> dict[str, Any]:
    """An empty message with the original's delivery tag and routing, when those are usable."""
    props = payload.get("properties") if isinstance(payload, dict) else None
    props = props if isinstance(props, dict) else {}
    info = props.get("delivery_info")
    info = info if isinstance(info, dict) else {}
    tag = props.get("delivery_tag")
    return {
        "body": None, "headers": {}, "content-type": None, "content-encoding": None,
        "properties": {
            "delivery_tag": tag if isinstance(tag, str) else uuid.uuid4().hex,
            "delivery_info": {
                k: v if isinstance(v := info.get(k), str) else ""
                for k in ("exchange", "routing_key")
            },
        },
    }


class Message(virtual.Message):
    """kombu's message, built from a stub when the envelope or its body does not decode."""

    #: Why the message cannot be delivered to Celery, or None.
    hms_problem: str | None = None
    #: The queue entry (parsed), as kombu stores it in ``unacked``.
    hms_payload: Any = None

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        #: When it was taken (monotonic): an ack Redis refused is written later only while
        #: the visibility timeout cannot have handed it out again (:meth:`QoS.ack`).
        self.hms_taken_at = time.monotonic()
        reason = deadletter.envelope_problem(payload)
        if reason is None:
            try:
                super().__init__(payload, channel=channel, **kwargs)
                self.hms_payload = payload
                return
            except (ValueError, TypeError, binascii.Error):
                reason = "body does not decode with its body_encoding"
        self.hms_payload = _stub(payload)
        super().__init__(self.hms_payload, channel=channel, **kwargs)
        self.hms_problem = reason


#: Delivery tags whose restore failed when their channel closed, by (broker, unacked hash).
_parked: dict[tuple[str, str], set[str]] = {}
#: The take keys (:data:`TAKE`) of channels closed with Redis away, by broker: the tag each
#: names is restored too (the take's reply may never have come).
_takes: dict[tuple[str, str], set[str]] = {}
#: Seconds an ack Redis refused must still leave before the visibility timeout to be written
#: later: clock skew between workers, as ``hms_tasks.celery.COUNTDOWN_MARGIN`` (which
#: imports this module).
ACK_MARGIN = 10
#: Acks Redis refused or lost (a master refusing writes in a failover), by broker: delivery
#: tag -> the deadline (monotonic) for writing it (:meth:`QoS.ack`, :meth:`Channel.settle_acks`).
_owed_acks: dict[tuple[str, str], dict[str, float]] = {}
_parked_lock = threading.Lock()

#: One take of a message, atomic in Redis: pop the first message off the channel's queue lists
#: (KEYS[1..n], in kombu's BRPOP order) and, when its list is consumed with acks (ARGV[2 + i]
#: is "1"), record it in ``unacked`` (KEYS[n+1]) and its index (KEYS[n+2], score ARGV[1])
#: exactly as kombu's ``QoS.append`` does (``[message, exchange, routing key]``, the message
#: as it was queued), and note its tag under the channel's take key (KEYS[n+3], expiring
#: after ARGV[2] s). Returns [list, message, tag], with tag nil when nothing was recorded (a
#: no-ack queue such as a control reply's, or an entry that is not a well-formed envelope,
#: which the worker's guard dead-letters); nil when every list is empty. The message is never
#: re-encoded (cjson would turn ``[]`` into ``{}``).
TAKE = """
local n = #KEYS - 3
for i = 1, n do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, msg = pcall(cjson.decode, item)
    local props = ok and type(msg) == 'table' and msg['properties']
    local info = type(props) == 'table' and props['delivery_info']
    local tag = type(info) == 'table' and props['delivery_tag']
    if ARGV[i + 2] == '1' and type(tag) == 'string' and type(info['exchange']) == 'string'
        and type(info['routing_key']) == 'string' then
      redis.call('HSET', KEYS[n + 1], tag, '[' .. item .. ',' .. cjson.encode(info['exchange'])
                 .. ',' .. cjson.encode(info['routing_key']) .. ']')
      redis.call('ZADD', KEYS[n + 2], ARGV[1], tag)
      redis.call('SET', KEYS[n + 3], tag, 'EX', ARGV[2])
      return {KEYS[i], item, tag}
    end
    return {KEYS[i], item}
  end
end
return false
"""
#: Seconds an idle channel waits, in Redis, before it takes again after a take that found
#: every queue empty. A take cannot block (no script can), and Redis has no blocking wait on
#: several lists that leaves the message in place; so this is the pick-up latency of a task
#: published to idle workers. Redis ends the wait at its next timer tick (every 100 ms at the
#: default ``hz 10``): measured, 101 ms median and 202 ms p95 (``make bench BENCH=take``; BRPOP
#: 1.2 ms), for 5 to 10 takes a second per idle worker.
IDLE_WAIT = 0.1


def parked() -> int:
    """How many messages (and takes whose reply may have been lost) wait in this process for
    a connection to restore them."""
    with _parked_lock:
        return (sum(len(tags) for tags in _parked.values())
                + sum(len(keys) for keys in _takes.values()))


def _park(key: tuple[str, str], tags: list[str], takes: Sequence[str] = ()) -> None:
    if tags or takes:
        with _parked_lock:
            _parked.setdefault(key, set()).update(tags)
            _takes.setdefault(key, set()).update(takes)
        logger.warning("Redis unreachable: %d unacked message(s) and %d take(s) whose reply "
                       "may be lost will be restored to their queues when the worker "
                       "reconnects", len(tags), len(takes))


def _restore(channel: Channel, tags: list[str], takes: list[str], client: Any = None, *,
             held: Collection[str] = ()) -> int:
    """Restore ``tags`` and the tag each of ``takes`` (take keys) names, once each, to their
    queues with kombu's own step (one WATCH/MULTI transaction per tag: a tag no longer in
    ``unacked`` is skipped), except a take's tag in ``held`` (delivered, still running: the
    take key still names it when a later take never reached Redis); then delete the take
    keys. On a connection error, parks what is left (a take key whose tag was read is not
    parked again: its tag is). Returns how many tags were restored or skipped."""
    this: Any = channel
    qos: Any = channel.qos
    prefix = this.global_keyprefix
    with _parked_lock:
        # A message whose ack Redis refused ran: it is not put back on its queue (where
        # another worker could take it before the ack lands and erases that delivery's
        # record); if the ack never lands, the visibility timeout hands it out again.
        ran = set(_owed_acks.get(channel.hms_broker, ()))
    held = {*held, *ran}
    todo = list(dict.fromkeys(tag for tag in tags if tag not in ran))
    read = done = 0
    try:
        with this.conn_or_acquire(client) as conn:
            for take in takes:
                # kombu's prefixing client prefixes DEL but not GET.
                tag = conn.get(prefix + take)
                read += 1
                if tag is not None and (tag := tag.decode()) not in todo and tag not in held:
                    todo.append(tag)
            for tag in todo:
                qos.restore_by_tag(tag, client=conn)
                done += 1
            if takes:
                conn.delete(*takes)
    except channel.hms_connection_errors:
        _park(channel.hms_broker, todo[done:], takes[read:])
    return done


#: Error replies of a Redis that does not take writes for now: a master short of replicas
#: (a failover), demoted, failing to persist, loading its data after a restart.
_FOR_NOW = ("NOREPLICAS", "READONLY", "MISCONF", "LOADING", "MASTERDOWN")
#: Broker -> tags whose requeue (a reject with requeue) Redis refused: put back on their
#: queues before the channel's next take (:meth:`Channel.settle_requeues`).
_owed_requeues: dict[tuple[str, str], set[str]] = {}


def _for_now(exc: BaseException) -> bool:
    """Whether a write that raised ``exc`` may work later: a connection error (``LOADING``
    too, in redis-py), or one of the refusals in :data:`_FOR_NOW`. redis-py maps some of
    those to classes of their own and drops the code; in a pipeline the reply comes after
    ``caused error:``. Not ``NOPERM``, ``WRONGTYPE`` and the like."""
    if not isinstance(exc, redis.ResponseError):
        return True
    if isinstance(exc, (redis.exceptions.ReadOnlyError, redis.exceptions.MasterDownError)):
        return True
    return str(exc).rpartition("caused error: ")[2].startswith(_FOR_NOW)


class QoS(kombu_redis.QoS):
    """kombu's Redis ack emulation, with restores that survive a Redis crash.

    Overrides (kombu has no hook for this): :meth:`append`, which skips kombu's record in
    ``unacked`` when :data:`TAKE` made it already; :meth:`restore_unacked`, which kombu runs
    when the channel closes and which raised on a connection lost to a Redis crash, and which
    here also restores the channel's last take; :meth:`ack` and :meth:`reject`, which raised
    the same way on a closed channel and, once Redis was back, would delete a message that
    the restore needs. ``_delivered`` is the base class's record of the channel's unacked
    tags (``_flush`` drops the acked ones), which kombu's own ``restore_unacked`` reads the
    same way.
    """

    channel: Channel

    def append(self, message: Any, delivery_tag: Any) -> None:
        if delivery_tag == self.channel.hms_taken and not getattr(message, "hms_problem", None):
            virtual.QoS.append(self, message, delivery_tag)  # the record without the write
            return
        super().append(message, delivery_tag)

    def _connection_gone(self) -> bool:
        """True when the channel closed, or its kombu connection was released: no new Redis
        client can be made from it (kombu would fail in ``_connparams``)."""
        transport = self.channel.connection
        return bool(self.channel.closed) or transport is None or transport.client is None

    def restore_unacked(self, client: Any = None) -> None:
        base: Any = self  # kombu's virtual QoS, untyped
        base._flush()  # forget the acked tags, as kombu's virtual QoS does first
        delivered: Any = self._delivered
        tags = [str(tag) for tag in delivered]
        delivered.clear()
        channel = self.channel
        takes = [channel.hms_take_key] if channel.hms_take_open else []
        channel.hms_take_open = False
        transport = channel.connection
        if transport is None or transport.client is None:
            _park(channel.hms_broker, tags, takes)
            return
        _restore(channel, tags, takes, client)

    def restore_unacked_once(self, stderr: Any = None) -> None:
        # kombu restores only when something unacked was delivered; a take whose reply
        # never came delivered nothing, and its message waits in ``unacked`` all the same.
        # (A delivered tag that was acked meanwhile is skipped by the restore: the ack took
        # it out of ``unacked`` first.)
        state: Any = self._delivered
        channel: Any = self.channel
        if (self.channel.hms_take_open and not getattr(state, "restored", False)
                and self.restore_at_shutdown and channel.do_restore):
            self.restore_unacked()
        super().restore_unacked_once(stderr)

    def ack(self, delivery_tag: Any) -> None:
        if self._connection_gone():
            # The message was parked (or will be found by the visibility-timeout sweep):
            # like an ack on a closed AMQP channel, this one cannot count.
            logger.info("ack of a message from a lost Redis connection dropped: it is "
                        "restored to its queue")
            return
        try:
            super().ack(delivery_tag)
        except self.channel.hms_write_errors as exc:
            if not _for_now(exc):
                raise  # refused for good (an ACL without the ack's commands): say so loudly
            # kombu removes the tag from ``unacked`` first and forgets the message only after:
            # when Redis refuses that write (a master short of replicas in a failover:
            # NOREPLICAS) or the connection breaks, the message stays counted as delivered.
            # With acks_late and a prefetch of the pool's size, two such acks left the worker
            # taking nothing more until something reset its connection: 10 to 55 s after a
            # failover (the failover benchmark, tests/test_broker.py). The task ran: forget
            # it here, and write the ack before the channel's next take.
            self._owe_ack(delivery_tag, exc)

    def _owe_ack(self, delivery_tag: Any, exc: BaseException) -> None:
        """Free the prefetch slot of a message whose ack Redis refused for now, and owe the
        ack: :meth:`Channel.settle_acks` writes it before the next take."""
        delivered: Any = self._delivered
        message = delivered.get(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)
        taken = getattr(message, "hms_taken_at", None)
        if taken is None:
            return  # not this channel's delivery: nothing of it to free or to owe
        # Written only while the visibility timeout cannot have restored the message
        # and another worker recorded it again under the same tag: the ack would
        # erase that delivery's record.
        deadline = taken + float(self.channel.visibility_timeout) - ACK_MARGIN
        with _parked_lock:
            owed = _owed_acks.setdefault(self.channel.hms_broker, {})
            first = not owed
            owed[str(delivery_tag)] = deadline
        if first:
            logger.warning("Redis did not take an ack (%s): it is written again before "
                           "the next take", type(exc).__name__)

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        """kombu's restore of one unacked message to its queue (the same WATCH/MULTI step),
        giving up on a connection error. redis-py reports a connection error while watching as
        a ``WatchError``, which ``Redis.transaction`` (kombu's) retries at once, reconnecting:
        over Sentinel, where a master refusing writes (``NOREPLICAS``) or a demoted one
        (``READONLY``) raises a connection error, a worker closing its channel after a failover
        spun there until the sentinels named a master taking writes: 10 to 37 s without
        consuming, in the failover benchmark. A real ``WatchError`` (``unacked`` changed
        meanwhile: another worker's take or ack) is retried as before."""
        channel: Any = self.channel
        qos: Any = self  # kombu's Redis QoS, untyped
        with channel.conn_or_acquire(client) as conn, conn.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self.unacked_key)
                    entry = pipe.hget(self.unacked_key, tag)
                    pipe.multi()
                    qos._remove_from_indices(tag, pipe)
                    if entry:
                        message, exchange, routing_key = loads(bytes_to_str(entry))
                        channel._do_restore_message(message, exchange, routing_key, pipe,
                                                    leftmost)
                    pipe.execute()
                    return
                except redis.WatchError as exc:
                    lost = exc.__context__
                    if isinstance(lost, (redis.ConnectionError, redis.TimeoutError)):
                        raise lost from None

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if self._connection_gone():
            return
        try:
            super().reject(delivery_tag, requeue=requeue)
        except self.channel.hms_write_errors as exc:
            if not _for_now(exc):
                raise
            # As for a refused ack, the slot stays taken otherwise. A reject without requeue
            # is an ack; one with requeue (a pool process lost, reject_on_worker_lost) is
            # owed: the channel's next take puts the message back on its queue first.
            if not requeue:
                self._owe_ack(delivery_tag, exc)
                return
            virtual.QoS.ack(self, delivery_tag)
            with _parked_lock:
                _owed_requeues.setdefault(self.channel.hms_broker, set()).add(str(delivery_tag))
            logger.warning("Redis did not take a requeue (%s): the message goes back on its "
                           "queue before the next take", type(exc).__name__)


class Channel(kombu_redis.Channel):
    """kombu's Redis channel with :class:`Message`, a strict base64 decoder, and the
    :class:`QoS` that parks unacked messages a Redis crash kept it from restoring."""

    Message = Message
    QoS = QoS

    #: (broker URL without password, unacked hash): where parked tags belong.
    hms_broker: tuple[str, str]

    #: The tag :data:`TAKE` recorded for the message being delivered, else None.
    hms_taken: str | None = None
    #: What :meth:`_brpop_start` sent: "take", "wait" (an idle pause), or None.
    hms_pending: str | None = None
    #: Whether the last take found every queue empty.
    hms_idle = False
    #: The commands (``hms_pending`` values) Redis refused last time, each logged once.
    hms_refused: frozenset[str] = frozenset()
    #: Whether a take was sent and its reply not read: the take key may name a message
    #: that only Redis knows was taken.
    hms_take_open = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # connects: Redis answered PING
        this: Any = self  # attributes kombu sets that its type stubs do not declare
        self.hms_connection_errors: tuple[type[BaseException], ...] = this.connection_errors
        #: A write that did not happen: the connection's errors, and a refusal (a master
        #: short of replicas over a ``redis://`` URL; over Sentinel that is a connection error).
        self.hms_write_errors = (*self.hms_connection_errors, redis.ResponseError)
        self.hms_broker = (this.connection.client.as_uri(), this.unacked_key)
        #: Where :data:`TAKE` notes the tag of this channel's latest take.
        self.hms_take_key = f"{this.unacked_key}_take:{uuid.uuid4().hex}"
        #: The queues consumed without acks (kombu records nothing in ``unacked`` for them).
        self.hms_no_ack: set[str] = set()
        self.restore_parked()
        self.settle_requeues()  # owed by a channel of this process that closed since

    def restore_parked(self) -> int:
        """Restore the messages parked for this channel's Redis to their queues (those still
        in ``unacked``: a tag the visibility sweep or another worker restored is skipped),
        with the last take of each channel closed while Redis was away. Returns how many tags
        were handled; on a connection error the rest stay parked."""
        with _parked_lock:
            tags = sorted(_parked.pop(self.hms_broker, ()))
            takes = sorted(_takes.pop(self.hms_broker, ()))
        if not tags and not takes:
            return 0
        done = _restore(self, tags, takes)
        if done:
            logger.warning("restored %d unacked message(s) of a lost Redis connection to "
                           "their queues", done)
        return done

    def settle_requeues(self) -> None:
        """Put back on their queues the messages whose requeue Redis refused (:meth:`QoS.reject`),
        each with kombu's restore step (skipped if no longer in ``unacked``); on a refusal for
        now, the rest stay owed. Any other error is logged and drops them: the visibility
        timeout restores them."""
        if self.hms_broker not in _owed_requeues:  # every take asks: no lock when none owed
            return
        with _parked_lock:
            tags = sorted(_owed_requeues.pop(self.hms_broker, ()))
        qos: Any = self.qos
        for i, tag in enumerate(tags):
            try:
                qos.restore_by_tag(tag, leftmost=True)
            except self.hms_write_errors as exc:
                if _for_now(exc):
                    with _parked_lock:
                        _owed_requeues.setdefault(self.hms_broker, set()).update(tags[i:])
                else:
                    logger.error("%d requeue(s) refused by Redis (%s): the visibility timeout "
                                 "restores them", len(tags) - i, type(exc).__name__)
                return
        if tags:
            logger.warning("put %d message(s) back on their queues whose requeue Redis had "
                           "refused", len(tags))

    def settle_acks(self) -> None:
        """Write the acks Redis refused or lost (:meth:`QoS.ack`), in one transaction; on a
        refusal or a connection error they stay owed. One past its deadline is dropped: the
        visibility timeout restores its message, which runs again (tasks are idempotent)."""
        if self.hms_broker not in _owed_acks:  # every take asks: no lock when nothing is owed
            return
        with _parked_lock:
            owed = _owed_acks.pop(self.hms_broker, None)
        if not owed:
            return
        now = time.monotonic()
        tags = [tag for tag, deadline in owed.items() if deadline > now]
        if len(tags) < len(owed):
            logger.warning("%d ack(s) Redis did not take are past their deadline: the "
                           "visibility timeout hands those messages out again",
                           len(owed) - len(tags))
        if not tags:
            return
        qos: Any = self.qos
        try:
            with qos.pipe_or_acquire() as pipe:
                for tag in tags:
                    qos._remove_from_indices(tag, pipe)
                pipe.execute()
        except self.hms_write_errors:
            with _parked_lock:
                again = _owed_acks.setdefault(self.hms_broker, {})
                again.update({tag: owed[tag] for tag in tags if tag not in again})
            return
        logger.warning("wrote %d ack(s) Redis had not taken", len(tags))

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        (self.hms_no_ack.add if no_ack else self.hms_no_ack.discard)(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def _brpop_start(self, timeout: float | None = None) -> None:
        """Send a take (:data:`TAKE`) in place of kombu's ``BRPOP``, or, after a take found
        every queue empty, a wait of :data:`IDLE_WAIT` in Redis (an ``XREAD BLOCK`` of a stream
        nobody writes) that ends in another take. kombu's event loop reads the reply like
        BRPOP's (:meth:`_brpop_read`)."""
        this: Any = self
        queues = this._queue_cycle.consume(len(this.active_queues))
        if not queues:
            return
        prefix = this.global_keyprefix
        connection = this.client.connection
        this._in_poll = connection
        this._brpop_sent_at = time.monotonic()
        if self.hms_idle:
            # A read-only blocking command: a write (BLPOP) is refused at once by a Redis that
            # refuses writes (NOREPLICAS, MISCONF, READONLY), and the loop would spin.
            self.hms_pending = "wait"
            connection.send_command("XREAD", "BLOCK", int(IDLE_WAIT * 1000), "STREAMS",
                                    f"{prefix}{this.unacked_key}_idle", "$")
            return
        if self.hms_take_open:
            # The previous take's reply was lost to a connection error and this channel goes
            # on (a consumer that reconnects without closing it): restore that take first,
            # before this one overwrites the take key.
            qos: Any = self.qos
            _restore(self, [], [self.hms_take_key], held=set(qos._delivered))
        self.settle_acks()
        self.settle_requeues()
        self.hms_pending = "take"
        self.hms_take_open = True
        lists = [(this._q_for_pri(queue, pri), "0" if queue in self.hms_no_ack else "1")
                 for pri in this.priority_steps for queue in queues]
        keys = [key for key, _ in lists]
        keys += [this.unacked_key, this.unacked_index_key, self.hms_take_key]
        connection.send_command("EVAL", TAKE, len(keys), *(prefix + key for key in keys),
                                time.time(), max(1, int(this.visibility_timeout)),
                                *(acks for _, acks in lists))

    def _poll_error(self, type: str, **options: Any) -> Any:
        # kombu reads a BRPOP reply here on an error event, past _brpop_read: a take's reply
        # must go through it (delivered, or its take kept open for the restore).
        if type == "BRPOP":
            return self._brpop_read(**options)
        return super()._poll_error(type, **options)  # type: ignore[misc]

    def _brpop_read(self, **options: Any) -> Any:
        """Read the reply to :meth:`_brpop_start`'s command, and deliver the message taken.
        kombu parses the entry (JSON) only here, with no hook before the message exists: an
        entry that is not JSON (``ValueError``: JSONDecodeError, or UnicodeDecodeError for
        bytes that are not UTF-8) is dead-lettered, everything after the parse is guarded by
        :class:`Message` and the worker's guard."""
        this: Any = self
        pending, self.hms_pending = self.hms_pending, None
        try:
            try:
                reply = this.client.parse_response(this.client.connection, "EVAL", **options)
                self.hms_take_open = False
            except self.hms_connection_errors:
                # As kombu's BRPOP: the next turn of the event loop reconnects.
                this.client.connection.disconnect()
                if this._closing:
                    # kombu's close reads a pending reply first and stops at anything but
                    # Empty, before the restore of what the channel holds: that reply is
                    # lost, and the take key names its message for that restore.
                    raise Empty() from None
                raise
            except this.ResponseError as exc:
                # Redis refused the take and took nothing (its first write was refused): a
                # master short of ``min-replicas-to-write`` over a ``redis://`` URL (over
                # Sentinel that is a connection error), or one busy in a long script. Wait and
                # take again; the worker stays up. (A full ``noeviction`` Redis does not
                # refuse: a script that has written may go on, so the take still records.)
                if pending not in self.hms_refused:
                    logger.warning("Redis refuses the worker's %s (%s: %s): tried again "
                                   "every %.1f s", pending, type(exc).__name__, str(exc)[:80],
                                   IDLE_WAIT)
                self.hms_refused |= {str(pending)}
                self.hms_idle = pending == "take"  # a wait after a refused take, and a take after
                self.hms_take_open = False
                if pending == "wait":
                    # The wait itself refused (an ACL user without +xread): nothing in Redis
                    # can pace this loop, so pause here rather than spin on Redis.
                    time.sleep(IDLE_WAIT)
                raise Empty() from None
            if pending in self.hms_refused:
                self.hms_refused -= {pending}
                logger.warning("Redis accepts the worker's %s again", pending)
            if pending != "take" or not reply:
                self.hms_idle = pending == "take"
                raise Empty()
            self.hms_idle = False
            dest, item, *tag = reply
            queue = dest.decode()[len(this.global_keyprefix):].rsplit(this.sep, 1)[0]
            this._queue_cycle.rotate(queue)
            taken = tag[0].decode() if tag and tag[0] is not None else None
            try:
                payload = loads(item.decode())
            except ValueError:
                deadletter.record("envelope is not JSON")
                if taken is not None:  # Lua's JSON parser took what Python's refuses
                    # Out of ``unacked`` only: it was never delivered, so no ack to count.
                    this.qos._remove_from_indices(taken).execute()
                return True
            self.hms_taken = taken
            this.connection._deliver(payload, queue)
            return True
        finally:
            self.hms_taken = None
            this._in_poll = None
            this._flush_brpop_reauth()

    def basic_publish(self, message: Any, exchange: str, routing_key: str,
                      **kwargs: Any) -> Any:
        # kombu (5.5 on, kombu#2174) declares a publish's queue with the publish's own retry
        # policy, nested inside it: when the declaration meets a connection error, the inner
        # retry closes the connection (this channel too) and reconnects, and the outer publish
        # then goes on with this closed channel, whose client kombu can no longer build
        # (AttributeError in ``_connparams``: ``connection`` is None), which no retry policy
        # catches (kombu#2275 describes the flow). Seen as publishes raising in the caller
        # during failovers. A connection error here makes the outer retry revive the producer
        # on a new channel and publish again.
        if self.connection is None:
            raise redis.ConnectionError("the channel of this publish was closed by a reconnect"
                                        " under it: publishing again on a new channel")
        return super().basic_publish(message, exchange, routing_key, **kwargs)

    def decode_body(self, body: Any, encoding: str | None = None) -> Any:
        if encoding and encoding.lower() == "base64":
            return base64.b64decode(body, validate=True)
        return super().decode_body(body, encoding)

    # kombu parses the queue entry (JSON) here (``basic_get``; consuming takes with
    # :meth:`_brpop_read`), with no hook before the message exists: see there.
    def _get(self, queue: str, timeout: float | None = None) -> Any:
        try:
            return super()._get(queue)
        except ValueError:
            deadletter.record("envelope is not JSON", queue=queue)
            raise Empty() from None


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the guarded :class:`Channel`."""

    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel (the master asked of the sentinels at each connect) with the
    guards of :class:`Channel`. Messages parked by a connection lost in a failover are
    restored by the next channel, on the new master: ``hms_broker`` is the list of sentinel
    URLs, the same before and after the switch. A new master's refusal to write before it
    has replicas is a connection error here (:class:`hms_tasks.store.NoReplicasError`)."""

    connection_class = store.SentinelConnection
    connection_class_ssl = store.SentinelSSLConnection

    @property
    def supports_batch_publish(self) -> bool:
        # A batch (kombu's ``Producer.batch``) would push without :meth:`_put`: no outbox.
        return False

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        """kombu's push of a message onto its queue, with ``INFO replication`` in the same
        pipeline, so that the outbox (:mod:`hms_tasks.outbox`) knows which master took it and
        publishes again what a failover discarded (kombu has no hook after the push; the
        priority and expiry steps are kombu's own helpers)."""
        seconds = conf.get().publish_outbox_seconds
        if not seconds or kwargs.get("_publish_batch") is not None:
            super()._put(queue, message, **kwargs)
            return
        this: Any = self
        key = this._q_for_pri(queue, this._get_message_priority(message, reverse=False))
        expires = this._expires.get(queue) if this._expires else None
        box = outbox.outbox
        pushed = [(key, str(dumps(message)))]
        with this.conn_or_acquire() as client:
            master = _push(client, pushed, expires=(
                [this._q_for_pri(queue, p) for p in this.priority_steps], expires))
            again = [] if master is None else box.landed(master, pushed, seconds=seconds)
            while again:
                copies = [(entry.key, outbox.with_new_tag(entry.payload)) for entry in again]
                try:
                    master = _push(client, copies)
                except BaseException:
                    box.unclaim(again)
                    raise
                again = [] if master is None else box.landed(
                    master, copies, seconds=seconds, republished=True)


#: Whether a refused ``INFO`` (an ACL user without it) was logged already.
_info_refused_logged = False


def _push(client: Any, messages: list[tuple[str, str]], *,
          expires: tuple[list[str], int | None] = ([], None)) -> outbox.Master | None:
    """``LPUSH`` each (list, payload), then ``INFO replication``, in one pipeline on one
    connection (kombu's ``PEXPIRE`` of a queue declared with an expiry after them). The
    master that took them, or None when it refused the ``INFO``: pushed, not kept."""
    global _info_refused_logged
    with client.pipeline(transaction=False) as pipe:
        for key, payload in messages:
            pipe.lpush(key, payload)
        keys, ms = expires
        if ms:
            for key in keys:
                pipe.pexpire(key, ms)
        pipe.info("replication")
        # An error reply does not stop the pipeline: a push that failed raises (kombu's
        # retry, nothing written), a refused INFO after pushes that worked must not.
        *pushes, info = pipe.execute(raise_on_error=False)
    for reply in pushes:
        if isinstance(reply, Exception):
            raise reply
    if isinstance(info, Exception):
        if not _info_refused_logged:
            _info_refused_logged = True
            logger.warning("publish outbox off: the broker's Redis refused INFO replication "
                           "(%s); grant the broker's ACL user +info", type(info).__name__)
        return None
    return outbox.Master.from_info(info)


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Redis Sentinel transport with the guarded :class:`SentinelChannel`.

    Its connection errors are all *recoverable* (kombu's ``recoverable_connection_errors``):
    without that attribute kombu's ``Connection.ensure`` (the publish retry policy) gives up
    at the second connection error after a reconnect that worked, so a publish that met a
    just-promoted master refusing writes raised in the caller after one retry, whatever
    ``task_publish_retry_policy`` allowed."""

    Channel = SentinelChannel
    recoverable_connection_errors = kombu_redis.SentinelTransport.connection_errors
    recoverable_channel_errors = ()


class SentinelBackend(celery_redis.SentinelBackend):
    """Celery's Sentinel result backend, on connections that make a new master's refusal to
    write before it has replicas a connection error
    (:class:`hms_tasks.store.NoReplicasError`), which ``result_backend_always_retry``
    retries instead of failing the task."""

    connection_class_ssl = store.SentinelSSLConnection

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        this: Any = self  # connparams: set by Celery's RedisBackend, untyped
        this.connparams.setdefault("connection_class", store.SentinelConnection)
