"""Distributed circuit breakers: one per service and one per instance, their state in Redis so
every web and worker process agrees.

Use::

    from hms_tasks import health

    with health.guard("ehr"):               # ServiceUnavailable at once while open
        ehr_client.fetch(...)

    @health.guard("billing")                # a decorator, for def and async def alike
    def charge(...): ...

    async with health.guard("patient", instance="10.0.0.5:8080"):
        ...

States: **closed** (calls pass); **open** after ``failure_threshold`` failures within
``failure_window`` seconds, from real calls (an exception out of a guarded block) and from
sweeps (a "down" verdict counts ``sweep_failure_weight`` failures); **half-open** once
``reset_timeout`` has passed, admitting at most ``half_open_max_calls`` trial calls at a time
across all processes (one Lua script increments the trial count, so two processes cannot both
take the last slot); **closed** again on a successful trial or sweep, **open** again on a
failed one. Every change bumps an epoch: an outcome reported under an older epoch (a slow call
that started before the breaker opened) is ignored. Changes go to the ``<p>:health:events``
stream and out as :data:`~hms_tasks.health.signals.breaker_state_changed` in the process that
made them.

Cost. A closed breaker's state is kept in the process for ``CLOSED_CACHE_S`` (2 ms) after it
was read: a guarded call on a closed breaker reads the breaker hash (one ``HMGET``) at most
once per 2 ms and breaker per process, and the calls in between cost no Redis command at all.
Nothing is written after a success: failures are counted in a window, not consecutively, so a
success in the closed state writes nothing. A failure costs one ``EVALSHA``; a call through a
half-open breaker (or one whose reset timeout has passed) costs the ``HMGET`` and an
``EVALSHA`` to be admitted, and one more to report its trial. Only the closed state is kept:
an open or half-open breaker is read at every call, and an open one refuses without any
network call to the service.

The bound this buys. A breaker opened by another process stops this process's calls within
``CLOSED_CACHE_S`` of the open (plus the one ``HMGET`` that sees it): calls that start in that
window pass as if the breaker had opened just after them, and their outcomes, reported under
the old epoch, are ignored. A change this process makes itself (a failure that opens the
breaker, a sweep, a reset) drops the kept state at once. Measured (``bench/health.py``): one
``HMGET`` through redis-py costs 120-200 us on the development machine, so reading it at every
call capped a guarded call at 5,000-8,500 calls/s, short of the 10,000 target.

Redis unreachable. The guard then fails open (calls pass, unchecked) or closed
(``ServiceUnavailable`` with state ``unknown``) per ``HMS_TASKS_BREAKER_FAIL_OPEN``, logs a
warning once when the outage starts and once when Redis answers again, and stops asking Redis
for ``REDIS_BACKOFF`` seconds after each failure: during an outage at most one call per
second and process waits for Redis, and at most ``REDIS_TIMEOUT`` (the breakers' client has
short timeouts, unlike the task-side client).

Why not pybreaker. ``pybreaker.CircuitRedisStorage`` (pybreaker 1.4.1, read in full) misses
both targets. Cost: every call reads the state (``GET``) and every success writes
(``SET fail_counter 0``): two round trips per closed call; a failure is an ``INCR`` and a
``GET``, and opening takes a ``WATCH``/``MULTI`` plus three ``SET``\\ s. Atomicity: the
open-to-half-open move is a plain ``SET`` by whichever process sees the timeout pass, and the
half-open state lets every call through, so two processes (or twenty) all make "trial" calls
at once; the failure count and the trip decision are separate commands. Also:
``CircuitBreaker.call`` holds a process-wide ``RLock`` around the guarded function itself,
serialising every guarded call of a threaded web process; failures are consecutive, not
within a window; ``opened_at`` has whole-second resolution; the async variant needs Tornado;
and a Redis outage logs a traceback on every call. Measured on the development machine (a
no-op, closed breaker, one thread, loopback Redis; pybreaker once from a scratch install, this
guard by ``make bench BENCH=health`` in the same minutes): pybreaker 7,800 calls/s at 2.0
Redis commands per call, this guard 39,000 calls/s at 1.0 (bench/RESULTS.md; the machine's
load moves both, a later busier run gave this guard 25,000).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NamedTuple, TypedDict, TypeVar, cast

import redis
import redis.asyncio as aredis
from redis.commands.core import AsyncScript, Script

from hms_tasks import conf, store
from hms_tasks.errors import ServiceUnavailable
from hms_tasks.health import keys, lua, registry
from hms_tasks.health import settings as health_settings
from hms_tasks.health.signals import breaker_state_changed

__all__ = [
    "Breaker",
    "BreakerState",
    "Guard",
    "State",
    "Ticket",
    "Transition",
    "breaker_for",
    "emit",
    "guard",
    "reset",
    "state",
    "states",
]

logger = logging.getLogger(__name__)

State = Literal["closed", "open", "half_open"]

#: Seconds the breakers' Redis client waits to connect or for an answer.
REDIS_TIMEOUT = 0.5
#: Seconds a process keeps a closed breaker's state after reading it (see the module
#: docstring: the bound on how late an opened breaker is noticed).
CLOSED_CACHE_S = 0.002
#: Seconds the guard leaves Redis alone after it failed to answer (the fail mode applies).
REDIS_BACKOFF = 1.0
#: State changes kept in the event stream (approximately).
EVENTS_KEPT = 1000
#: A breaker hash lives this long after its last change (an expired one reads as closed).
STATE_TTL = 7 * 86400

F = TypeVar("F", bound=Callable[..., Any])
#: Script arguments.
Args = list[str | int | float]
#: Fields of the breaker hash a guarded call reads.
_FIELDS = ("state", "epoch", "opened_at")


class Ticket(NamedTuple):
    """What :meth:`Breaker.admit` hands a caller it lets through."""

    #: Epoch the call was admitted under; None: passed unchecked (Redis down, failing open).
    epoch: int | None
    #: One of the half-open trial calls: its outcome closes or re-opens the breaker.
    trial: bool


@dataclass(frozen=True)
class Transition:
    service: str
    instance: str | None
    old: State
    new: State
    source: str
    epoch: int


class BreakerState(TypedDict):
    v: int
    service: str
    instance: str | None
    state: State
    epoch: int
    #: Unix time (s) the breaker last opened, or None.
    opened_at: float | None
    changed_at: float | None
    #: Trial calls admitted in the current half-open round.
    trials: int
    #: Failures counted towards the threshold (closed state).
    recent_failures: int


# -- Redis clients -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sync:
    client: redis.Redis
    admit: Script
    record: Script
    pick: Script


# The breakers' clients give up quickly and never retry (store.client with a socket timeout):
# a retry with backoff would hold a guarded call for seconds; an error goes to the fail mode at
# once instead.
@functools.cache
def _sync(url: str) -> _Sync:
    client = store.client(url=url, socket_timeout=REDIS_TIMEOUT)
    return _Sync(client, client.register_script(lua.ADMIT), client.register_script(lua.RECORD),
                 client.register_script(lua.PICK))


@dataclass(frozen=True)
class _Async:
    url: str
    client: aredis.Redis
    admit: AsyncScript
    record: AsyncScript
    pick: AsyncScript


# One asyncio client per event loop: their connections belong to the loop that made them.
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Async] = (
    weakref.WeakKeyDictionary()
)


def _async() -> _Async:
    loop = asyncio.get_running_loop()
    url = conf.get().redis_url
    found = _async_clients.get(loop)
    if found is None or found.url != url:
        client = store.async_client(url=url, socket_timeout=REDIS_TIMEOUT)
        found = _Async(url, client, client.register_script(lua.ADMIT),
                       client.register_script(lua.RECORD), client.register_script(lua.PICK))
        _async_clients[loop] = found
    return found


class _Outage:
    """Whether one Redis URL is down, as this process saw it; logs once per outage."""

    def __init__(self) -> None:
        self.until = 0.0
        self.reported = False
        self._lock = threading.Lock()

    def skip(self) -> bool:
        return self.until > 0.0 and time.monotonic() < self.until

    def failed(self, exc: BaseException) -> None:
        self.until = time.monotonic() + REDIS_BACKOFF
        with self._lock:
            if self.reported:
                return
            self.reported = True
        mode = ("failing open: guarded calls pass unchecked"
                if health_settings.get().breaker_fail_open
                else "failing closed: guarded calls raise ServiceUnavailable")
        logger.warning(
            "circuit breakers: Redis is unreachable (%s); %s until it answers"
            " (HMS_TASKS_BREAKER_FAIL_OPEN)", type(exc).__name__, mode,
        )

    def ok(self) -> None:
        if self.reported:
            with self._lock:
                if not self.reported:
                    return
                self.reported = False
                self.until = 0.0
            logger.warning("circuit breakers: Redis answers again; breakers are enforced")


_outages: dict[str, _Outage] = {}


def _outage(url: str) -> _Outage:
    found = _outages.get(url)
    if found is None:
        found = _outages.setdefault(url, _Outage())
    return found


def emit(t: Transition) -> None:
    """Log a state change made by this process and send :data:`breaker_state_changed`
    (robustly); the process forgets the breaker's kept closed state."""
    found = _breakers.get((t.service, t.instance))
    if found is not None:
        found.forget()
    where = keys.name(t.service, t.instance)
    logger.info("circuit breaker %s: %s -> %s (%s)", where, t.old, t.new, t.source)
    for receiver, result in breaker_state_changed.send_robust(
        sender=Breaker, service=t.service, instance=t.instance, old=t.old, new=t.new,
        source=t.source, epoch=t.epoch,
    ):
        if isinstance(result, Exception):
            logger.error("breaker_state_changed receiver %r raised %s", receiver,
                         type(result).__name__)


