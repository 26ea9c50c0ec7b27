"""The one Redis plumbing of hms-tasks: the client factory, the key layout, the single-flight lock.

Every key is built by :func:`key` from the ``HMS_TASKS_REDIS_PREFIX`` setting (default ``hms``),
so one prefix scopes all hms-tasks state and nothing collides with Celery's own keys. Layouts are
contracts (documented in ``docs/``); change them only with a migration note.

Every Redis client of hms-tasks comes from :func:`client` (sync, ``decode`` to str or bytes) or
:func:`async_client`: one place sets timeouts, keepalive and health checks. A ``rediss://`` URL
verifies the server's certificate (``ssl_ca_certs`` in its query names the CA); one that turns
verification off is refused unless ``HMS_TASKS_REDIS_ALLOW_INSECURE_TLS`` (:mod:`hms_tasks.tls`).

Sentinel. With ``HMS_TASKS_REDIS_SENTINELS`` set, a client of the hms-tasks Redis (no ``url``,
or ``url`` equal to ``HMS_TASKS_REDIS_URL``) asks the sentinels for the master named
``HMS_TASKS_REDIS_SENTINEL_MASTER`` (redis-py's :class:`~redis.sentinel.Sentinel`) and follows a
failover on its next connection; the URL still gives TLS, credentials and database. Any other
URL (a health check's instance, say) is connected directly. Django caches on the same Redis use
:class:`SentinelPool` (``OPTIONS["pool_class"]``; the tag cache sets it itself).

A Sentinel-managed pool that connects to a master it has not checked yet (its first one, or a
new one after a failover) records it under ``<prefix>:redis:master`` before its caller's
command runs there, and calls the :func:`on_new_master` listeners: the tag cache ends its epoch
there, so that no value built before a failover (under a generation bump the failover lost) is
read after it.
A master seen for the first time by everyone (its replication id differs from the recorded
one) is also logged in ``<prefix>:redis:failovers`` (:func:`failovers`, the ``redis_failover``
alert).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import cache
from typing import Any

import redis
import redis.asyncio as aredis
import redis.asyncio.sentinel as asentinel
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.connection import SSLConnection, parse_url
from redis.lock import Lock
from redis.retry import Retry

from hms_tasks import conf, tls

__all__ = [
    "HeldConnection",
    "LatestSentinel",
    "NoReplicasError",
    "SentinelConnection",
    "SentinelPool",
    "SentinelSSLConnection",
    "async_client",
    "binary_client",
    "client",
    "failovers",
    "key",
    "lock",
    "on_new_master",
    "reset",
    "sentinel_managed",
    "single_flight",
]

logger = logging.getLogger(__name__)

# Connection options of every client: a dead TCP peer must not hang a worker, and a firewall
# that drops idle connections is noticed before a command is lost on one.
SOCKET_TIMEOUT = 5.0
CONNECT_TIMEOUT = 3.0
HEALTH_CHECK_INTERVAL = 30


def _options(socket_timeout: float | None) -> dict[str, Any]:
    if socket_timeout is None:
        return {"socket_timeout": SOCKET_TIMEOUT, "socket_connect_timeout": CONNECT_TIMEOUT}
    # A caller that must give up quickly (a guarded call, a check): the same bound on the
    # connect, and no client-side retries, whose backoff would hold the caller for seconds.
    return {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout,
            "retry": Retry(NoBackoff(), 0)}


def _checked(url: str) -> str:
    # rediss:// verifies the server (redis-py's default); a URL that turns that off is
    # refused unless HMS_TASKS_REDIS_ALLOW_INSECURE_TLS (hms_tasks.tls).
    tls.refuse_insecure(url)
    return tls.normalized_url(url)


@cache
def _client(url: str, decode: bool, socket_timeout: float | None) -> redis.Redis:
    # redis-py's pool notices a fork (pid check) and reconnects in the child, so one client per
    # process and URL is safe with the prefork pool.
    options: dict[str, Any] = {
        "decode_responses": decode, "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_INTERVAL, **_options(socket_timeout)}
    if sentinel_managed(url):
        return redis.Redis(connection_pool=SentinelPool.from_url(url, **options))
    return redis.Redis.from_url(url, **options)


def client(*, decode: bool = True, url: str | None = None,
           socket_timeout: float | None = None) -> redis.Redis:
    """The shared Redis client for hms-tasks state (``HMS_TASKS_REDIS_URL`` unless ``url``).

    ``decode`` returns str (False: bytes, for packed values); ``socket_timeout`` makes a
    separate client for calls that must give up quickly: that timeout for connecting and for
    each answer, and no retries.
    """
    return _client(_checked(url or conf.get().redis_url), decode, socket_timeout)


def binary_client() -> redis.Redis:
    """The same Redis as :func:`client`, returning bytes (for packed binary values)."""
    return client(decode=False)


def async_client(*, url: str | None = None, decode: bool = True,
                 socket_timeout: float | None = None) -> aredis.Redis:
    """A new asyncio client (one per event loop: asyncio clients cannot be shared across
    loops), with the same options as :func:`client`."""
    options = _options(socket_timeout)
    if "retry" in options:
        options["retry"] = AsyncRetry(NoBackoff(), 0)
    url = _checked(url or conf.get().redis_url)
    options.update(decode_responses=decode, socket_keepalive=True,
                   health_check_interval=HEALTH_CHECK_INTERVAL)
    if sentinel_managed(url):
        addresses, sentinel_kwargs, master_kwargs = _sentinel_config(url, options)
        manager = _AsyncSentinel(addresses, sentinel_kwargs=sentinel_kwargs)
        master: aredis.Redis = manager.master_for(
            _master_name(), redis_class=aredis.Redis, **master_kwargs)
        return master
    return aredis.Redis.from_url(url, **options)


def reset() -> None:
    """Forget cached clients and the connections threads keep (:class:`HeldConnection`),
    after the Redis URL or the sentinels changed (in tests, for example)."""
    _client.cache_clear()
    _forget_held_connections()
    _newest.clear()


# -- Sentinel ---------------------------------------------------------------------------------

# redis-py's URL parser is untyped.
_parse_url: Any = parse_url


def _no_master(name: str, reasons: list[str]) -> str:
    why = "; ".join(reasons) or ("every sentinel answered, none names a healthy master by"
                                 " that name (HMS_TASKS_REDIS_SENTINEL_MASTER)")
    return f"No master found for {name!r}: {why}"


def _sentinel_reason(sentinel: Any, exc: BaseException) -> str:
    address = sentinel.connection_pool.connection_kwargs
    return f"sentinel {address.get('host')}:{address.get('port')}: {exc}"


class _ExplainingSentinel(redis.sentinel.Sentinel):
    """redis-py's Sentinel, whose ``MasterNotFoundError`` says why each sentinel failed.

    redis-py 8 puts each sentinel's error in that message as ``repr(error)``, which its
    exceptions reduce to their type (``network:ConnectionError``): a CA that did not sign the
    sentinels' certificate, a missing client certificate, plain text to a TLS port, a wrong
    password and a sentinel that is down all read alike. This is redis-py's
    ``discover_master`` loop keeping each error's text instead (redis-py's messages name the
    address and the TLS reason, never a password); hms-tasks never sets ``force_master_ip``,
    which it leaves out.
    """

    def discover_master(self, service_name: str) -> Any:
        _, state = self.master_state(service_name)
        return state["ip"], state["port"]

    def master_state(self, service_name: str) -> tuple[Any, dict[str, Any]]:
        """The first answering sentinel, and its state of the master (``SENTINEL MASTERS``)."""
        this: Any = self  # redis-py's Sentinel is partly untyped
        reasons = []
        for i, sentinel in enumerate(this.sentinels):
            try:
                masters = sentinel.sentinel_masters()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                reasons.append(_sentinel_reason(sentinel, exc))
                continue
            state: dict[str, Any] | None = masters.get(service_name)
            if state and this.check_master_state(state, service_name):
                # The sentinel that answered is asked first next time (as redis-py does).
                this.sentinels[0], this.sentinels[i] = sentinel, this.sentinels[0]
                return sentinel, state
        raise redis.sentinel.MasterNotFoundError(_no_master(service_name, reasons))


class _ExplainingAsyncSentinel(asentinel.Sentinel):
    """:class:`_ExplainingSentinel` for asyncio clients (the health checks' and breakers'),
    which also asks a sentinel leading a failover for the promoted master (see
    :func:`_named`); a sentinel that cannot say is skipped."""

    async def discover_master(self, service_name: str) -> Any:
        this: Any = self  # redis-py's Sentinel is partly untyped
        reasons = []
        for i, sentinel in enumerate(this.sentinels):
            try:
                masters = await sentinel.sentinel_masters()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                reasons.append(_sentinel_reason(sentinel, exc))
                continue
            state = masters.get(service_name)
            if not (state and this.check_master_state(state, service_name)):
                continue
            address = state["ip"], state["port"]
            if "failover_in_progress" in str(state.get("flags", "")).split(","):
                try:
                    named = await sentinel.sentinel_get_master_addr_by_name(service_name)
                except redis.RedisError as exc:
                    reasons.append(_sentinel_reason(sentinel, exc))
                    continue
                if not named:
                    continue
                host = named[0].decode() if isinstance(named[0], bytes) else str(named[0])
                address = host, int(named[1])
            this.sentinels[0], this.sentinels[i] = sentinel, this.sentinels[0]
            return address
        raise asentinel.MasterNotFoundError(_no_master(service_name, reasons))


# redis-py's Sentinel constructors are untyped.
_Sentinel: Any = _ExplainingSentinel
_AsyncSentinel: Any = _ExplainingAsyncSentinel

#: Called as ``listener(execute, replid, switched)`` by every Sentinel-managed pool (each
#: client of the store, each Django cache on it), on each master it connects to for the first
#: time, when the pool is on the store's database (that of ``HMS_TASKS_REDIS_URL``):
#: ``execute(*command)`` runs a command on that master (before the pool's caller sends
#: its own), ``replid`` is the master's replication id (a new one at every promotion),
#: ``switched`` whether the pool was connected to another master before (it may have written
#: there after the promotion: writes the failover loses).
MasterListener = Callable[[Callable[..., Any], str, bool], None]
_listeners: list[MasterListener] = []
#: Seconds a failover stays in ``<prefix>:redis:failovers``.
FAILOVER_HISTORY = 7 * 86400

# Record the master (its replication id) and, when it replaces a recorded one, the failover.
# KEYS: 1 master key, 2 failovers zset. ARGV: 1 replid, 2 now, 3 history seconds.
# Returns 0 (known), 1 (a new master: a failover), 2 (none recorded: a fresh Redis).
_RECORD_MASTER = """
local had = redis.call('GET', KEYS[1])
if had == ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
if not had then return 2 end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[2] - ARGV[3])
return 1
"""


def on_new_master(listener: MasterListener) -> None:
    """Register ``listener`` (see :data:`MasterListener`; once per function). An exception
    out of it fails the command that needed the connection (redis-py's retry, or the
    caller's, tries again), so what a listener does is done before the pool is used."""
    if listener not in _listeners:
        _listeners.append(listener)


def sentinel_managed(url: str | None = None) -> bool:
    """Whether a client of ``url`` (None: ``HMS_TASKS_REDIS_URL``) goes through the sentinels:
    they are configured, and ``url`` is the hms-tasks Redis."""
    core = conf.get()
    return bool(core.redis_sentinels) and (url is None or url == core.redis_url)


def _master_name() -> str:
    return conf.get().redis_sentinel_master or ""


def _sentinel_config(url: str, options: dict[str, Any]) -> tuple[
        list[tuple[str, int]], dict[str, Any], dict[str, Any]]:
    """(sentinel addresses, options of the sentinels' clients, options of the master's)
    from the settings and ``url`` (whose host and port are not used)."""
    core = conf.get()
    master = {k: v for k, v in _parse_url(tls.normalized_url(url)).items()
              if k not in ("host", "port", "path")}
    master.update(options)
    if master.pop("connection_class", None) is SSLConnection:
        master["ssl"] = True
    # A caller that must give up quickly (its own timeout, no retries) gives up as quickly
    # when the sentinels fail: with redis-py's default retries, asking three sentinels that
    # refuse took 12 s (a commit's 0.1 s invalidation call included).
    sentinel: dict[str, Any] = {
        k: v for k, v in options.items()
        if k in ("socket_timeout", "socket_connect_timeout", "retry")}
    sentinel.setdefault("socket_timeout", SOCKET_TIMEOUT)
    sentinel.setdefault("socket_connect_timeout", CONNECT_TIMEOUT)
    if core.redis_sentinel_username:
        sentinel["username"] = core.redis_sentinel_username
    if core.redis_sentinel_password:
        sentinel["password"] = core.redis_sentinel_password
    if core.redis_sentinel_tls:
        sentinel["ssl"] = True
        sentinel.update({k: v for k, v in master.items() if k.startswith("ssl_")})
    addresses = []
    for entry in core.redis_sentinels:
        host, _, port = entry.rpartition(":")
        addresses.append((host.strip("[]"), int(port)))
    return addresses, sentinel, master


def _store_db() -> int:
    """The database number of ``HMS_TASKS_REDIS_URL``."""
    return int(_parse_url(tls.normalized_url(conf.get().redis_url)).get("db", 0))


def _check_master(conn: Any, *, switched: bool) -> None:
    """Record the master ``conn`` is connected to and run the listeners on it, if ``conn`` is
    on the store's database. A pool on another database of the same Redis (a Django cache
    given :class:`SentinelPool` as its ``pool_class``) holds none of the state they keep:
    written there, the master's record, the cache's epoch and the outbox's messages would be
    lost to the store's clients (the store's own pools check every master anyway)."""
    if int(conn.db) != _store_db():
        return

    def execute(*command: Any) -> Any:
        conn.send_command(*command)
        return conn.read_response()

    info = execute("INFO", "replication")
    text = info.decode() if isinstance(info, bytes) else str(info)
    replid = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                   if line.startswith("master_replid:")), "")
    seen = execute("EVAL", _RECORD_MASTER, 2, key("redis", "master"),
                   key("redis", "failovers"), replid, time.time(), FAILOVER_HISTORY)
    for listener in _listeners:
        listener(execute, replid, switched)
    if int(seen) == 1:
        logger.warning("Redis failover: a new master serves %r", _master_name())


