"""Reading through the cache and warming it: the functions the HMS's views and the cache tasks
call. See :mod:`hms_tasks.cache.lua` for the consistency protocol.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Literal, TypedDict, cast, overload

import redis
from django.core.cache import caches
from django.db import connections

from hms_tasks.cache import settings
from hms_tasks.cache.backend import TaggedRedisCache
from hms_tasks.cache.registry import Kind, get_kind
from hms_tasks.cache.tags import ALL
from hms_tasks.errors import ConfigurationError, InvalidArguments

__all__ = [
    "MAX_WARM_IDS",
    "WarmSummary",
    "backend",
    "check_ids",
    "count_queries",
    "get_or_build",
    "get_or_build_many",
    "heat_key",
    "parse_key",
    "read_through",
    "ttl_of",
    "warm",
]

logger = logging.getLogger(__name__)

#: Most ids one warm call (or task) takes; larger sets are split across tasks.
MAX_WARM_IDS = 10_000
#: Ids built per round trip of generations and fills, and per database batch.
WARM_BATCH = 1000
_MISSING = object()
_STATS_TTL = 2 * 86400
#: Fills a thread may have sent without reading their replies; past it the reader waits for
#: them (Redis is slow: payloads must not pile up in socket buffers).
MAX_PENDING_FILLS = 64
_degraded_since: float | None = None
# Lease owners and new generations need tokens unique across processes, not secret ones: a
# random prefix per process and a counter (a urandom call per read was a measurable part of
# a miss). A forked child draws its own prefix (see _forked).
_token_prefix = secrets.token_hex(8)
_token_count = itertools.count()


def _token() -> str:
    return f"{_token_prefix}.{next(_token_count):x}"


def backend() -> TaggedRedisCache:
    """The tag-aware cache (``caches[HMS_TASKS_CACHE_ALIAS]``)."""
    alias = settings.get().cache_alias
    try:
        cache = caches[alias]
    except Exception:
        raise ConfigurationError(
            f"HMS_TASKS_CACHE_ALIAS: no cache {alias!r} in CACHES; add one with BACKEND"
            " 'hms_tasks.cache.TaggedRedisCache'"
        ) from None
    if not isinstance(cache, TaggedRedisCache):
        raise ConfigurationError(
            f"CACHES[{alias!r}] must use BACKEND 'hms_tasks.cache.TaggedRedisCache'"
        )
    return cache


def ttl_of(kind: str) -> int:
    """Seconds a payload of ``kind`` lives (``HMS_TASKS_CACHE_TTL``)."""
    return settings.get().ttl(kind)


def check_ids(ids: object, *, argument: str = "ids", limit: int = MAX_WARM_IDS) -> list[int]:
    """A list of positive integer ids; otherwise :class:`InvalidArguments` naming ``argument``."""
    if not isinstance(ids, (list, tuple)):
        raise InvalidArguments("cache", [f"{argument}: expected a list of integer ids"])
    if not ids:
        raise InvalidArguments("cache", [f"{argument}: must not be empty"])
    if len(ids) > limit:
        raise InvalidArguments("cache", [
            f"{argument}: at most {limit} ids per call (got {len(ids)}); split the set"])
    if not all(type(i) is int and i > 0 for i in ids):
        raise InvalidArguments("cache", [f"{argument}: every id must be a positive integer"])
    return list(dict.fromkeys(ids))


def _stats_key(be: TaggedRedisCache) -> str:
    return be.internal_key("stats", str(int(time.time() // 60)))


def heat_key(be: TaggedRedisCache) -> str:
    return be.internal_key("heat")


def _degraded(exc: Exception) -> None:
    # Say it once per outage, not once per read.
    global _degraded_since
    if _degraded_since is None:
        _degraded_since = time.monotonic()
        logger.warning("cache unreachable (%s): reading from the database until it is back",
                       type(exc).__name__)


def _recovered() -> None:
    global _degraded_since
    if _degraded_since is not None:
        logger.warning("cache reachable again after %.1f s", time.monotonic() - _degraded_since)
        _degraded_since = None


def get_or_build(kind: str, id_: int) -> dict[str, Any] | None:
    """The payload of ``kind`` for ``id_``: from the cache, or built from the database.

    On a miss only one process builds a key at a time (it holds the key's lease); the others
    wait up to ``HMS_TASKS_CACHE_WAIT_MS`` for it and otherwise read the database themselves
    without storing. A build stores its payload only if no tag of it was invalidated since
    the generations were read, which happens before the database is. Returns None when the
    row does not exist (nothing is cached then). The fill is sent, without waiting for its
    reply, before the payload is returned (a read straight after, on another connection, may
    wait for it briefly, as it waits for any builder). If Redis is down, payloads come from
    the database. Hits and misses are counted per kind and per minute; every read adds to the
    key's heat (what makes it hot for refresh-ahead).
    """
    return read_through(kind, id_)[0]


def read_through(kind: str, id_: int) -> tuple[dict[str, Any] | None, list[str] | None]:
    """:func:`get_or_build`, plus generations of the payload's tags (``all`` first, then the
    kind's tags of ``id_``) that the payload is at least as new as: on a hit the ones it was
    stored under (still current: the same atomic read checked them), on a miss the ones read
    before the build. An ETag made of them is never newer than the payload. None for the
    generations when Redis is unreachable or the hit was an undecryptable value."""
    k = get_kind(kind)
    (id_,) = check_ids([id_], argument="id")
    be = backend()
    # make_key, not make_and_validate_key: the kind builds its keys, and the validation only
    # warns about keys memcached would refuse (a loop over every character, on every call).
    made = be.make_key(k.key(id_))
    tags = [ALL, *k.tags(id_)]
    lease = be.internal_key("lease", made)
    token = _token()
    s = settings.get()
    try:
        out = _sender().read(be, [made], [
            be.gen_prefix, lease, token, s.cache_lease_ms, token,
            be.index_ttl(ttl_of(kind)), _stats_key(be), kind, heat_key(be), _STATS_TTL, *tags])
    except redis.RedisError as exc:
        _degraded(exc)
        return _build_one(k, id_), None
    _recovered()
    if out[0] == 1:
        value = be.decode(out[1], _MISSING)
        if value is not _MISSING:
            return cast(dict[str, Any], value), _header_generations(out[2], tags)
        # Undecryptable: a miss, but READ did not take the lease or read the generations.
        return _build_one(k, id_), None
    leased, gens = out[1] == 1, [g.decode() for g in out[2:]]
    if not leased:
        waited = _wait_for(be, made, s.cache_wait_ms / 1000)
        if waited is not None:
            return waited, gens
        return _build_one(k, id_), gens
    try:
        payload = _build_one(k, id_)
    except BaseException:
        _release(be, lease, token)
        raise
    if payload is None:
        _release(be, lease, token)
        return None, gens
    _fill_soon(be, made, payload, tags=tags, gens=gens, timeout=ttl_of(kind),
               lock=(lease, token))
    return payload, gens


def _header_generations(header: bytes, tags: Sequence[str]) -> list[str] | None:
    """The generations of ``tags`` in a value's header (``tag=gen,...``); None if one is not
    there (a value stored under other tags)."""
    pairs = dict(p.split("=", 1) for p in header.decode().split(",") if "=" in p)
    gens = [pairs.get(t) for t in tags]
    return None if None in gens else cast(list[str], gens)


def get_or_build_many(kind: str, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Payloads of many ids of one kind (for list views): one round trip for the hits, and
    the misses built together by the kind's ``build_many`` (a constant number of queries)
    and filled conditionally, as :func:`warm` does. No single flight here: a list is built
    by whoever asks first, once per miss. Ids without a row are left out."""
    k = get_kind(kind)
    ids = check_ids(list(ids))
    be = backend()
    made = {i: be.make_key(k.key(i)) for i in ids}
    try:
        raws = be._scripts["READ_MANY"](keys=list(made.values()), args=[be.gen_prefix])
    except redis.RedisError as exc:
        _degraded(exc)
        return dict(k.build_many(ids))
    out: dict[int, dict[str, Any]] = {}
    for i, raw in zip(ids, raws, strict=True):
        value = be.decode(raw, _MISSING) if raw else _MISSING
        if value is not _MISSING:
            out[i] = cast(dict[str, Any], value)
    misses = [i for i in ids if i not in out]
    pipe = be.client().pipeline(transaction=False)
    stats = _stats_key(be)
    pipe.hincrby(stats, f"{kind}:hit", len(out))
    pipe.hincrby(stats, f"{kind}:miss", len(misses))
    pipe.expire(stats, _STATS_TTL)
    for key in made.values():
        pipe.zincrby(heat_key(be), 1, key)
    pipe.execute()
    if misses:
        warmed = warm(kind, misses, keep=True)
        out.update(warmed)
    return {i: out[i] for i in ids if i in out}


class _Sender:
    """A miss's fill, sent without waiting for its reply (one per thread).

    The reader encodes the payload and writes the ``FILL`` call to a connection this thread
    holds out of the pool; the reply is read later, when it has arrived (before the thread's
    next fill), or with the thread's next ``READ`` (:meth:`read`), which goes over the same
    connection: its reply comes after the owed ones, read on the way, and the fills they
    answer ran before it. A hit gives the connection back to the pool (no fill follows); a
    miss keeps it for its fill. So a miss costs its reader the encoding and one ``send``,
    never the fill's round trip, and neither it nor its ``READ`` checks out a connection.
    Measured (thread CPU per miss, after a build): the ``READ`` through redis-py's client (a
    pool checkout with its socket poll, the retry and timing wrappers) 74 us, on the held
    connection 38 us; alternating rounds of 1,000 misses (load average 0.6-0.8), the
    connection given back after each ``READ`` and checked out again for the fill 1.27x the
    plain read, kept for the fill 1.23x.

    Why not a filler thread (the previous design): its round trip was off the reader's path,
    but each hand-over (a queue put, the thread waking, the GIL changing hands twice around
    the fill's socket calls) cost the reader more than the round trip saved. Measured in one
    process, alternating rounds of 1,000 misses against the plain read of the same rows
    (SQLite, load average 1-2): fill on a thread 2.11x, inline waiting for the reply 1.61x,
    sent without waiting 1.13x. Safe to defer: a fill is conditional on the generations read
    before the build, so a late one is refused if a tag changed meanwhile; a lost one (the
    process exits or Redis fails first) is a miss later, and its lease expires.
    """

    def __init__(self) -> None:
        self.connection: Any = None
        self.pool: Any = None
        self.owed = 0

    def read(self, be: TaggedRedisCache, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """The ``READ`` script's reply: over the held connection if there is one (the
        replies owed on it are read first), otherwise through the pool as any script call.
        After a miss the connection stays held, for its fill."""
        script = be._scripts["READ"]
        conn = self._held(be)
        if conn is None:
            return script(keys=keys, args=args)
        try:
            # No health check: its PING's reply would be read in place of an owed one.
            conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args,
                              check_health=False)
            self._read_owed(block=True)
            out = conn.read_response()
        except redis.ResponseError as exc:  # the READ's own: the connection is in step
            self._give_back()
            if isinstance(exc, redis.exceptions.NoScriptError):  # Redis restarted
                return script(keys=keys, args=args)  # which loads it
            raise
        except (redis.ConnectionError, redis.TimeoutError):
            # Replies lost with the connection; once more through the pool, whose retries
            # (and, behind sentinels, the new master's check) apply.
            self.drop()
            return script(keys=keys, args=args)
        except BaseException:  # interrupted halfway through a reply: out of step
            self.drop()
            raise
        if out[0] == 1:  # a hit: no fill follows
            self._give_back()
        return out

    def send(self, be: TaggedRedisCache, args: Sequence[Any]) -> None:
        try:
            if self._held(be) is not None:
                self._read_owed(block=self.owed >= MAX_PENDING_FILLS)
            if self.connection is None:
                self.pool = be.client().connection_pool
                self.connection = self.pool.get_connection()
            # EVAL, not EVALSHA: a NOSCRIPT (Redis restarted) would be seen only after the
            # fact, its fill lost; the script's 650 bytes cost less than that. No health
            # check (a PING whose reply would be read in place of an owed one).
            self.connection.send_command("EVAL", be._scripts["FILL"].script, 1, *args,
                                         check_health=not self.owed)
            self.owed += 1
        except redis.RedisError as exc:
            self.drop()
            _degraded(exc)

    def _held(self, be: TaggedRedisCache) -> Any:
        """The connection held, if it comes from ``be``'s pool; otherwise none is held any
        more (one of another backend, the settings having changed, is given back once its
        replies are read)."""
        if self.connection is not None and self.pool is not be.client().connection_pool:
            with contextlib.suppress(redis.RedisError):
                self._read_owed(block=True)
            if self.owed:
                self.drop()
            self._give_back()
        return self.connection

    def _read_owed(self, *, block: bool) -> None:
        conn = self.connection
        while self.owed and (block or conn.can_read(timeout=0)):
            self.owed -= 1
            try:
                conn.read_response(disable_decoding=True)
            except redis.ResponseError as exc:  # READONLY, NOREPLICAS, OOM: not stored
                logger.warning("cache fill refused (%s); the value was not stored",
                               type(exc).__name__)

    def _give_back(self) -> None:
        """The connection back to the pool (no reply is owed on it)."""
        conn, self.connection = self.connection, None
        if conn is not None:
            self.pool.release(conn)

    def drop(self) -> None:
        """Forget the connection (its replies unread): closed, then back to the pool."""
        conn, self.connection, self.owed = self.connection, None, 0
        if conn is not None:
            conn.disconnect()
            self.pool.release(conn)

    def __del__(self) -> None:  # the thread ended holding the connection
        with contextlib.suppress(Exception):  # at interpreter exit the pool may be gone
            if self.owed:
                self.drop()
            else:
                self._give_back()


_senders = threading.local()


def _forked() -> None:
    # A child must not read its parent's replies, nor hand out its parent's tokens.
    global _senders, _token_prefix
    _senders, _token_prefix = threading.local(), secrets.token_hex(8)


os.register_at_fork(after_in_child=_forked)


def _sender() -> _Sender:
    sender: _Sender | None = getattr(_senders, "sender", None)
    if sender is None:
        sender = _senders.sender = _Sender()
    return sender


def _fill_soon(be: TaggedRedisCache, made: str, value: Any, *, tags: Sequence[str],
               gens: Sequence[str], timeout: int, lock: tuple[str, str]) -> None:
    """Store ``value`` as :meth:`TaggedRedisCache.fill` does, without waiting (see
    :class:`_Sender`)."""
    sender = _sender()
    try:
        args = be.fill_args(value, tags=tags, gens=gens, timeout=timeout, lock=lock)
    except Exception as exc:  # the reader has its payload: a fill must never fail it
        # Never the payload or the exception's text: either may quote patient data.
        logger.error("cache fill failed (%s); the value was not stored", type(exc).__name__)
        return
    sender.send(be, [made, *args])


def _build_one(k: Kind, id_: int) -> dict[str, Any] | None:
    return k.build_many([id_]).get(id_)


def _release(be: TaggedRedisCache, lease: str, token: str) -> None:
    try:
        c = be.client()
        if c.get(lease) == token.encode():
            c.delete(lease)
    except redis.RedisError:
        pass  # the lease expires on its own


def _wait_for(be: TaggedRedisCache, made: str, seconds: float) -> dict[str, Any] | None:
    """Poll for the value another process is building, up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.002)
        try:
            (raw,) = be._scripts["READ_MANY"](keys=[made], args=[be.gen_prefix])
        except redis.RedisError as exc:  # the caller reads the database: no error page
            _degraded(exc)
            return None
        if raw:
            value = be.decode(raw, _MISSING)
            if value is not _MISSING:
                return cast(dict[str, Any], value)
    return None


class WarmSummary(TypedDict):
    kind: str
    requested: int
    written: int
    skipped_stale: int
    missing: int
    batches: int
    queries: int


@contextmanager
def count_queries(using: str = "default") -> Iterator[list[int]]:
    """Count the database queries run inside the block (in ``counter[0]``)."""
    counter = [0]

    def wrapper(execute: Any, sql: Any, params: Any, many: Any, context: Any) -> Any:
        counter[0] += 1
        return execute(sql, params, many, context)

    with connections[using].execute_wrapper(wrapper):
        yield counter


@overload
def warm(kind: str, ids: Sequence[int]) -> WarmSummary: ...


@overload
def warm(kind: str, ids: Sequence[int], *, keep: Literal[True]) -> dict[int, dict[str, Any]]: ...


def warm(kind: str, ids: Sequence[int], *, keep: bool = False
         ) -> WarmSummary | dict[int, dict[str, Any]]:
    """Build and store the payloads of ``ids``, in batches of :data:`WARM_BATCH`.

    Per batch: one round trip for the tags' generations (before the database read), the kind's
    ``build_many`` (a constant number of queries), one atomic call of conditional fills (in a
    second thread, overlapping the next batch's database read). Idempotent: warming twice
    writes the same payloads. A payload whose tag was invalidated during its batch is skipped
    (counted as ``skipped_stale``), never stored.
    """
    k = get_kind(kind)
    ids = check_ids(list(ids))
    be = backend()
    ttl = ttl_of(kind)
    summary: WarmSummary = {"kind": kind, "requested": len(ids), "written": 0,
                            "skipped_stale": 0, "missing": 0, "batches": 0, "queries": 0}
    kept: dict[int, dict[str, Any]] = {}
    filling: tuple[Future[int], int] | None = None

    def settle() -> None:
        if filling is not None:
            stored = filling[0].result()
            summary["written"] += stored
            summary["skipped_stale"] += filling[1] - stored

    # A batch's fill (serialization and the Lua call) runs in a second thread while this one
    # reads the next batch from the database: the two overlap instead of taking turns.
    with count_queries() as queries, ThreadPoolExecutor(1, "hms-cache-fill") as filler:
        for start in range(0, len(ids), WARM_BATCH):
            batch = ids[start:start + WARM_BATCH]
            tags_of = {i: k.tags(i) for i in batch}
            distinct = list(dict.fromkeys(t for tags in tags_of.values() for t in tags))
            gens = be.generations(distinct)
            gen_of = dict(zip([ALL, *distinct], gens, strict=True))
            payloads = k.build_many(batch)
            if keep:
                kept.update(payloads)
            items = []
            for i, payload in payloads.items():
                tags = [ALL, *tags_of[i]]
                items.append((be.make_key(k.key(i)), payload, tags,
                              [gen_of[t] for t in tags]))
            settle()
            filling = (filler.submit(be.fill_many, items, timeout=ttl), len(items))
            summary["missing"] += len(batch) - len(payloads)
            summary["batches"] += 1
        settle()
    summary["queries"] = queries[0]
    return kept if keep else summary


def parse_key(be: TaggedRedisCache, made_key: str) -> tuple[str, int] | None:
    """``(kind, id)`` of a made cache key of a registered kind whose key is still current."""
    prefix = be.make_key("")
    if not made_key.startswith(prefix):
        return None
    parts = made_key[len(prefix):].split(":")
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    try:
        k = get_kind(parts[0])
    except InvalidArguments:
        return None
    id_ = int(parts[1])
    # A day-keyed payload of another day is not worth re-warming.
    return (k.name, id_) if k.key(id_) == made_key[len(prefix):] else None