# -- the breaker ---------------------------------------------------------------------------------


class Breaker:
    """The breaker of one service, or of one of its instances. Get one with
    :func:`breaker_for`; it holds no state of its own (that is in Redis)."""

    __slots__ = ("_admit_args", "_closed", "_reset_ms", "_window_ms", "events_key",
                 "fails_key", "instance", "key", "name", "policy", "service", "spec")

    def __init__(self, spec: registry.Service, instance: str | None = None) -> None:
        if instance is not None:
            spec.instance(instance)  # UnknownService for an instance it does not have
        self.spec = spec
        self.service = spec.name
        self.instance = instance
        self.name = keys.name(spec.name, instance)
        self.key = keys.breaker(self.name)
        self.fails_key = keys.fails(self.name)
        self.events_key = keys.events()
        #: (monotonic deadline, ticket) while the closed state read last is kept.
        self._closed: tuple[float, Ticket] | None = None
        self.policy = spec.breaker
        self._reset_ms = int(spec.breaker.reset_timeout * 1000)
        self._window_ms = int(spec.breaker.failure_window * 1000)
        self._admit_args: Args = [self._reset_ms, spec.breaker.half_open_max_calls,
                                  self.name, EVENTS_KEPT, STATE_TTL]

    # -- admission --

    def admit(self) -> Ticket:
        """Let a call through (a :class:`Ticket`) or raise :class:`ServiceUnavailable`."""
        kept = self._closed
        read_at = time.monotonic()
        if kept is not None and read_at < kept[0]:
            return kept[1]
        url = conf.get().redis_url
        outage = _outage(url)
        if outage.skip():
            return self._redis_down()
        s = _sync(url)
        try:
            ticket = self._fast(s.client.hmget(self.key, _FIELDS), read_at)
            if ticket is None:
                ticket = self._admitted(s.admit(keys=[self.key, self.events_key],
                                                args=self._admit_args))
        except redis.RedisError as exc:
            outage.failed(exc)
            return self._redis_down()
        outage.ok()
        return ticket

    async def admit_async(self) -> Ticket:
        """:meth:`admit` on the running event loop's asyncio Redis client."""
        kept = self._closed
        read_at = time.monotonic()
        if kept is not None and read_at < kept[0]:
            return kept[1]
        a = _async()
        outage = _outage(a.url)
        if outage.skip():
            return self._redis_down()
        try:
            ticket = self._fast(await a.client.hmget(self.key, _FIELDS), read_at)
            if ticket is None:
                ticket = self._admitted(await a.admit(keys=[self.key, self.events_key],
                                                      args=self._admit_args))
        except redis.RedisError as exc:
            outage.failed(exc)
            return self._redis_down()
        outage.ok()
        return ticket

    def forget(self) -> None:
        """Drop the kept closed state: the next call reads the breaker from Redis."""
        self._closed = None

    def _fast(self, fields: Sequence[Any], read_at: float) -> Ticket | None:
        state, epoch, opened_at = fields
        if state is None or state == "closed":
            ticket = Ticket(int(epoch or 0), False)
            # Kept from when the read was sent: an open written after that is noticed at most
            # CLOSED_CACHE_S after it happened.
            self._closed = (read_at + CLOSED_CACHE_S, ticket)
            return ticket
        if state == "open":
            wait_ms = int(opened_at or 0) + self._reset_ms - time.time() * 1000
            if wait_ms > 0:
                # This process's clock says "not yet"; the script decides by Redis's clock
                # once it says "due", so a skewed clock delays trials, never floods them.
                raise ServiceUnavailable(self.service, self.instance, "open", wait_ms / 1000)
        return None  # half-open, or open past its reset timeout: the script decides

    def _admitted(self, result: Any) -> Ticket:
        verdict, epoch, wait_ms, moved = result
        if moved:
            emit(Transition(self.service, self.instance, "open", "half_open", "call",
                            int(epoch)))
        if verdict == "closed":
            return Ticket(int(epoch), False)
        if verdict == "trial":
            return Ticket(int(epoch), True)
        state = "open" if verdict == "open" else "half_open"
        raise ServiceUnavailable(self.service, self.instance, state, int(wait_ms) / 1000)

    def _redis_down(self) -> Ticket:
        if health_settings.get().breaker_fail_open:
            return Ticket(None, False)
        raise ServiceUnavailable(self.service, self.instance, "unknown")

    # -- outcomes --

    def record_args(self, ok: bool, *, epoch: int | None, source: str = "call",
                    weight: int = 1) -> tuple[list[str], Args]:
        """KEYS and ARGV of the RECORD script for this outcome (the sweep pipelines them)."""
        p = self.policy
        return ([self.key, self.fails_key, self.events_key],
                ["success" if ok else "failure", "" if epoch is None else epoch, weight,
                 p.failure_threshold, self._window_ms, self._reset_ms, source, self.name,
                 EVENTS_KEPT, STATE_TTL])

    def transition(self, result: Any, source: str) -> Transition | None:
        """The state change a RECORD result reports, if any."""
        new, epoch, old = result
        if not old:
            return None
        return Transition(self.service, self.instance, cast(State, old), cast(State, new),
                          source, int(epoch))

    def record(self, ok: bool, *, epoch: int | None = None, source: str = "call",
               weight: int = 1) -> Transition | None:
        """Report an outcome (``epoch`` from the ticket; None for sweeps and ad hoc reports).
        Returns the state change it caused, already emitted. A Redis error is swallowed (the
        outage is logged once): an outcome that cannot be recorded must not fail the call."""
        url = conf.get().redis_url
        outage = _outage(url)
        if outage.skip():
            return None
        k, a = self.record_args(ok, epoch=epoch, source=source, weight=weight)
        try:
            result = _sync(url).record(keys=k, args=a)
        except redis.RedisError as exc:
            outage.failed(exc)
            return None
        outage.ok()
        t = self.transition(result, source)
        if t is not None:
            emit(t)
        return t

    async def record_async(self, ok: bool, *, epoch: int | None = None,
                           source: str = "call", weight: int = 1) -> Transition | None:
        """:meth:`record` on the running event loop's asyncio Redis client."""
        client = _async()
        outage = _outage(client.url)
        if outage.skip():
            return None
        k, a = self.record_args(ok, epoch=epoch, source=source, weight=weight)
        try:
            result = await client.record(keys=k, args=a)
        except redis.RedisError as exc:
            outage.failed(exc)
            return None
        outage.ok()
        t = self.transition(result, source)
        if t is not None:
            emit(t)
        return t