#: Seconds after a master refused a write during which discovery double-checks it.
REFUSAL_MEMORY = 10.0
#: Master address -> when (monotonic) it last refused a write (``NOREPLICAS``, or demoted).
_refused: dict[tuple[str, int], float] = {}
#: Seconds during which a newer master, once seen, makes discovery double-check an answer
#: naming an older one (the sentinels agree again within a second or two).
NEWS_MEMORY = 10.0
#: Master name -> (config epoch, address, when seen (monotonic)) of the newest master any
#: discovery of this process has seen.
_newest: dict[str, tuple[int, tuple[str, int], float]] = {}
#: How many times a newer master than any before was seen (a :class:`HeldConnection`
#: checked out before the last one moves).
_news = 0


def _seen(service_name: str, epoch: int, address: tuple[str, int]) -> None:
    """Note the master a sentinel named, at its configuration epoch."""
    global _news
    newest = _newest.get(service_name)
    if newest is None or epoch > newest[0] or (epoch, address) == newest[:2]:
        _newest[service_name] = (epoch, address, time.monotonic())
        if newest is not None and epoch > newest[0]:
            _news += 1


def _newest_epoch(service_name: str) -> int:
    newest = _newest.get(service_name)
    return -1 if newest is None else newest[0]


class LatestSentinel(_ExplainingSentinel):
    """redis-py's Sentinel, which does not send a client back to an old master while a
    sentinel already names a newer one.

    redis-py takes the first sentinel that answers. Right after a failover the sentinels do
    not agree for up to a second (the leader knows first, the others learn it from its hello
    messages), and the old master, until the sentinels demote it, still serves: a client
    whose write the old master refused (``NOREPLICAS``, or ``READONLY`` once demoted)
    reconnected to it again and again through a sentinel that still named it, while other
    clients used the new master. The cache's commits then stayed buffered while readers
    elsewhere were served by the new master: stale reads up to a second after the switch in
    the failover fault test. Here every sentinel is asked, and the master of the newest
    configuration epoch taken, when the first answer names a master that refused a write
    within :data:`REFUSAL_MEMORY` seconds, or one older than a master this process saw within
    :data:`NEWS_MEMORY` seconds. Otherwise it is one sentinel, as in redis-py: a sentinel host
    that drops packets costs its timeout only in those windows."""

    def discover_master(self, service_name: str) -> tuple[str, int]:
        sentinel, state = self.master_state(service_name)
        first = _named(sentinel, state, service_name)
        address = (str(state["ip"]), int(state["port"]))
        if first is not None:
            epoch, address = first
            _seen(service_name, epoch, address)
            now = time.monotonic()
            refused = _refused.get(address)
            newest = _newest.get(service_name, (epoch, address, now))
            if ((refused is None or now - refused > REFUSAL_MEMORY)
                    and (epoch >= newest[0] or now - newest[2] > NEWS_MEMORY)):
                return address
        this: Any = self
        best: tuple[int, tuple[str, int]] | None = None
        check: Any = self.check_master_state
        for sentinel in this.sentinels:
            try:
                masters: Any = sentinel.sentinel_masters()
            except (redis.ConnectionError, redis.TimeoutError):
                continue
            state = masters.get(service_name)
            if not (state and check(state, service_name)):
                continue
            named = _named(sentinel, state, service_name)
            if named is None:
                continue
            _seen(service_name, *named)
            if best is None or named[0] > best[0]:
                best = named
        return best[1] if best is not None else address


