"""The Redis client factory and the key layout of everything hms-tasks stores in Redis.

Every key is built by :func:`key` from the ``HMS_TASKS_REDIS_PREFIX`` setting (default ``hms``),
so one prefix scopes all hms-tasks state and nothing collides with Celery's own keys. Layouts are
contracts (documented in the README); change them only with a migration note.
"""

from __future__ import annotations

from functools import cache

import redis

from hms_tasks import conf

__all__ = ["binary_client", "client", "key", "reset"]


@cache
def _client(url: str, decode: bool = True) -> redis.Redis:
    # redis-py's pool notices a fork (pid check) and reconnects in the child, so one client per
    # process and URL is safe with the prefork pool. Timeouts keep a dead TCP peer from hanging
    # a worker; health checks catch connections a firewall dropped while idle.
    return redis.Redis.from_url(
        url,
        socket_timeout=5,
        socket_connect_timeout=3,
        socket_keepalive=True,
        health_check_interval=30,
        decode_responses=decode,
    )


def client() -> redis.Redis:
    """The shared Redis client for hms-tasks state (``HMS_TASKS_REDIS_URL``), decoding to str."""
    return _client(conf.get().redis_url)


def binary_client() -> redis.Redis:
    """The same Redis as :func:`client`, returning bytes (for packed binary values)."""
    return _client(conf.get().redis_url, False)


def reset() -> None:
    """Forget cached clients (after the Redis URL changed, for example in tests)."""
    _client.cache_clear()


def key(*parts: str) -> str:
    """``<prefix>:<part>:<part>...``: the one way hms-tasks names a Redis key."""
    return ":".join((conf.get().redis_prefix, *parts))
