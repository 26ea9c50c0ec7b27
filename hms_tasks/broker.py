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

It also keeps a Redis crash from stopping the worker or losing a message (:class:`QoS`). When
the connection to Redis is lost, Celery closes it and kombu restores the channel's unacked
messages to their queues, AMQP-style: the delivery tags of a closed channel cannot be acked any
more. With Redis down that restore cannot run, and after Celery collected the connection kombu
raised ``AttributeError: 'NoneType' object has no attribute 'hostname'`` (kombu#970), which
stopped the worker ("Unrecoverable error"). Here the tags that could not be restored are
*parked* in the process, and the next channel that connects to the same Redis restores them
(they are still in Redis's ``unacked`` hash, which the AOF keeps); an ack or reject arriving
later on the closed channel is dropped instead of deleting a message that is being restored.
A message popped off its queue just as Redis died, before kombu recorded it in ``unacked``, is
kept in the process the same way and pushed back onto its queue on reconnect.
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
from collections.abc import Iterator, Sequence
from queue import Empty
from typing import Any
from urllib.parse import urlsplit

import redis
from celery.backends import redis as celery_redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

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
#: Messages popped off a queue whose entry in ``unacked`` Redis did not take: (payload,
#: exchange, routing key), by broker. Only this process still has them.
_popped: dict[tuple[str, str], list[tuple[Any, str, str]]] = {}
_parked_lock = threading.Lock()


def parked() -> int:
    """How many messages wait in this process for a connection to restore them."""
    with _parked_lock:
        return (sum(len(tags) for tags in _parked.values())
                + sum(len(entries) for entries in _popped.values()))


def _park(key: tuple[str, str], tags: list[str]) -> None:
    if tags:
        with _parked_lock:
            _parked.setdefault(key, set()).update(tags)
        logger.warning("Redis unreachable: %d unacked message(s) will be restored to their "
                       "queues when the worker reconnects", len(tags))


class QoS(kombu_redis.QoS):
    """kombu's Redis ack emulation, with restores that survive a Redis crash.

    Overrides (kombu has no hook for this): :meth:`restore_unacked`, which kombu runs when the
    channel closes and which raised on a connection lost to a Redis crash; :meth:`ack` and
    :meth:`reject`, which raised the same way on a closed channel and, once Redis was back,
    would delete a message that the restore needs. ``_delivered`` is the base class's record
    of the channel's unacked tags, which kombu's own ``restore_unacked`` reads the same way.
    """

    channel: Channel

    def append(self, message: Any, delivery_tag: Any) -> None:
        # kombu pops the entry (BRPOP), then records it in ``unacked``: when Redis dies in
        # between, the message exists only here. Keep it, to be pushed back on reconnect; the
        # error still reaches Celery, which reconnects without delivering the message.
        try:
            super().append(message, delivery_tag)
        except self.channel.hms_connection_errors:
            info = message.delivery_info
            if not isinstance(message, Message):
                raise
            with _parked_lock:
                _popped.setdefault(self.channel.hms_broker, []).append(
                    (message.hms_payload, info["exchange"], info["routing_key"]))
            logger.warning("Redis unreachable: a message just taken off its queue will be "
                           "pushed back when the worker reconnects")
            raise

    def _connection_gone(self) -> bool:
        """True when the channel closed, or its kombu connection was released: no new Redis
        client can be made from it (kombu would fail in ``_connparams``)."""
        transport = self.channel.connection
        return bool(self.channel.closed) or transport is None or transport.client is None

    def restore_unacked(self, client: Any = None) -> None:
        delivered: Any = self._delivered
        tags = [str(tag) for tag in delivered]
        transport = self.channel.connection
        if transport is None or transport.client is None:
            delivered.clear()
            _park(self.channel.hms_broker, tags)
            return
        try:
            super().restore_unacked(client)
        except self.channel.hms_connection_errors:
            # restore_by_tag is one WATCH/MULTI transaction per tag: the tags already restored
            # are gone from ``unacked`` and restoring them again does nothing.
            delivered.clear()
            _park(self.channel.hms_broker, tags)

    def ack(self, delivery_tag: Any) -> None:
        if self._connection_gone():
            # The message was parked (or will be found by the visibility-timeout sweep):
            # like an ack on a closed AMQP channel, this one cannot count.
            logger.info("ack of a message from a lost Redis connection dropped: it is "
                        "restored to its queue")
            return
        super().ack(delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if self._connection_gone():
            return
        super().reject(delivery_tag, requeue=requeue)


class Channel(kombu_redis.Channel):
    """kombu's Redis channel with :class:`Message`, a strict base64 decoder, and the
    :class:`QoS` that parks unacked messages a Redis crash kept it from restoring."""

    Message = Message
    QoS = QoS

    #: (broker URL without password, unacked hash): where parked tags belong.
    hms_broker: tuple[str, str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # connects: Redis answered PING
        this: Any = self  # attributes kombu sets that its type stubs do not declare
        self.hms_connection_errors: tuple[type[BaseException], ...] = this.connection_errors
        self.hms_broker = (this.connection.client.as_uri(), this.unacked_key)
        self.restore_parked()

    def restore_parked(self) -> int:
        """Restore the messages parked for this channel's Redis to their queues (those still
        in ``unacked``: a tag the visibility sweep or another worker restored is skipped).
        Returns how many tags were handled; on a connection error the rest stay parked."""
        with _parked_lock:
            tags = sorted(_parked.pop(self.hms_broker, ()))
            popped = _popped.pop(self.hms_broker, [])
        if popped:
            try:
                # kombu's own restore step (QoS.restore_by_tag uses it too): marks the
                # message redelivered and pushes it onto its queue at its priority.
                this: Any = self
                with this.conn_or_acquire() as client:
                    pipe = client.pipeline()
                    for payload, exchange, routing_key in popped:
                        this._do_restore_message(payload, exchange, routing_key, pipe)
                    pipe.execute()
            except self.hms_connection_errors:
                with _parked_lock:
                    _popped.setdefault(self.hms_broker, []).extend(popped)
                _park(self.hms_broker, tags)
                return 0
            logger.warning("pushed %d message(s) taken off their queue during a Redis "
                           "failure back onto it", len(popped))
        qos: Any = self.qos
        for i, tag in enumerate(tags):
            try:
                qos.restore_by_tag(tag)
            except self.hms_connection_errors:
                _park(self.hms_broker, tags[i:])
                return i
        if tags:
            logger.warning("restored %d unacked message(s) of a lost Redis connection to "
                           "their queues", len(tags))
        return len(tags)

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

    # kombu parses the queue entry (JSON) inside these two methods, with no hook before the
    # message exists; a ValueError out of them is that parse (JSONDecodeError, or
    # UnicodeDecodeError for bytes that are not UTF-8): everything after the parse is guarded
    # by Message and the worker's guard, and Redis errors are not ValueErrors. The entry is
    # already popped, so it is dead-lettered here.
    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)  # type: ignore[misc]
        except ValueError:
            deadletter.record("envelope is not JSON")
            return True

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