def _named(sentinel: Any, state: dict[str, Any],
           service_name: str) -> tuple[int, tuple[str, int]] | None:
    """(configuration epoch, address) of the master ``sentinel`` names, given its ``SENTINEL
    MASTERS`` ``state``. Why not the state's address alone (as redis-py): the sentinel that
    leads a failover reports the *old* master there, at the *new* epoch, from the promotion
    until every replica follows the new one (a second or more), while ``GET-MASTER-ADDR-BY-NAME``
    (what the Sentinel client guidelines ask clients to use) already names the promoted one,
    as the other sentinels do (measured: 1.1 s of the leader naming the old master at epoch
    e+1 while the others named the new one at e+1). Clients asking the leader kept going to
    the old master, which refused their writes, while clients asking the others used the new
    one: the cache's commits bounced for 0.9 s while its reads were served. None when that
    sentinel cannot say (gone since, or its ACL refuses the command): its state's address may
    be the old master at the new epoch, which would hide the new one (same epoch)."""
    address = (str(state["ip"]), int(state["port"]))
    if "failover_in_progress" in str(state.get("flags", "")).split(","):
        try:
            named: Any = sentinel.sentinel_get_master_addr_by_name(service_name)
        except redis.RedisError:
            return None
        if not named:
            return None
        host = named[0].decode() if isinstance(named[0], bytes) else str(named[0])
        address = (host, int(named[1]))
    return int(state.get("config-epoch", 0)), address


