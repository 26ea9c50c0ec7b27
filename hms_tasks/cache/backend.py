"""``TaggedRedisCache``: Django's Redis cache backend plus tags, generations and leases.

Configure it as the ``hms`` cache (``HMS_TASKS_CACHE_ALIAS``)::

    CACHES["hms"] = {
        "BACKEND": "hms_tasks.cache.TaggedRedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "hms-cache",
    }

Everything in Django's cache API behaves as documented; on top of it:

* ``set(key, value, timeout, tags=[...])`` stores a value that dies when any of its tags is
  invalidated (``generations=`` makes the store conditional, see :mod:`hms_tasks.cache.lua`);
* ``invalidate_tags(tags)`` kills and unlinks every value stored under those tags;
* ``get``/``get_many``/``has_key`` never return a value whose tags were invalidated.

Values are JSON (never pickle: a value read from Redis must not be able to run code) and, with
``HMS_TASKS_CACHE_ENCRYPTION_KEYS`` set, encrypted with Fernet (AES-128-CBC + HMAC-SHA256) keyed
by a MultiFernet, so the first key encrypts and every listed key decrypts (rotation). A value that
fails authentication or decryption reads as a miss and is logged without its content.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property
from typing import Any

import orjson
import redis
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.core.cache import caches
from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.core.cache.backends.redis import RedisCache

from hms_tasks import store
from hms_tasks.cache import lua, settings
from hms_tasks.cache.tags import ALL, check_tags

__all__ = ["HmsSerializer", "TaggedRedisCache", "Undecryptable"]

logger = logging.getLogger(__name__)

HEADER = lua.HEADER_MAGIC.encode()
#: Seconds a generation token lives after its last use (longer than any value's TTL).
GENERATION_TTL = 7 * 86400
_FERNET_PREFIX = b"gAAAAA"


class Undecryptable(Exception):
    """A cached value failed authentication or decryption (tampered, or an unknown key)."""


class HmsSerializer:
    """JSON values, optionally Fernet-encrypted. Integers stay raw so ``incr`` keeps working."""

    def __init__(self, keys: Sequence[str] = ()) -> None:
        self._fernet = MultiFernet([Fernet(k) for k in keys]) if keys else None

    @property
    def encrypted(self) -> bool:
        return self._fernet is not None

    def dumps(self, obj: Any) -> bytes | int:
        if type(obj) is int:
            return obj
        # orjson: several times faster than json for the payloads warming writes in bulk.
        data = orjson.dumps(obj, default=str)
        return self._fernet.encrypt(data) if self._fernet else data

    def loads(self, data: bytes) -> Any:
        try:
            return int(data)
        except ValueError:
            pass
        if self._fernet is not None:
            try:
                data = self._fernet.decrypt(data)
            except InvalidToken:
                raise Undecryptable from None
        elif data.startswith(_FERNET_PREFIX):
            raise Undecryptable  # encrypted while keys were set; unreadable without them
        return orjson.loads(data)


def _new_epoch(execute: Any, replid: str, switched: bool) -> None:
    """On a Redis master a pool of this process has not used yet (see docs/cache.md,
    "Failover"): give the cache-wide tag a new generation, so that every value built before
    (perhaps under a tag bump the failover lost) reads as a miss. A pool that comes from
    another master does so always: until its connection there broke, its writes went to the
    old master and may be lost, and a value filled on the new master meanwhile may predate
    them. A pool's first master ever does so only once per master (a fresh process must not
    empty the cache). Runs before the pool sends anything to the new master
    (:func:`hms_tasks.store.on_new_master`)."""
    be = caches[settings.get().cache_alias]
    if not isinstance(be, TaggedRedisCache):
        return
    if execute("EVAL", lua.NEW_EPOCH, 2, be.internal_key("epoch"), be.gen_prefix + ALL,
               replid, secrets.token_hex(8), GENERATION_TTL, "1" if switched else "0"):
        logger.warning("new Redis master: every value cached before it now reads as a miss")


class TaggedRedisCache(RedisCache):
    """Django's ``RedisCache`` with tags: see the module docstring."""

    def __init__(self, server: str, params: dict[str, Any]) -> None:
        super().__init__(server, params)
        keys = settings.get().cache_encryption_keys
        options: dict[str, Any] = {**getattr(self, "_options", {}),
                                   "serializer": HmsSerializer(keys)}
        servers = server if isinstance(server, (list, tuple)) else [server]
        if "pool_class" not in options and store.sentinel_managed(
                str(servers[0]).split(";")[0].split(",")[0].strip()):
            # On the hms-tasks Redis behind sentinels: follow its master, and end the
            # cache's epoch on each new one (docs/cache.md, "Failover").
            options["pool_class"] = store.SentinelPool
            store.on_new_master(_new_epoch)
        self._options = options

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def serializer(self) -> HmsSerializer:
        serializer: HmsSerializer = self._redis._serializer
        return serializer

    def client(self, *, write: bool = True) -> Any:
        """The redis-py client (bytes in, bytes out) the backend uses."""
        return self._client if write else self._redis.get_client(write=False)

    @cached_property
    def _client(self) -> Any:
        # One client per backend, not Django's new one per call: constructing a redis-py 8
        # client (its event dispatcher, its argument checks) cost ~55 us, a third of what a
        # cache miss added to its database read. Safe to share: a client over a connection
        # pool is thread-safe and holds no connection itself; the pool is the one Django
        # keeps per server anyway. (A read-only client, write=False, may pick another
        # replica per call, as Django's does.)
        return self._redis.get_client(write=True)

    @property
    def _redis(self) -> Any:
        # Django's RedisCacheClient (untyped in django-stubs).
        return getattr(self, "_cache")  # noqa: B009

    @cached_property
    def _scripts(self) -> dict[str, Any]:
        c = self.client()
        return {name: c.register_script(getattr(lua, name)) for name in (
            "READ", "READ_MANY", "GENERATIONS", "CURRENT_GENERATIONS", "FILL", "FILL_MANY",
            "INVALIDATE", "RECORD_CHANGES", "APPLY_CHANGES")}

    def internal_key(self, *parts: str) -> str:
        """Keys of generations, tag indexes, leases and statistics, under the backend's prefix."""
        return ":".join((self.key_prefix or "hms-cache", "_hms", *parts))

    @property
    def gen_prefix(self) -> str:
        return self.internal_key("gen", "")

    @property
    def index_prefix(self) -> str:
        return self.internal_key("tag", "")

    @staticmethod
    def index_ttl(timeout: int) -> int:
        # Generations and indexes outlive the values filed under them; a generation that
        # expired anyway only turns those values into misses.
        return max(int(timeout) * 2, 3600)

    def decode(self, raw: bytes | None, default: Any = None) -> Any:
        """Deserialize a payload read from Redis; an undecryptable one reads as ``default``."""
        if raw is None:
            return default
        try:
            return self.serializer.loads(raw)
        except Undecryptable:
            logger.warning("cache value failed decryption or authentication; treated as a miss")
            return default

    def encode_tagged(self, value: Any, tags: Sequence[str], gens: Sequence[str]) -> bytes:
        header = ",".join(f"{t}={g}" for t, g in zip(tags, gens, strict=True)).encode()
        payload = self.serializer.dumps(value)
        body = str(payload).encode() if isinstance(payload, int) else payload
        return HEADER + header + b"|" + body

    # -- Django API with tags ----------------------------------------------------------------

    def get(self, key: str, default: Any = None, version: int | None = None) -> Any:
        key = self.make_and_validate_key(key, version=version)
        (raw,) = self._scripts["READ_MANY"](keys=[key], args=[self.gen_prefix])
        return self.decode(raw or None, default)

    def get_many(self, keys: Iterable[str], version: int | None = None) -> dict[str, Any]:
        keys = list(keys)
        if not keys:
            return {}
        made = {self.make_and_validate_key(k, version=version): k for k in keys}
        raws = self._scripts["READ_MANY"](keys=list(made), args=[self.gen_prefix])
        out: dict[str, Any] = {}
        missing = object()
        for made_key, raw in zip(made, raws, strict=True):
            value = self.decode(raw or None, missing)
            if value is not missing:
                out[made[made_key]] = value
        return out

    def has_key(self, key: str, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        (raw,) = self._scripts["READ_MANY"](keys=[key], args=[self.gen_prefix])
        return bool(raw)

    def set(  # type: ignore[override]
        self,
        key: str,
        value: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
        *,
        tags: Sequence[str] | None = None,
        generations: Sequence[str] | None = None,
    ) -> bool:
        """Django's ``set``; with ``tags``, a value that dies when a tag is invalidated.

        With ``generations`` (what :meth:`generations` returned *before* the data were read),
        the value is stored only if no tag was invalidated since: the race-free fill. Returns
        whether it was stored (Django's own ``set`` returns None).
        """
        if tags is None:
            super().set(key, value, timeout, version)
            return True
        tags = check_tags(tags)
        gens = list(generations) if generations is not None else self.generations(tags)
        if len(gens) != len(tags) + 1:
            raise ValueError("generations must be what generations(tags) returned for these tags")
        made = self.make_and_validate_key(key, version=version)
        backend_timeout = self.get_backend_timeout(timeout)
        return self.fill(made, value, tags=[ALL, *tags], gens=gens,
                         timeout=None if backend_timeout is None else int(backend_timeout))

    def generations(self, tags: Sequence[str]) -> list[str]:
        """Opaque generation tokens of ``tags`` (created if absent), preceded by the cache-wide
        one: read them before the database, hand them to a conditional ``set``/:meth:`fill`."""
        return [g.decode() for g in self._scripts["GENERATIONS"](
            args=[self.gen_prefix, secrets.token_hex(8), GENERATION_TTL, ALL, *tags])]

    def current_generations(self, tags: Sequence[str], *,
                            meanwhile: Callable[[], object] | None = None) -> list[str | None]:
        """The current generation of each of ``tags`` (None where there is none), in one
        ``MGET`` on the primary; creates nothing. ``all`` is not added: name it if wanted.
        A script, refused like the reads by a master that refuses writes (see
        :mod:`hms_tasks.cache.lua`).

        ``meanwhile``, if given, is called exactly once before this returns or raises: while
        the reply is on its way when it can be (work that does not need the generations, done
        during the round trip rather than after it: with Redis on another core, the early
        304 is 13 us faster so)."""
        keys = [self.gen_prefix + t for t in tags]
        # A list, so that whichever of the two paths runs it takes it out.
        pending = [meanwhile] if meanwhile is not None else []
        raw = self._evalsha(keys, pending)
        if raw is None:
            if pending:
                pending.pop()()
            raw = self._scripts["CURRENT_GENERATIONS"](keys=keys)
        return [None if g is None else g.decode() for g in raw]

    @cached_property
    def _held(self) -> store.HeldConnection:
        scripts = self._scripts
        return store.HeldConnection(
            lambda: scripts["CURRENT_GENERATIONS"].registered_client.connection_pool)

    def _evalsha(self, keys: list[str], pending: list[Callable[[], object]]) -> Any:
        """``CURRENT_GENERATIONS`` by ``EVALSHA`` on the connection this thread keeps
        (:class:`hms_tasks.store.HeldConnection`), without redis-py's command wrapper
        (retries, observability hooks) or a pool checkout per call: every 304 makes one;
        what is ``pending`` runs once the command is sent. None when that did not work out
        (no connection, script not loaded yet, a refusal, a broken connection): the caller
        then goes through the ``Script`` object, which loads the script and retries as any
        command does."""

        def meanwhile() -> None:
            if pending:
                pending.pop()()

        try:
            return self._held.call("EVALSHA", self._scripts["CURRENT_GENERATIONS"].sha,
                                   len(keys), *keys, meanwhile=meanwhile)
        except (redis.RedisError, OSError):
            return None

    def fill(self, made_key: str, value: Any, *, tags: Sequence[str], gens: Sequence[str],
             timeout: int | None, lock: tuple[str, str] = ("", "")) -> bool:
        """Store ``value`` at the made key if ``tags`` still have ``gens``; release ``lock``."""
        return bool(self._scripts["FILL"](keys=[made_key], args=self.fill_args(
            value, tags=tags, gens=gens, timeout=timeout, lock=lock)))

    def fill_args(self, value: Any, *, tags: Sequence[str], gens: Sequence[str],
                  timeout: int | None, lock: tuple[str, str] = ("", "")) -> list[Any]:
        """The ``FILL`` script's arguments (after its key) for :meth:`fill`."""
        ttl = int(timeout) if timeout else 86400
        args: list[Any] = [self.gen_prefix, self.index_prefix,
                           self.encode_tagged(value, tags, gens), ttl, self.index_ttl(ttl),
                           lock[0], lock[1]]
        for tag, gen in zip(tags, gens, strict=True):
            args += [tag, gen]
        return args

    def fill_many(self, items: Sequence[tuple[str, Any, Sequence[str], Sequence[str]]], *,
                  timeout: int) -> int:
        """:meth:`fill` for many ``(made_key, value, tags, gens)`` in one atomic call; returns
        how many were stored (the others had a tag invalidated since their ``gens``)."""
        if not items:
            return 0
        # The script reads each value's tags and generations from its header.
        args: list[Any] = [self.gen_prefix, self.index_prefix, timeout, self.index_ttl(timeout)]
        args += [self.encode_tagged(value, tags, gens) for _, value, tags, gens in items]
        return int(self._scripts["FILL_MANY"](keys=[i[0] for i in items], args=args))

    def invalidate_tags(self, tags: Iterable[str], *, heat_key: str = "",
                        hot_score: float = 0) -> tuple[int, list[str]]:
        """Invalidate ``tags``: returns (keys unlinked, the unlinked keys that were hot)."""
        tags = check_tags(tags)
        if not tags:
            return 0, []
        out = self._scripts["INVALIDATE"](args=[
            self.gen_prefix, self.index_prefix, secrets.token_hex(8), GENERATION_TTL, heat_key,
            hot_score, *tags])
        return int(out[0]), [k.decode() for k in out[1:]]