_breakers: dict[tuple[str, str | None], Breaker] = {}


def breaker_for(service: str, instance: str | None = None) -> Breaker:
    """The breaker of a registered service (or instance id); :class:`UnknownService` else."""
    spec = registry.get(service)
    found = _breakers.get((service, instance))
    if found is None or found.spec is not spec:
        found = _breakers[(service, instance)] = Breaker(spec, instance)
    return found


# -- the guard -----------------------------------------------------------------------------------


class Guard:
    """Context manager (sync and async) and decorator around calls to one service or instance.

    An exception out of the guarded block counts as a failure if it is an instance of
    ``failure_on`` and not of ``ignore`` (nor a ServiceUnavailable from a nested guard, which
    says nothing about this service); any other exception, like a return, counts as the service
    having answered. The exception always propagates.
    """

    __slots__ = ("_failure_on", "_held", "_ignore", "instance", "service")

    def __init__(self, service: str, *, instance: str | None = None,
                 failure_on: tuple[type[BaseException], ...] = (Exception,),
                 ignore: tuple[type[BaseException], ...] = ()) -> None:
        breaker_for(service, instance)  # UnknownService now, not at the first call
        self.service = service
        self.instance = instance
        self._failure_on = failure_on
        self._ignore = ignore
        # Tickets of the blocks in progress, per thread and asyncio task, so one Guard object
        # can guard concurrent blocks.
        self._held: dict[tuple[int, int], list[tuple[Breaker, Ticket]]] = {}

    @property
    def breaker(self) -> Breaker:
        """The breaker, looked up at every use (a decorator outlives settings changes)."""
        return breaker_for(self.service, self.instance)

    def _counts(self, exc: BaseException) -> bool:
        return (isinstance(exc, self._failure_on) and not isinstance(exc, self._ignore)
                and not isinstance(exc, ServiceUnavailable))

    def _outcome(self, ticket: Ticket, exc: BaseException | None) -> tuple[bool, bool]:
        """(report it?, ok?) for a finished call."""
        if ticket.epoch is None:
            return False, True
        if exc is not None and self._counts(exc):
            return True, False
        return ticket.trial, True

    # -- sync --

    def __enter__(self) -> Guard:
        b = self.breaker
        ticket = b.admit()
        self._held.setdefault((threading.get_ident(), 0), []).append((b, ticket))
        return self

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        b, ticket = self._pop((threading.get_ident(), 0))
        report, ok = self._outcome(ticket, exc)
        if report:
            b.record(ok, epoch=ticket.epoch)

    def _pop(self, slot: tuple[int, int]) -> tuple[Breaker, Ticket]:
        stack = self._held[slot]
        held = stack.pop()
        if not stack:
            del self._held[slot]
        return held

    # -- async --

    @staticmethod
    def _task_slot() -> tuple[int, int]:
        return threading.get_ident(), id(asyncio.current_task())

    async def __aenter__(self) -> Guard:
        b = self.breaker
        ticket = await b.admit_async()
        self._held.setdefault(self._task_slot(), []).append((b, ticket))
        return self

    async def __aexit__(self, et: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        b, ticket = self._pop(self._task_slot())
        report, ok = self._outcome(ticket, exc)
        if report:
            await b.record_async(ok, epoch=ticket.epoch)

    # -- decorator --

    def __call__(self, fn: F) -> F:
        """Guard every call of ``fn`` (a plain or an ``async`` function)."""
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def guarded_async(*args: Any, **kwargs: Any) -> Any:
                breaker = self.breaker
                ticket = await breaker.admit_async()
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as exc:
                    report, ok = self._outcome(ticket, exc)
                    if report:
                        await breaker.record_async(ok, epoch=ticket.epoch)
                    raise
                if ticket.trial:
                    await breaker.record_async(True, epoch=ticket.epoch)
                return result

            return cast(F, guarded_async)

        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            breaker = self.breaker
            ticket = breaker.admit()
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                report, ok = self._outcome(ticket, exc)
                if report:
                    breaker.record(ok, epoch=ticket.epoch)
                raise
            if ticket.trial:
                breaker.record(True, epoch=ticket.epoch)
            return result

        return cast(F, guarded)


def guard(service: str, *, instance: str | None = None,
          failure_on: tuple[type[BaseException], ...] = (Exception,),
          ignore: tuple[type[BaseException], ...] = ()) -> Guard:
    """A :class:`Guard` for a registered service (or one of its instances, by id):
    ``with guard("ehr"):``, ``async with guard("ehr"):`` or ``@guard("ehr")``.

    Raises :class:`~hms_tasks.errors.UnknownService` for a name (or instance) that
    HMS_TASKS_SERVICES does not list, and :class:`~hms_tasks.errors.ServiceUnavailable` on
    entry while the breaker refuses calls.
    """
    return Guard(service, instance=instance, failure_on=failure_on, ignore=ignore)


# -- reading and resetting -----------------------------------------------------------------------


def _ms(value: str | None) -> float | None:
    return int(value) / 1000 if value else None


def state(service: str, instance: str | None = None) -> BreakerState:
    """The current state of a breaker, read from Redis."""
    return states([(service, instance)])[0]


def states(targets: Iterable[tuple[str, str | None]]) -> list[BreakerState]:
    """The states of several breakers in one pipelined round trip."""
    found = [breaker_for(s, i) for s, i in targets]
    pipe = store.client().pipeline(transaction=False)
    for b in found:
        pipe.hmget(b.key, ["state", "epoch", "opened_at", "changed_at", "trials"])
        pipe.llen(b.fails_key)
    raw = pipe.execute()
    out: list[BreakerState] = []
    for n, b in enumerate(found):
        st, epoch, opened, changed, trials = raw[2 * n]
        out.append({
            "v": 1, "service": b.service, "instance": b.instance,
            "state": cast(State, st or "closed"), "epoch": int(epoch or 0),
            "opened_at": _ms(opened), "changed_at": _ms(changed), "trials": int(trials or 0),
            "recent_failures": int(raw[2 * n + 1]),
        })
    return out


def reset(service: str, instance: str | None = None) -> Transition | None:
    """Force a breaker closed (an operator's override); records and emits the change."""
    b = breaker_for(service, instance)
    client = store.client()
    old = cast("str | None", client.hget(b.key, "state")) or "closed"
    if old == "closed":
        return None
    now_ms = int(time.time() * 1000)
    pipe = client.pipeline(transaction=True)
    pipe.hincrby(b.key, "epoch", 1)
    pipe.hset(b.key, mapping={"v": 1, "state": "closed", "trials": 0, "changed_at": now_ms})
    pipe.expire(b.key, STATE_TTL)
    pipe.delete(b.fails_key)
    pipe.xadd(b.events_key, {"v": 1, "breaker": b.name, "from": old, "to": "closed",
                             "at": now_ms, "source": "reset"}, maxlen=EVENTS_KEPT,
              approximate=True)
    epoch = int(pipe.execute()[0])
    t = Transition(b.service, b.instance, cast(State, old), "closed", "reset", epoch)
    emit(t)
    return t