_Sentinel = LatestSentinel


class NoReplicasError(redis.ConnectionError):
    """The master refused a write for want of replicas (``min-replicas-to-write``), as a
    newly promoted master does until the sentinels have given it its replicas (a second or
    so). A connection error, so that every client (kombu, Celery's backend, ours) retries it
    as it retries the switch itself, instead of failing a task or stopping a worker."""


class SentinelConnection(redis.sentinel.SentinelManagedConnection):
    """redis-py's Sentinel-managed connection, raising :class:`NoReplicasError` for a
    ``NOREPLICAS`` reply (redis-py raises a plain ResponseError, which nothing retries)."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        base: Any = super()
        try:
            return base.read_response(*args, **kwargs)
        except redis.ResponseError as exc:
            if str(exc).startswith("NOREPLICAS"):
                _refused[(str(self.host), int(self.port))] = time.monotonic()
                raise NoReplicasError(str(exc)) from None
            raise
        except redis.ConnectionError:
            # redis-py's own: a READONLY reply from the master, demoted (its message names
            # it: "The previous master is now a slave"); or the connection broke.
            _refused[(str(self.host), int(self.port))] = time.monotonic()
            raise


class SentinelSSLConnection(SentinelConnection, SSLConnection):
    """:class:`SentinelConnection` over TLS."""


class SentinelPool(redis.sentinel.SentinelConnectionPool):
    """redis-py's Sentinel connection pool of the master named by the settings, which checks
    each master it connects to for the first time (:func:`on_new_master`).

    ``from_url`` takes the URL the way Django's Redis cache hands it over (``pool_class``):
    TLS, credentials and database from the URL, the master's address from the sentinels.
    """

    #: The master (host, port) this pool checked last.
    hms_checked: tuple[str, int] | None = None
    #: The newest master's configuration epoch this pool has moved to (or found it on).
    hms_epoch = -1

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> SentinelPool:
        addresses, sentinel_kwargs, master = _sentinel_config(_checked(url), kwargs)
        master["connection_class"] = (SentinelSSLConnection if master.pop("ssl", False)
                                      else SentinelConnection)
        manager = _Sentinel(addresses, sentinel_kwargs=sentinel_kwargs)
        pool = cls(_master_name(), manager, **master)
        pool.hms_epoch = _newest_epoch(pool.service_name)
        return pool

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        conn: Any = super().get_connection(*args, **kwargs)
        newest = _newest.get(self.service_name)
        if newest is not None and newest[0] > self.hms_epoch:
            # Another pool of this process has seen a newer master. Until the sentinels
            # demote the old one (seconds), this pool's connections to it still work: its
            # reads missed this process's commits, which went to the new master or were
            # buffered (stale reads a second after a switch in the failover benchmark). The
            # reconnect discovers again, and redis-py then drops the pool's other connections
            # to the old master. Once per newer master that worked out: if the discovery
            # names the old one all the same, the pool stays there (no reconnect per call).
            if (conn.host, conn.port) != newest[1]:
                try:
                    conn.disconnect()
                    conn.connect()
                except BaseException:
                    self.release(conn)
                    raise
            self.hms_epoch = newest[0]
        address = (conn.host, conn.port)
        if address != self.hms_checked:
            try:
                _check_master(conn, switched=self.hms_checked is not None)
            except (redis.RedisError, OSError) as exc:
                conn.disconnect()
                self.release(conn)
                raise redis.ConnectionError("a new Redis master could not be checked") from exc
            except BaseException:
                conn.disconnect()
                self.release(conn)
                raise
            self.hms_checked = address
        return conn


class _Holding:
    """One thread's connection (given back to its pool when the thread ends)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.news = _news
        self.connection: Any = pool.get_connection()

    def drop(self) -> None:
        conn, self.connection = self.connection, None
        if conn is not None:
            conn.disconnect()  # a reply may be unread: never hand it out as it is
            self.pool.release(conn)

    def __del__(self) -> None:
        with suppress(Exception):  # at interpreter exit the pool may be gone
            if self.connection is not None:
                self.pool.release(self.connection)


