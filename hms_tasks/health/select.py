"""Choosing an instance of a service with several: round robin or least connections.

``pick("patient")`` returns the base URL of one instance, skipping those whose breaker is
open (instances with a closed breaker first, then those whose breaker admits trial calls);
:class:`~hms_tasks.errors.ServiceUnavailable` when every instance's breaker is open.

Least connections needs in-flight counts every process shares: :func:`lease` (a context
manager, sync or async) picks an instance and holds an in-flight lease on it in Redis until
the block ends, in the same script. A lease is a token in a sorted set scored by its expiry,
so a process that dies mid-call leaks nothing for longer than ``ttl``::

    with health.lease("patient") as inst, health.guard("patient", instance=inst.instance):
        requests.get(inst.url + "/api/patients/42/", timeout=2)

One round trip picks (and leases); one more releases the lease. They use the breakers' Redis
client (short timeouts, no retries); with Redis unreachable, ``pick`` and ``lease`` fail open
(any instance, no lease) or closed (ServiceUnavailable) as the guard does.
"""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, get_args

import redis

from hms_tasks import conf
from hms_tasks.errors import InvalidArguments, ServiceUnavailable
from hms_tasks.health import breaker, keys, registry
from hms_tasks.health import settings as health_settings
from hms_tasks.health.breaker import Args

__all__ = ["Lease", "Strategy", "lease", "pick"]

Strategy = Literal["round_robin", "least_connections"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


def _args(service: str, strategy: str, token: str, ttl: float,
          ) -> tuple[registry.Service, list[str], Args]:
    if strategy not in STRATEGIES:
        raise InvalidArguments("hms_tasks.health.pick",
                               [f"strategy: expected one of {', '.join(STRATEGIES)}"])
    if not 0 < ttl <= 3600:
        raise InvalidArguments("hms_tasks.health.lease",
                               ["ttl: expected seconds above 0, at most 3600"])
    svc = registry.get(service)
    ks = [keys.round_robin(service)]
    for inst in svc.instances:
        name = keys.name(service, inst.id)
        ks += [keys.breaker(name), keys.inflight(name)]
    args: Args = [strategy, len(svc.instances), int(svc.breaker.reset_timeout * 1000),
                          token, int(ttl * 1000)]
    return svc, ks, args


def _chosen(svc: registry.Service, result: list[int]) -> registry.Instance:
    index = int(result[0])
    if index == 0:
        raise ServiceUnavailable(svc.name, None, "open")
    return svc.instances[index - 1]


def _redis_down(svc: registry.Service) -> registry.Instance:
    """Redis unreachable: any instance (failing open) or ServiceUnavailable (failing closed),
    as the guard does (HMS_TASKS_BREAKER_FAIL_OPEN)."""
    if health_settings.get().breaker_fail_open:
        return random.choice(svc.instances)
    raise ServiceUnavailable(svc.name, None, "unknown")


def _run_pick(svc: registry.Service, ks: list[str], args: Args) -> tuple[registry.Instance, int]:
    url = conf.get().redis_url
    outage = breaker._outage(url)
    if outage.skip():
        return _redis_down(svc), 0
    try:
        result = breaker._sync(url).pick(keys=ks, args=args)
    except redis.RedisError as exc:
        outage.failed(exc)
        return _redis_down(svc), 0
    outage.ok()
    return _chosen(svc, result), int(result[1])


def pick(service: str, *, strategy: Strategy = "round_robin") -> str:
    """The base URL of an instance of ``service`` (see the module docstring)."""
    svc, ks, args = _args(service, strategy, "", 1.0)
    return _run_pick(svc, ks, args)[0].base_url


@dataclass
class Lease:
    """An in-flight lease on one instance (see :func:`lease`)."""

    service: str
    strategy: Strategy
    ttl: float
    #: Id of the chosen instance (for ``guard(service, instance=...)``) and its base URL.
    instance: str = ""
    url: str = ""
    #: In-flight leases on the instance, this one included, when it was taken (0 when Redis
    #: was unreachable and the instance was chosen without it).
    in_flight: int = 0
    token: str = ""
    _key: str = ""

    def _take(self, inst: registry.Instance, in_flight: int) -> Lease:
        self.instance, self.url, self.in_flight = inst.id, inst.base_url, in_flight
        if in_flight:
            self._key = keys.inflight(keys.name(self.service, inst.id))
        return self

    def __enter__(self) -> Lease:
        self.token = secrets.token_hex(8)
        svc, ks, args = _args(self.service, self.strategy, self.token, self.ttl)
        return self._take(*_run_pick(svc, ks, args))

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._key:
            return
        url = conf.get().redis_url
        try:
            breaker._sync(url).client.zrem(self._key, self.token)
        except redis.RedisError as error:
            breaker._outage(url).failed(error)  # the lease expires on its own

    async def __aenter__(self) -> Lease:
        self.token = secrets.token_hex(8)
        svc, ks, args = _args(self.service, self.strategy, self.token, self.ttl)
        a = breaker._async()
        outage = breaker._outage(a.url)
        if outage.skip():
            return self._take(_redis_down(svc), 0)
        try:
            result = await a.pick(keys=ks, args=args)
        except redis.RedisError as error:
            outage.failed(error)
            return self._take(_redis_down(svc), 0)
        outage.ok()
        return self._take(_chosen(svc, result), int(result[1]))

    async def __aexit__(self, et: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if not self._key:
            return
        a = breaker._async()
        try:
            await a.client.zrem(self._key, self.token)
        except redis.RedisError as error:
            breaker._outage(a.url).failed(error)


def lease(service: str, *, strategy: Strategy = "least_connections",
          ttl: float = 60.0) -> Lease:
    """Pick an instance and hold an in-flight lease on it for the ``with`` (or ``async with``)
    block; the lease expires after ``ttl`` seconds if the block never ends."""
    return Lease(service=service, strategy=strategy, ttl=ttl)
