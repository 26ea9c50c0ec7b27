"""The guarded transport's take (:data:`hms_tasks.broker.TAKE`), on a real Redis: a message
taken off its queue is in ``unacked`` at the same instant, so a take whose reply never reaches
the worker (Redis shut down or killed between the pop and the reply) is restored, not lost.

kombu's own ``BRPOP`` fails the first two tests: the message is then neither on its queue nor
in ``unacked``.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from hms_tasks import broker
from tests.helpers import RedisServer, wait_for


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", appendfsync="always")
    server.start()
    yield server
    server.stop()


def _published(url: str, body: Any) -> tuple[Connection, Any, str, str]:
    """A connection on the guarded transport, its channel, a new queue holding one message
    with ``body``, and that message's delivery tag."""
    name = f"test.take.{uuid.uuid4().hex[:8]}"
    conn = Connection(url, transport=broker.TRANSPORT)
    channel = conn.channel()
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    queue(channel).declare()
    Producer(channel).publish(body, exchange=name, routing_key=name, serializer="json")
    entry = json.loads(channel.client.lindex(name, 0))
    return conn, channel, name, entry["properties"]["delivery_tag"]


def _consume_by_hand(channel: Any, name: str, *, no_ack: bool = False,
                     callback: Any = lambda message: None) -> None:
    """Consume ``name`` on ``channel`` with the takes started (``_brpop_start``) and read
    (``_brpop_read``) by the test, as the worker's event loop does."""
    channel.basic_consume(name, no_ack=no_ack, callback=callback, consumer_tag="test")
    assert channel.qos.can_consume()  # as the event loop asks before each take
    channel.client.connection = channel.client.connection_pool.get_connection()


def _take_and_lose_the_reply(channel: Any, name: str, client: redis.Redis) -> None:
    """Start a take as the worker's event loop does, let Redis run it, and drop the
    connection before its reply is read: what a worker sees when Redis dies in between."""
    _consume_by_hand(channel, name)
    channel._brpop_start()
    wait_for(lambda: client.llen(name) == 0, what="the take to run in Redis")
    channel.client.connection.disconnect()


def test_a_take_whose_reply_never_came_is_restored_when_its_channel_closes(
    private_redis: RedisServer,
) -> None:
    client = redis.Redis.from_url(private_redis.url)
    conn, channel, name, tag = _published(private_redis.url, {"patient": 7})
    _take_and_lose_the_reply(channel, name, client)
    # Off the queue and, in the same step, in unacked: nothing exists only in transit.
    assert client.hexists("unacked", tag)
    channel.close()
    conn.release()
    restored = [json.loads(e) for e in client.lrange(name, 0, -1)]
    assert [e["properties"]["delivery_tag"] for e in restored] == [tag]
    assert not client.hexists("unacked", tag)
    assert client.keys("unacked_take:*") == []


def test_a_take_lost_to_a_redis_shutdown_is_restored_by_the_next_connection(
    private_redis: RedisServer,
) -> None:
    client = redis.Redis.from_url(private_redis.url)
    conn, channel, name, tag = _published(private_redis.url, {"patient": 7})
    _take_and_lose_the_reply(channel, name, client)
    private_redis.stop()
    channel.close()  # Redis away: the channel's take is parked in the process
    conn.release()
    assert broker.parked() >= 1
    private_redis.start()  # the AOF kept the take's record
    again = Connection(private_redis.url, transport=broker.TRANSPORT)
    again.channel().close()  # a new channel restores what was parked
    again.release()
    restored = [json.loads(e) for e in client.lrange(name, 0, -1)]
    assert [e["properties"]["delivery_tag"] for e in restored] == [tag]
    assert restored[0]["headers"].get("redelivered") or \
        restored[0]["properties"]["delivery_info"].get("redelivered")
    assert broker.parked() == 0