class HeldConnection:
    """A connection of a pool that each thread keeps from one call to the next, for the calls
    on a request's or a commit's path (redis-py's public ``get_connection``, ``send_command``
    and ``read_response``).

    Why not the client: each of its calls checks a connection out of the pool and back in,
    and the checkout polls the socket for stray data first. Measured (loopback, an
    ``EVALSHA`` of an ``MGET`` of two keys, 5 x 5,000 calls alternated): 92-108 us a call
    through the pool, 78-86 us on a kept connection. redis-py has nothing per thread (its
    ``single_connection_client`` is one connection for all threads, behind a lock).

    ``pool_of`` gives the pool when a thread has no connection: its first call, and the first
    after a failure. Any failure but an error reply disconnects and forgets the connection,
    so the next call checks out a fresh one (behind sentinels: on the master they name now,
    checked as every new master is). After a fork the child checks out its own. No retries
    here: the caller decides (a commit's call makes one more try, a 304 falls back on the
    client).
    """

    def __init__(self, pool_of: Callable[[], Any]) -> None:
        self._pool_of = pool_of
        self._local = threading.local()
        # Weakly: a Django cache backend (one per thread) keeps one of these.
        _held_connections.add(self)

    def call(self, *command: Any, meanwhile: Callable[[], object] | None = None,
             check_health: bool = True, **read: Any) -> Any:
        """Send ``command`` and return its reply (``read`` goes to ``read_response``, such
        as ``disable_decoding``); ``meanwhile`` runs once the command is sent, before the
        reply is read. Raises what redis-py raises."""
        held: _Holding | None = getattr(self._local, "held", None)
        if held is not None and held.news != _news:
            # A newer master was seen since: this connection may be on the old one, which
            # serves until the sentinels demote it (see SentinelPool.get_connection).
            held.drop()
        if held is None or held.connection is None:
            held = self._local.held = _Holding(self._pool_of())
        conn = held.connection
        try:
            conn.send_command(*command, check_health=check_health)
            if meanwhile is not None:
                meanwhile()
            return conn.read_response(**read)
        except redis.ResponseError:
            raise  # an error reply, read whole: the connection is in step
        except BaseException:
            held.drop()
            raise

    def drop(self) -> None:
        """Disconnect this thread's connection, if it holds one."""
        held: _Holding | None = getattr(self._local, "held", None)
        if held is not None:
            held.drop()


