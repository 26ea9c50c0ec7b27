"""Redis Sentinel: the settings, the Celery options they produce, and the clients of a real
loopback Sentinel stack (master, 2 replicas, 3 sentinels, passwords) following a failover."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from django.core.cache import caches
from django.test import override_settings

from bench.sentinel_stack import MASTER_NAME, SentinelStack, free_port
from hms_tasks import broker, conf, store
from hms_tasks.errors import ConfigurationError
from tests.helpers import CountingListener, until_written, wait_for

PASSWORD = "sentinel-test-pw"
SECRET = "not-a-host-but-a-secret"


def _sentinel_settings(stack: SentinelStack) -> dict[str, Any]:
    return {"HMS_TASKS_REDIS_URL": stack.url(), "HMS_TASKS_REDIS_SENTINELS": stack.sentinels,
            "HMS_TASKS_REDIS_SENTINEL_MASTER": MASTER_NAME,
            "HMS_TASKS_REDIS_SENTINEL_PASSWORD": PASSWORD}


# -- settings and options (no Redis) -----------------------------------------------------------


def test_sentinels_without_a_master_name_are_refused() -> None:
    with override_settings(HMS_TASKS_REDIS_SENTINELS=["127.0.0.1:26379"]), \
            pytest.raises(ConfigurationError, match="HMS_TASKS_REDIS_SENTINEL_MASTER"):
        conf.get()


def test_a_sentinel_that_is_not_host_port_is_named_not_quoted() -> None:
    with override_settings(HMS_TASKS_REDIS_SENTINELS=[SECRET],
                           HMS_TASKS_REDIS_SENTINEL_MASTER="m"), \
            pytest.raises(ConfigurationError) as err:
        conf.get()
    assert "HMS_TASKS_REDIS_SENTINELS[0]: must be host:port" in str(err.value)
    assert SECRET not in str(err.value)


def test_without_sentinels_nothing_changes() -> None:
    from hms_tasks.celery import celery_defaults

    assert not store.sentinel_managed()
    options = celery_defaults()
    assert options["broker_url"].startswith("redis://")
    assert "broker_failover_strategy" not in options
    assert broker.transport_for(options["broker_url"]) == broker.TRANSPORT


def test_sentinel_celery_options() -> None:
    from hms_tasks.celery import celery_defaults

    with override_settings(HMS_TASKS_REDIS_URL="redis://:pw%40x@ignored:6379/3",
                           HMS_TASKS_REDIS_SENTINELS=["10.0.0.1:26379", "10.0.0.2:26380"],
                           HMS_TASKS_REDIS_SENTINEL_MASTER="hms",
                           HMS_TASKS_REDIS_SENTINEL_PASSWORD="spw"):
        options = celery_defaults()
        assert store.sentinel_managed()
        assert store.sentinel_managed("redis://:pw%40x@ignored:6379/3")
        assert not store.sentinel_managed("redis://10.0.0.9:6379/0")  # a checked instance
    assert options["broker_url"] == ("sentinel://:pw%40x@10.0.0.1:26379/3;"
                                     "sentinel://:pw%40x@10.0.0.2:26380/3")
    assert broker.transport_for(options["broker_url"]) == broker.SENTINEL_TRANSPORT
    assert options["result_backend"] == broker.SENTINEL_BACKEND + "+" + options["broker_url"]
    assert options["result_backend_always_retry"]
    assert options["result_backend_max_sleep_between_retries_ms"] == 1000
    for key in ("broker_transport_options", "result_backend_transport_options"):
        assert options[key]["master_name"] == "hms"
        assert options[key]["sentinel_kwargs"]["password"] == "spw"
        assert options[key]["visibility_timeout"] == conf.get().visibility_timeout
    beat = options["redbeat_redis_options"]
    assert options["redbeat_redis_url"].startswith("redis-sentinel")
    assert beat["sentinels"] == [("10.0.0.1", 26379), ("10.0.0.2", 26380)]
    assert (beat["service_name"], beat["db"], beat["password"]) == ("hms", 3, "pw@x")
    assert next(broker.keep_sentinels(options["broker_url"].split(";"))) == "10.0.0.1"


def test_a_client_that_must_give_up_quickly_asks_each_sentinel_once() -> None:
    """A client with a timeout of its own (a commit's invalidation call, a check) makes no
    retries: not on the master, and not on the sentinels either. With redis-py's default
    retries each failing sentinel was asked 4 times, with backoff: seconds, not the caller's
    0.1 s. An error names each sentinel's reason (redis-py 8 gives only its type)."""
    refusing = [CountingListener(), CountingListener()]
    try:
        with override_settings(HMS_TASKS_REDIS_SENTINELS=[r.address for r in refusing],
                               HMS_TASKS_REDIS_SENTINEL_MASTER="m"):
            store.reset()
            with pytest.raises(redis.ConnectionError) as err:
                store.client(socket_timeout=0.5).ping()
    finally:
        store.reset()
        for r in refusing:
            r.sock.close()
    assert [r.accepted for r in refusing] == [1, 1]
    for r in refusing:
        assert f"sentinel {r.address}: " in str(err.value)
    assert "network:ConnectionError" not in str(err.value)


# -- a real Sentinel stack ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelStack]:
    s = SentinelStack(Path(tmp_path_factory.mktemp("sentinel")), password=PASSWORD)
    s.start()
    yield s
    s.stop()


@pytest.fixture
def on_sentinel(stack: SentinelStack) -> Iterator[SentinelStack]:
    hms_cache = {"BACKEND": "hms_tasks.cache.TaggedRedisCache", "LOCATION": stack.url(),
                 "KEY_PREFIX": "hms-cache"}
    with override_settings(**_sentinel_settings(stack),
                           CACHES={"default": {"BACKEND":
                                               "django.core.cache.backends.locmem.LocMemCache"},
                                   "hms": hms_cache}):
        store.reset()
        yield stack
    store.reset()


def test_the_store_follows_a_failover_and_records_it(on_sentinel: SentinelStack) -> None:
    client = store.client()
    client.set(store.key("t", "before"), "1")
    first = on_sentinel.master_port()
    assert client.connection_pool.connection_kwargs["password"] == PASSWORD
    seen = store.failovers()
    new = on_sentinel.failover()
    assert new != first
    # The client writes to the master the sentinels name, and a process saw the new one.
    until_written(client, store.key("t", "after"), on=on_sentinel.client(new))
    assert store.failovers() == seen + 1


def test_a_value_whose_invalidation_the_failover_lost_reads_as_a_miss(
    on_sentinel: SentinelStack,
) -> None:
    """The issue's sequence: a value built at g1 is replicated; an invalidation bumps its tag
    to g2 on the master only (the replicas are paused); the master dies; a replica without the
    bump is promoted and still holds the value at g1. It must read as a miss."""
    stack = on_sentinel
    be = caches["hms"]
    tag_gen = be.gen_prefix + "patient:1"
    be.set("patient-1", {"v": 1}, 600, tags=["patient:1"])
    old = stack.master_port()
    stack.client(old).wait(2, 5000)  # the value and its generations are on both replicas
    replicas = [p for p in stack.redis_ports if p != old]
    for port in replicas:
        stack.pause(port)
    master = stack.client(old)
    # Cut the replication links (the paused replicas cannot reconnect), and let the master
    # write without replicas: min-replicas-to-write would otherwise refuse the bump (which
    # is what it is for; this test is about the cache's own guard).
    master.config_set("min-replicas-to-write", 0)
    master.client_kill_filter(_type="replica")
    try:
        be.invalidate_tags(["patient:1"])  # acknowledged by the old master alone
        assert be.get("patient-1") is None
    finally:
        new = stack.kill_master(healthy_first=False,
                                before_switch=lambda: [stack.resume(p) for p in replicas])
    raw = stack.client(new).execute_command("GET", be.make_key("patient-1"))
    assert raw is not None, "the promoted replica must still hold the value"
    # Teeth: the new master lost the bump, so the value's header matches its tag's generation.
    assert f"patient:1={stack.client(new).get(tag_gen)}" in raw

    def read() -> Any:
        try:
            return be.get("patient-1", "miss")
        except redis.ConnectionError:
            return None

    assert wait_for(read, timeout=30, interval=0.05, what="a read on the new master") == "miss"
    # A value built after the switch is a hit again (the epoch ended once, not per read).
    be.set("patient-1", {"v": 2}, 600, tags=["patient:1"])
    assert be.get("patient-1") == {"v": 2}
    stack.wait_healthy()


def test_a_pool_on_another_database_writes_no_store_state_there(
    on_sentinel: SentinelStack,
) -> None:
    """A Django cache on another database of the hms-tasks Redis, given SentinelPool: its
    first connection to a master records nothing and runs no listener there (the cache's
    epoch, the outbox's messages and the master's record would be lost to the store)."""
    from django.core.cache.backends.redis import RedisCache

    from hms_tasks.cache import TaggedRedisCache

    # Creating the tag cache registers its epoch listener, which must not run on db 1.
    assert isinstance(caches["hms"], TaggedRedisCache)
    other = RedisCache(on_sentinel.url(db=1), {
        "KEY_PREFIX": "other", "OPTIONS": {"pool_class": "hms_tasks.store.SentinelPool"}})
    other.set("k", "v")
    assert other.get("k") == "v"
    db1 = redis.Redis(port=on_sentinel.master_port(), db=1, password=PASSWORD)
    assert db1.keys("*") == [other.make_and_validate_key("k").encode()]
    db1.flushdb()


def test_the_async_client_asks_the_sentinels_too(on_sentinel: SentinelStack) -> None:
    async def roundtrip() -> Any:
        client = store.async_client()
        try:
            await client.set(store.key("t", "async"), "1")
            return await client.get(store.key("t", "async"))
        finally:
            await client.aclose()

    assert asyncio.run(roundtrip()) == "1"
    master = on_sentinel.client(on_sentinel.master_port())
    assert wait_for(lambda: master.get(store.key("t", "async")), timeout=10) == "1"


# -- a master that refuses writes: a failover's window ------------------------------------------


def _publishing(producer: Any, outcome: list[Any], **options: Any) -> threading.Thread:
    """A thread (not started) publishing one message with kombu's retries; it appends
    "published" or the exception raised to ``outcome``."""

    def publish() -> None:
        try:
            producer.publish({"n": 1}, retry=True, **options)
            outcome.append("published")
        except Exception as exc:
            outcome.append(exc)

    return threading.Thread(target=publish)


def _noreplicas(master: redis.Redis) -> int:
    """Writes ``master`` refused for want of replicas so far (``INFO errorstats``)."""
    stat = master.info("errorstats").get("errorstat_NOREPLICAS", {})
    return int(stat.get("count", 0)) if isinstance(stat, dict) else 0


def test_a_master_refusing_writes_serves_no_value_a_buffered_commit_killed(
    redis_server: Any,
) -> None:
    """A newly promoted master refuses writes (``min-replicas-to-write``) until it has a
    replica, but would answer reads: a commit then is buffered, and a read in another client
    must not return the value it killed. Once the master takes writes, the next commit lands
    the buffered tags with its own, without waiting for the courier's next try."""
    from hms_tasks.cache import changes

    be = caches["hms"]
    be.set("row-1", "before", 600, tags=["row:1"])
    other = redis.Redis.from_url(redis_server.url)  # another process's view of Redis
    recorder = changes.recorder()
    assert changes.flush()
    other.config_set("min-replicas-to-write", 1)  # no replica here: every write refused
    try:
        recorder.add(frozenset({"row:1"}))  # the commit: its call refused, tags buffered
        assert "row:1" in recorder.pending
        try:
            got = be.get("row-1")
        except redis.RedisError:
            got = "refused"  # get_or_build reads the database then
        assert got != "before", "a master refusing writes served a value a commit killed"
        # The courier's retries back off to their longest pause meanwhile.
        failures = recorder.stats["failures"]
        wait_for(lambda: recorder.stats["failures"] >= failures + 5, timeout=30,
                 what="the courier to back off")
    finally:
        other.config_set("min-replicas-to-write", 0)
    recorder.add(frozenset({"row:2"}))  # the next commit, on a master taking writes
    assert not recorder.pending
    assert be.get("row-1") is None
    assert changes.flush()


def test_commits_buffered_after_a_hung_master_land_when_the_process_reaches_the_new_one(
    on_sentinel: SentinelStack, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The master hangs: a commit's call times out, and later commits buffer without calling
    until the courier gets through. Here the courier's own call hangs on the old master
    (its timeout raised to 30 s: a hung connection). Once a pool of the process reaches the
    new master (the cache, filling a value there), the buffered tags must land there first
    and the next commit must call again: otherwise the value filled there outlives that
    commit, a stale read (the 226 late reads of one slow failover in the benchmark)."""
    from hms_tasks.cache import changes

    stack = on_sentinel
    be = caches["hms"]
    recorder = changes.recorder()
    assert changes.flush()
    monkeypatch.setattr(changes, "COURIER_TIMEOUT", 30.0)
    old = stack.wait_healthy()
    recorder.add(frozenset({"row:0"}))  # the commit's connection is on the master...
    be.set("row-1", "x", 600, tags=["row:1"])  # ... and the cache's
    slow = recorder.stats["slow_failures"]
    stack.pause(old)  # hung: the sentinels promote a replica
    try:
        recorder.add(frozenset({"row:9"}))  # times out
        assert recorder.stats["slow_failures"] == slow + 1
        new = wait_for(lambda: (p := stack.master_port()) != old and p, timeout=60,
                       what="the sentinels to promote a replica")

        def fill() -> bool:
            try:
                be.set("row-2", "before", 600, tags=["row:2"])
            except (redis.ConnectionError, redis.TimeoutError):
                return False
            return True

        wait_for(fill, timeout=60, interval=0.05, what="a fill on the new master")
        assert stack.client(new).exists(be.gen_prefix + "row:9"), \
            "the tags buffered before the switch did not land with the process's first use"
        at_commit = recorder.stats["at_commit"]
        recorder.add(frozenset({"row:2"}))  # the commit changing row 2
        assert recorder.stats["at_commit"] == at_commit + 1, "the commit was only buffered"
        assert be.get("row-2") is None, "a value outlived the commit that changed it"
    finally:
        stack.resume(old)
    stack.wait_healthy()
    # The courier's call comes back once the old master answers again. (The fan-out task it
    # owes goes to this session's broker once the fixture's settings are undone.)
    wait_for(lambda: not recorder.pending, timeout=60, what="the courier's hung call to end")


def test_a_publish_rides_out_a_master_refusing_writes(on_sentinel: SentinelStack) -> None:
    """A publish meeting a master that refuses writes for want of replicas (a new master in
    its first second) is retried until the master takes it, not raised in the caller."""
    import time

    from kombu import Connection, Exchange, Producer, Queue

    from hms_tasks.celery import celery_defaults

    options = celery_defaults()
    master = on_sentinel.client(on_sentinel.master_port())
    queue = Queue("hms-test-noreplicas", Exchange("hms-test-noreplicas", type="direct"),
                  routing_key="hms-test-noreplicas")
    outcome: list[object] = []
    with Connection(options["broker_url"].split(";")[0], transport=broker.SENTINEL_TRANSPORT,
                    transport_options=options["broker_transport_options"]) as conn:
        producer = Producer(conn)
        queue(conn.default_channel).declare()
        refused = _noreplicas(master)
        master.config_set("min-replicas-to-write", 3)  # 2 replicas: every write refused

        thread = _publishing(producer, outcome, exchange=queue.exchange,
                             routing_key=queue.routing_key,
                             retry_policy=options["task_publish_retry_policy"])
        try:
            thread.start()
            wait_for(lambda: _noreplicas(master) > refused or outcome, timeout=30,
                     what="the publish to be refused")
            # The fault itself, not a wait for anything: a new master refuses writes for
            # about a second. kombu's ensure() alone raised at the second refusal; with the
            # retries but no pause between them, all 20 went by within this second.
            time.sleep(1.0)
        finally:
            master.config_set("min-replicas-to-write", 1)
            thread.join(timeout=60)
    assert outcome == ["published"]
    assert master.llen("hms-test-noreplicas") == 1
    master.delete("hms-test-noreplicas")


@pytest.fixture
def stale_master(on_sentinel: SentinelStack, tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, int]]:
    """(an old master's port, the master's): a Redis of its own, which the first sentinel
    names at configuration epoch 0 while the other two name the stack's master at a newer
    epoch, as right after a failover. Why not one of the stack's replicas: the sentinels'
    hello messages through it bring the first sentinel up to date within two seconds.

    The process's outbox is one of the test's own: a publish after the test must not meet an
    outbox that saw this unrelated master replace the stack's (it would refuse the stack's
    master as superseded, rightly for a real old master)."""
    from hms_tasks import outbox

    monkeypatch.setattr(outbox, "outbox", outbox.Outbox())
    stack = on_sentinel
    first = stack.client(stack.sentinel_ports[0])
    if int(first.sentinel_master(MASTER_NAME)["config-epoch"]) == 0:
        stack.failover()
    master = stack.wait_healthy()
    port = free_port()
    proc = subprocess.Popen(
        [stack.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--requirepass", PASSWORD, "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def up() -> bool:
            with contextlib.suppress(redis.ConnectionError):
                return bool(stack.client(port).ping())
            return False

        wait_for(up, timeout=10, what="the old master")
        _monitor(first, port)
        # The tests start from a process that has not seen the newer master yet: forget
        # what its pools (a background thread's, during the failover above) may have seen.
        store.reset()
        yield port, master
    finally:
        _monitor(first, master)
        proc.kill()
        proc.wait(timeout=10)
    stack.wait_healthy()


def _monitor(sentinel: redis.Redis, port: int) -> None:
    """Make ``sentinel`` monitor ``port`` as the master, anew (configuration epoch 0)."""
    sentinel.sentinel_remove(MASTER_NAME)
    sentinel.sentinel_monitor(MASTER_NAME, "127.0.0.1", port, 2)
    sentinel.sentinel_set(MASTER_NAME, "auth-pass", PASSWORD)
    sentinel.sentinel_set(MASTER_NAME, "down-after-milliseconds", 1000)


def _lose_replicas(stack: SentinelStack, port: int) -> None:
    """The old master refuses writes from now on, as when the sentinels took its replicas."""
    stack.client(port).config_set("min-replicas-to-write", 1)


def test_a_client_refused_by_a_stale_sentinels_master_follows_the_newest_epoch(
    on_sentinel: SentinelStack, stale_master: tuple[int, int],
) -> None:
    """Right after a failover the sentinels disagree for up to a second. A client whose write
    the master named by the first sentinel refused must not be sent back there while another
    sentinel names a master of a newer configuration epoch (redis-py takes the first answer:
    the cache's commits stayed buffered while readers used the new master)."""
    old, master = stale_master
    _lose_replicas(on_sentinel, old)
    client = store.client(socket_timeout=1.0)
    key = store.key("t", "newest-epoch")
    with pytest.raises(redis.ConnectionError):
        client.set(key, "1")  # the old master refuses (NOREPLICAS): a refused write
    client.set(key, "1")  # the next connection goes where the newest epoch says
    assert on_sentinel.client(master).get(key) == "1"


def test_a_pool_leaves_an_old_master_once_another_pool_of_the_process_saw_a_newer_one(
    on_sentinel: SentinelStack, stale_master: tuple[int, int],
) -> None:
    """An old master serves reads (and writes, until its last replica leaves) for a second or
    more after the switch, until the sentinels demote it. A pool whose connections stay on it
    misses what the process committed on the new one: the failover benchmark read values of
    buffered commits a second after the switch that way. Once another pool of the process
    has seen the master of a newer configuration epoch, the reader's next command, on a
    checked-out connection or on one a thread keeps (:class:`store.HeldConnection`), goes
    there."""
    old, master = stale_master
    key = store.key("t", "where")
    on_sentinel.client(old).set(key, "old")
    on_sentinel.client(master).set(key, "new")
    reader = store.client(decode=False, socket_timeout=1.0)  # a pool of its own
    kept = store.HeldConnection(lambda: reader.connection_pool)
    # Both on the old master: the sentinel asked first names it, nothing newer seen yet.
    assert reader.get(key) == b"old"
    assert kept.call("GET", key) == b"old"
    _lose_replicas(on_sentinel, old)
    writer = store.client(socket_timeout=1.0)
    # Refused, the writer asks every sentinel (it may not be refused: another pool of the
    # process, a background thread's, may have been first)...
    with contextlib.suppress(redis.ConnectionError):
        writer.set(store.key("t", "moved"), "1")
    writer.set(store.key("t", "moved"), "1")  # ... and writes on the newest master
    assert reader.get(key) == b"new"
    assert kept.call("GET", key) == b"new"


def test_the_sentinel_leading_a_failover_sends_clients_to_the_promoted_master(
    on_sentinel: SentinelStack,
) -> None:
    """From the promotion until every replica follows the new master, the sentinel leading
    the failover reports the *old* master in ``SENTINEL MASTERS`` (redis-py's discovery), at
    the new configuration epoch, while its ``GET-MASTER-ADDR-BY-NAME`` and the other
    sentinels name the new one. A client asking it must go to the new master. Here the
    replica left over cannot sync from the new master (a replication user the masters do not
    know), which holds the leader in that state until the failover times out (5 s)."""
    stack = on_sentinel
    old = stack.wait_healthy()
    replicas = [p for p in stack.redis_ports if p != old]
    for port in stack.redis_ports:  # the old master, and the new, alone: both take writes
        stack.client(port).config_set("min-replicas-to-write", 0)
    for port in replicas:
        stack.client(port).config_set("masteruser", "no-such-user")  # on its next link
    try:
        new = stack.failover()

        def leading() -> tuple[int, dict[str, Any]] | None:
            for port in stack.sentinel_ports:  # whichever sentinel took the failover
                state = stack.client(port).sentinel_master(MASTER_NAME)
                if "failover_in_progress" in state["flags"]:
                    return port, state
            return None

        leader, state = wait_for(leading, timeout=10,
                                 what="the leader to reconfigure the replicas")
        assert int(state["port"]) == old  # what redis-py's discovery would take
        first = [f"127.0.0.1:{leader}", *(a for a in stack.sentinels
                                           if a != f"127.0.0.1:{leader}")]
        with override_settings(HMS_TASKS_REDIS_SENTINELS=first):  # the leader asked first
            store.reset()
            assert int(store.client().info("server")["tcp_port"]) == new
            assert asyncio.run(_async_info_port()) == new
    finally:
        for port in replicas:
            stack.client(port).config_set("masteruser", "")
        for port in stack.redis_ports:
            stack.client(port).config_set("min-replicas-to-write", 1)
    stack.wait_healthy()


async def _async_info_port() -> int:
    """The port of the server a new asyncio store client talks to."""
    client = store.async_client()
    try:
        return int((await client.info("server"))["tcp_port"])
    finally:
        await client.aclose()


def _producer_connection(options: dict[str, Any]) -> Any:
    from kombu import Connection

    return Connection(options["broker_url"].split(";")[0], transport=broker.SENTINEL_TRANSPORT,
                      transport_options=options["broker_transport_options"])


def test_a_channel_closing_on_a_master_refusing_writes_parks_its_message(
    on_sentinel: SentinelStack,
) -> None:
    """A worker's channel closes (its connection lost in a failover) while the master refuses
    writes: the restore of its unacked message must give up and park it, not retry until
    writes come back. redis-py reports a connection error while watching as a WatchError,
    which kombu's transaction retries at once: workers consumed nothing for 10-37 s after
    failovers in the benchmark."""
    from kombu import Consumer, Exchange, Producer, Queue

    from hms_tasks.celery import celery_defaults

    options = celery_defaults()
    master = on_sentinel.client(on_sentinel.master_port())
    name = "hms-test-park"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    got: list[Any] = []
    conn = _producer_connection(options)
    channel = conn.channel()
    queue(channel).declare()
    Producer(channel).publish({"n": 1}, exchange=queue.exchange, routing_key=name)
    Consumer(channel, [queue], callbacks=[lambda body, message: got.append(message)]).consume()
    conn.drain_events(timeout=10)
    tag = got[0].delivery_tag
    unacked = channel.global_keyprefix + channel.unacked_key
    assert master.hexists(unacked, tag)
    parked = broker.parked()
    closed = threading.Event()
    master.config_set("min-replicas-to-write", 3)  # 2 replicas: every write refused
    try:
        threading.Thread(target=lambda: (channel.close(), closed.set()), daemon=True).start()
        wait_for(closed.is_set, timeout=30, what="the channel to close while writes are refused")
        assert broker.parked() == parked + 1
        assert master.hexists(unacked, tag)  # nothing restored, nothing lost
    finally:
        master.config_set("min-replicas-to-write", 1)
    again = conn.channel()  # a new channel restores what is parked
    assert broker.parked() == parked
    assert master.llen(channel.global_keyprefix + name) == 1
    assert not master.hexists(unacked, tag)
    master.delete(channel.global_keyprefix + name)
    again.close()
    conn.release()


def test_a_publish_whose_queue_declaration_meets_a_refusing_master_is_retried(
    on_sentinel: SentinelStack,
) -> None:
    """kombu declares a publish's queue inside the publish, with its own retry: a refused
    declaration (``NOREPLICAS``) reconnected under the publish, which then went on with the
    closed channel and raised ``AttributeError`` (kombu's ``_connparams``) in the caller, as
    11 publishes did in the failover benchmark. It is published once the master takes writes."""

    from kombu import Exchange, Producer, Queue

    from hms_tasks.celery import celery_defaults

    options = celery_defaults()
    master = on_sentinel.client(on_sentinel.master_port())
    name = "hms-test-declare-refused"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    outcome: list[object] = []
    with _producer_connection(options) as conn:
        producer = Producer(conn)
        refused = _noreplicas(master)
        master.config_set("min-replicas-to-write", 3)  # 2 replicas: every write refused

        thread = _publishing(producer, outcome, exchange=queue.exchange, routing_key=name,
                             declare=[queue], retry_policy=options["task_publish_retry_policy"])
        try:
            thread.start()
            # The declaration (SADD of the binding) refused twice: the inner retry reconnected.
            wait_for(lambda: _noreplicas(master) > refused + 1 or outcome, timeout=30,
                     what="the declaration to be refused")
        finally:
            master.config_set("min-replicas-to-write", 1)
            thread.join(timeout=60)
    assert outcome == ["published"]
    assert master.llen(name) == 1
    master.delete(name, f"_kombu.binding.{name}")


def test_messages_the_old_master_took_after_the_promotion_are_published_again(
    on_sentinel: SentinelStack, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loss of issue 13: in a ``SENTINEL FAILOVER`` the old master takes writes for up to
    a second after a replica was promoted (its other replica keeps it above
    ``min-replicas-to-write``), then resyncs from the new master and drops them: publishes
    that returned, gone. With no worker consuming, every message published in that window is
    lost unless published again. Afterwards every message whose publish returned is on the
    new master's queue (some twice: the outbox re-publishes what may be lost)."""
    import base64
    import json

    from kombu import Exchange, Producer, Queue

    from hms_tasks import outbox
    from hms_tasks.celery import celery_defaults

    box = outbox.Outbox()
    monkeypatch.setattr(outbox, "outbox", box)
    options = celery_defaults()
    name = "hms-test-failover-window"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    published: list[int] = []
    errors: list[str] = []
    stop = threading.Event()
    with _producer_connection(options) as conn:
        producer = Producer(conn)

        def publish() -> None:
            n = 0
            while not stop.is_set():
                try:
                    producer.publish({"n": n}, exchange=queue.exchange, routing_key=name,
                                     declare=[queue], retry=True,
                                     retry_policy=options["task_publish_retry_policy"])
                    published.append(n)
                except Exception as exc:  # counted: a publish that raised returned nothing
                    errors.append(type(exc).__name__)
                n += 1

        thread = threading.Thread(target=publish)
        thread.start()
        try:
            wait_for(lambda: len(published) > 100, what="publishes before the switch")
            on_sentinel.failover()
            after = len(published)
            # The publisher has landed on the new master (it publishes there on its own).
            wait_for(lambda: len(published) > after + 200, timeout=60,
                     what="publishes after the switch")
        finally:
            stop.set()
            thread.join(timeout=60)
    new = on_sentinel.client(on_sentinel.wait_healthy())  # the old master resynced
    queued = [json.loads(base64.b64decode(json.loads(raw)["body"]))["n"]
              for raw in new.lrange(name, 0, -1)]
    new.delete(name, f"_kombu.binding.{name}")
    missing = set(published) - set(queued)
    print(f"\npublished {len(published)}, raised {len(errors)}, re-published "
          f"{box.stats['republished']}, duplicates {len(queued) - len(set(queued))}")
    assert not missing, f"{len(missing)} published messages lost in the failover"
    assert not errors


def test_a_store_client_seeing_the_new_master_publishes_the_lost_messages_again(
    on_sentinel: SentinelStack, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process that published on a master since replaced, and publishes nothing after the
    switch, still publishes the lost messages again when a store client of it (a cache read,
    a run report) first connects to the new master."""
    import json

    from hms_tasks import outbox

    box = outbox.Outbox()
    monkeypatch.setattr(outbox, "outbox", box)
    name = "hms-test-outbox-store"
    message = {"body": "e30=", "properties": {"delivery_tag": "t-1"}}
    # Taken by a master this stack never had: the new master does not continue it.
    box.landed(outbox.Master(replid="f" * 40, offset=10, replid2="0" * 40, second_offset=-1),
               [(name, json.dumps(message))], seconds=60)
    store.reset()
    store.client().ping()  # the client's first connection: the listeners run there
    master = on_sentinel.client(on_sentinel.master_port())
    pushed = [json.loads(raw) for raw in master.lrange(name, 0, -1)]
    master.delete(name)
    assert len(pushed) == 1
    assert pushed[0]["body"] == message["body"]
    assert pushed[0]["properties"]["delivery_tag"] != "t-1"
    assert box.kept() == 1  # kept again, under the master that took the copy