def test_a_taken_message_is_delivered_once_and_its_ack_clears_it(
    private_redis: RedisServer,
) -> None:
    client = redis.Redis.from_url(private_redis.url)
    conn, channel, name, tag = _published(private_redis.url, {"patient": 7, "ids": []})
    got: list[Any] = []
    with Consumer(channel, [Queue(name, Exchange(name, type="direct"), routing_key=name)],
                  callbacks=[lambda body, message: got.append((body, message))]):
        conn.drain_events(timeout=5)
        (body, message), = got
        # The message as published (an empty list stays a list) and recorded once, by the
        # take, in kombu's layout.
        assert body == {"patient": 7, "ids": []}
        record, exchange, routing_key = json.loads(client.hget("unacked", tag))
        assert (record["properties"]["delivery_tag"], exchange, routing_key) == (tag, name, name)
        assert client.zscore("unacked_index", tag) is not None
        message.ack()
    assert not client.hexists("unacked", tag)
    assert client.llen(name) == 0
    channel.close()
    conn.release()


@contextlib.contextmanager
def _first_of_two_delivered(url: str) -> Iterator[tuple[Connection, str, str, list[Any]]]:
    """Two messages (``{"n": 1}``, ``{"n": 2}``) on a new queue, consumed with a prefetch of
    one (acks_late, one pool process): yields (connection, queue, the first's tag, the
    (body, message) pairs delivered) once the first is delivered; closes the channel after."""
    conn, channel, name, tag = _published(url, {"n": 1})
    Producer(channel).publish({"n": 2}, exchange=name, routing_key=name, serializer="json")
    got: list[Any] = []
    with Consumer(channel, [Queue(name, Exchange(name, type="direct"), routing_key=name)],
                  callbacks=[lambda body, message: got.append((body, message))],
                  prefetch_count=1):
        conn.drain_events(timeout=5)
        yield conn, name, tag, got
    channel.close()
    conn.release()


@contextlib.contextmanager
def _refusing_writes(client: redis.Redis) -> Iterator[None]:
    """Redis refuses every write (``NOREPLICAS``: no replica), as a master in a failover."""
    client.config_set("min-replicas-to-write", 1)
    try:
        yield
    finally:
        client.config_set("min-replicas-to-write", 0)


def test_an_ack_redis_refused_frees_its_prefetch_slot_and_is_written_before_the_next_take(
    private_redis: RedisServer,
) -> None:
    """A master short of replicas (a failover's first second) refuses an ack. kombu kept the
    message counted as delivered, so with a prefetch of one (acks_late, one pool process) the
    consumer took nothing more until its connection was reset: 10 to 55 s in the failover
    benchmark. The slot is freed, and the ack is written before the next take."""
    client = redis.Redis.from_url(private_redis.url)
    with _first_of_two_delivered(private_redis.url) as (conn, _, tag, got):
        (body, message), = got
        assert body == {"n": 1}
        with _refusing_writes(client):
            message.ack()
        assert client.hexists("unacked", tag)  # refused: not written
        conn.drain_events(timeout=5)  # the next take
        assert [body for body, _ in got] == [{"n": 1}, {"n": 2}]
        assert not client.hexists("unacked", tag)  # the ack, written before it
        got[1][1].ack()
    assert client.hlen("unacked") == 0


def test_a_requeue_redis_refused_frees_its_slot_and_is_done_before_the_next_take(
    private_redis: RedisServer,
) -> None:
    """A pool process lost during a failover: Celery rejects its message with requeue
    (``reject_on_worker_lost``), and the master refuses the restore. kombu raised and kept
    the slot taken; the slot is freed, and the next take puts the message back first."""
    client = redis.Redis.from_url(private_redis.url)
    with _first_of_two_delivered(private_redis.url) as (conn, name, tag, got):
        with _refusing_writes(client):
            got[0][1].reject(requeue=True)
        assert client.hexists("unacked", tag)  # refused: still recorded, not on its queue
        assert tag not in [json.loads(e)["properties"]["delivery_tag"]
                           for e in client.lrange(name, 0, -1)]
        for _ in range(2):  # the slot is free: the message goes back, both are taken
            conn.drain_events(timeout=5)
            got[-1][1].ack()
        assert sorted(body["n"] for body, _ in got[1:]) == [1, 2]
    assert client.hlen("unacked") == 0
    assert client.llen(name) == 0


