"""The one Redis plumbing of hms-tasks: the client factory, the key layout, the single-flight lock.

Every key is built by :func:`key` from the ``HMS_TASKS_REDIS_PREFIX`` setting (default ``hms``),
so one prefix scopes all hms-tasks state and nothing collides with Celery's own keys. Layouts are
contracts (documented in ``docs/``); change them only with a migration note.

Every Redis client of hms-tasks comes from :func:`client` (sync, ``decode`` to str or bytes) or
:func:`async_client`: one place sets timeouts, keepalive and health checks, and the one place the
coming Sentinel support plugs in. A ``rediss://`` URL verifies the server's certificate
(``ssl_ca_certs`` in its query names the CA); one that turns verification off is refused unless
``HMS_TASKS_REDIS_ALLOW_INSECURE_TLS`` (:mod:`hms_tasks.tls`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import cache
from typing import Any

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.lock import Lock
from redis.retry import Retry

from hms_tasks import conf, tls

__all__ = ["async_client", "binary_client", "client", "key", "lock", "reset", "single_flight"]

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
    return redis.Redis.from_url(
        url, decode_responses=decode, socket_keepalive=True,
        health_check_interval=HEALTH_CHECK_INTERVAL, **_options(socket_timeout))


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
    return aredis.Redis.from_url(
        _checked(url or conf.get().redis_url), decode_responses=decode, socket_keepalive=True,
        health_check_interval=HEALTH_CHECK_INTERVAL, **options)


def reset() -> None:
    """Forget cached clients (after the Redis URL changed, for example in tests)."""
    _client.cache_clear()


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