_held_connections: weakref.WeakSet[HeldConnection] = weakref.WeakSet()


def _forget_held_connections() -> None:
    # A child must not use (nor read replies on) its parent's connections.
    for held in list(_held_connections):
        held._local = threading.local()


os.register_at_fork(after_in_child=_forget_held_connections)


def failovers(*, since: float = 0.0) -> int:
    """How many Redis failovers processes saw since ``since`` (a Unix time), as recorded in
    ``<prefix>:redis:failovers`` (kept a week)."""
    return int(client().zcount(key("redis", "failovers"), since, "+inf"))


def key(*parts: str) -> str:
    """``<prefix>:<part>:<part>...``: the one way hms-tasks names a Redis key."""
    return ":".join((conf.get().redis_prefix, *parts))


def lock(name: str, *, ttl: float) -> Lock:
    """A lock at ``<prefix>:lock:<name>`` that expires after ``ttl`` seconds.

    redis-py's :class:`~redis.lock.Lock`: a random token per holder, and release and extend
    are Lua scripts that check the token, so a run whose lock expired can never free the lock
    of the run that took it over.
    """
    return Lock(client(), key("lock", name), timeout=ttl, blocking=False)


@contextmanager
def single_flight(name: str, *, ttl: float) -> Iterator[bool]:
    """Run the block in one process at a time: yields True when this process holds the lock
    (and releases it after, if still its own), False when another does (skip the work)."""
    held = lock(name, ttl=ttl)
    acquired = bool(held.acquire(blocking=False))
    try:
        yield acquired
    finally:
        if acquired:
            # Expired and maybe taken over: then it is not ours to free any more.
            with suppress(redis.exceptions.LockError):
                held.release()