def test_an_ack_refused_for_good_raises_instead_of_being_owed(
    private_redis: RedisServer,
) -> None:
    """Only a refusal for now (a failover's ``NOREPLICAS``, a demoted master) makes an ack
    owed. An ACL without the ack's commands refuses every ack: owing them would re-run each
    message once its deadline passed, quietly; the error goes to the caller, as in kombu."""
    admin = redis.Redis.from_url(private_redis.url)
    admin.execute_command("ACL", "SETUSER", "acker", "on", ">pw", "~*", "&*", "+@all")
    url = f"redis://acker:pw@127.0.0.1:{private_redis.port}/0"
    conn, channel, name, tag = _published(url, {"n": 1})
    got: list[Any] = []
    with Consumer(channel, [Queue(name, Exchange(name, type="direct"), routing_key=name)],
                  callbacks=[lambda body, message: got.append(message)], prefetch_count=1):
        conn.drain_events(timeout=5)
        admin.execute_command("ACL", "SETUSER", "acker", "-hdel")
        try:
            with pytest.raises(redis.exceptions.NoPermissionError):
                got[0].ack()
        finally:
            admin.execute_command("ACL", "SETUSER", "acker", "+hdel")
        assert admin.hexists("unacked", tag)
        got[0].ack()  # the same ack, once allowed: nothing was left owed or forgotten
    assert admin.hlen("unacked") == 0
    channel.close()
    conn.release()
    admin.execute_command("ACL", "DELUSER", "acker")


def test_a_message_whose_ack_is_owed_is_not_put_back_by_the_restore(
    private_redis: RedisServer,
) -> None:
    """The ack of a message that ran is refused, and the take after it loses its reply (the
    take key still names that message): the channel's restore must not put it back on its
    queue, where another worker would run it again and the owed ack would then erase that
    delivery's record. The next channel writes the ack."""
    client = redis.Redis.from_url(private_redis.url)
    conn, channel, name, tag = _published(private_redis.url, {"n": 1})
    got: list[Any] = []
    _consume_by_hand(channel, name, callback=got.append)
    channel._brpop_start()
    channel._brpop_read()  # delivered: the take key names it
    (message,) = got
    client.config_set("min-replicas-to-write", 1)  # no replica: every write refused
    try:
        message.ack()  # refused: owed
        _take_and_lose_the_reply(channel, name, client)  # refused in Redis, reply lost
    finally:
        client.config_set("min-replicas-to-write", 0)
    channel.close()
    conn.release()
    assert client.llen(name) == 0, "a message that ran was put back on its queue"
    conn2, channel2, name2, _ = _published(private_redis.url, {"n": 2})
    _consume_by_hand(channel2, name2, no_ack=True)
    channel2._brpop_start()  # its first take writes the owed ack first
    channel2._brpop_read()
    assert not client.hexists("unacked", tag)
    channel2.close()
    conn2.release()


def test_a_redis_refusing_writes_pauses_takes_and_a_full_one_still_hands_out(
    private_redis: RedisServer,
) -> None:
    client = redis.Redis.from_url(private_redis.url)
    conn, channel, name, tag = _published(private_redis.url, {"patient": 7})
    _consume_by_hand(channel, name)
    client.config_set("min-replicas-to-write", 1)  # no replica: every write refused
    try:
        channel._brpop_start()
        with pytest.raises(Empty):
            channel._brpop_read()
        assert client.llen(name) == 1  # nothing taken, nothing lost
        assert not client.hexists("unacked", tag)
        # The wait before the next take is a real wait, not refused at once like a write
        # (a BLPOP was: the worker spun until writes came back).
        client.config_resetstat()
        channel._brpop_start()
        with pytest.raises(Empty):
            channel._brpop_read()
        waits = {k: v for k, v in client.info("commandstats").items()
                 if k in ("cmdstat_xread", "cmdstat_blpop")}
        assert [(k, v["calls"], v["rejected_calls"]) for k, v in waits.items()] == \
            [("cmdstat_xread", 1, 0)]
    finally:
        client.config_set("min-replicas-to-write", 0)
    # A full noeviction Redis still hands messages out (a script that popped may go on
    # writing), recorded: draining the queues is what frees its memory.
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)
    try:
        channel._brpop_start()  # the take again
        channel._brpop_read()
        assert client.llen(name) == 0
        assert client.hexists("unacked", tag)
    finally:
        client.config_set("maxmemory", 0)
    channel.close()
    conn.release()


def test_a_take_for_a_no_ack_consumer_records_nothing(private_redis: RedisServer) -> None:
    # Control replies (``celery inspect``, Flower) are consumed without acks: a record of
    # them in ``unacked`` would never be cleared, and would be replayed an hour later.
    client = redis.Redis.from_url(private_redis.url)
    conn, channel, name, tag = _published(private_redis.url, {"reply": 1})
    got: list[Any] = []
    with Consumer(channel, [Queue(name, Exchange(name, type="direct"), routing_key=name)],
                  callbacks=[lambda body, message: got.append(body)], no_ack=True):
        conn.drain_events(timeout=5)
    assert got == [{"reply": 1}]
    assert not client.hexists("unacked", tag)
    assert client.keys("unacked_take:*") == []
    channel.close()
    conn.release()


def test_a_take_that_never_reached_redis_leaves_the_running_message_alone(
    private_redis: RedisServer,
) -> None:
    # The take key names the last message taken; when the next take is lost before Redis
    # ran it (a silently dead connection, dropped by the health check), that key still
    # names a message being run: restoring it would run it twice at once.
    client = redis.Redis.from_url(private_redis.url)
    conn, channel, name, tag = _published(private_redis.url, {"patient": 7})
    got: list[Any] = []
    with Consumer(channel, [Queue(name, Exchange(name, type="direct"), routing_key=name)],
                  callbacks=[lambda body, message: got.append(message)]):
        conn.drain_events(timeout=5)
        assert len(got) == 1  # delivered, not acked: running
        channel.hms_take_open = True  # a take was sent and its connection dropped, unread
        channel._in_poll = None
        channel._brpop_start()  # restores what the lost take took, then takes
        with contextlib.suppress(Empty):
            channel._brpop_read()
        assert len(got) == 1  # not pushed back and delivered again while it runs
        assert client.hexists("unacked", tag)
        got[0].ack()
    channel.close()
    conn.release()


def test_an_acl_user_without_the_wait_command_still_consumes(
    private_redis: RedisServer,
) -> None:
    # A refused wait is followed by a take (not by another wait, which would never consume).
    admin = redis.Redis.from_url(private_redis.url)
    admin.execute_command("ACL", "SETUSER", "worker", "on", ">pw", "~*", "&*", "+@all",
                          "-xread")
    url = f"redis://worker:pw@127.0.0.1:{private_redis.port}/0"
    name = "test.take.acl"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    got: list[Any] = []
    with Connection(url, transport=broker.TRANSPORT) as conn:
        channel = conn.channel()
        queue(channel).declare()
        with Consumer(channel, [queue], callbacks=[lambda body, message: got.append(body)]):
            for _ in range(3):  # idle: takes find nothing, waits are refused
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.3)
            Producer(channel).publish({"n": 1}, exchange=name, routing_key=name,
                                      serializer="json")

            def arrived() -> bool:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.3)
                return bool(got)

            wait_for(arrived, timeout=10, what="the message to be taken")
    assert got == [{"n": 1}]
    assert int(admin.info("commandstats")["cmdstat_xread"]["rejected_calls"]) >= 1
