"""Health sweeps and the circuit-breaker guard, each against its baseline in the same run.

* Sweep of the 8 services of the product brief (the default check and timeout, instances on
  local servers) with one hanging (accepts, never answers): the sweep's duration against the
  same checks run one after another. Target: at most the timeout plus 100 ms.
* Sweep of 500 instances (50 services x 10) answering in 50 ms: the sweep against the same
  checks one after another (the sequential sum). Target: at most 1.5 s.
* The guard on a closed breaker: calls per second of a guarded no-op against an unguarded
  one, and Redis commands per guarded call (INFO commandstats). Targets: at least 10,000
  guarded calls a second in one process, at most one round trip.

Every server is an asyncio server on 127.0.0.1 in a child process; nothing else is contacted.
``BENCH_PARTS=guard make bench BENCH=health`` runs some parts only (``sweep8``, ``sweep500``,
``guard``; comma-separated).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import resource
import statistics
import time
from typing import Any

import redis

from bench.common import Row, private_redis

PARTS = ("sweep8", "sweep500", "guard")
#: The eight services of the product brief.
SERVICES_8 = ("patient", "ehr", "appointment", "billing", "pharmacy", "laboratory", "imaging",
              "notification")
GUARD_N = int(os.environ.get("BENCH_HEALTH_GUARD_N", "20000"))
ROUNDS = int(os.environ.get("BENCH_HEALTH_ROUNDS", "3"))
SERVICES_500 = 50
PER_SERVICE = 10
DELAY = 0.05


# -- servers (child process) ---------------------------------------------------------------------


def _more_files() -> None:
    """500 sockets and then some: raise the soft file limit towards the hard one."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65_536 if hard == resource.RLIM_INFINITY else min(hard, 65_536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _serve(plan: dict[str, int], ports_out: Any, stop: Any) -> None:
    _more_files()

    def handler(mode: str) -> Any:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    line = await reader.readline()
                    if not line:
                        return
                    while (await reader.readline()) not in (b"\r\n", b""):
                        pass
                    if mode == "hang":
                        await reader.read()  # never answer; wait for the client to give up
                        return
                    if mode == "slow":
                        await asyncio.sleep(DELAY)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 16\r\n\r\n{\"status\": \"ok\"}")
                    await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
        return handle

    async def main() -> None:
        ports: dict[str, list[int]] = {}
        for mode, count in plan.items():
            ports[mode] = []
            for _ in range(count):
                server = await asyncio.start_server(handler(mode), "127.0.0.1", 0, backlog=128)
                ports[mode].append(server.sockets[0].getsockname()[1])
        ports_out.put(ports)
        while not stop.is_set():
            await asyncio.sleep(0.1)

    asyncio.run(main())


class _Servers:
    def __init__(self, plan: dict[str, int]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.stop = ctx.Event()
        queue = ctx.Queue()
        self.proc = ctx.Process(target=_serve, args=(plan, queue, self.stop), daemon=True)
        self.proc.start()
        self.ports: dict[str, list[int]] = queue.get(timeout=60)

    def close(self) -> None:
        self.stop.set()
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()


# -- measurements --------------------------------------------------------------------------------


def _sequential(services: list[Any]) -> float:
    """The same checks, one instance after another, on one event loop and one session."""
    import aiohttp

    from hms_tasks.health import checks

    async def run() -> float:
        async with aiohttp.ClientSession(trust_env=False) as session:
            prober = checks._Prober(session, services)
            t0 = time.perf_counter()
            for svc in services:
                for inst in svc.instances:
                    await prober.instance(svc, inst)
            return time.perf_counter() - t0

    return asyncio.run(run())


def _timed_sweep() -> tuple[float, dict[str, Any]]:
    from hms_tasks.health import sweep

    t0 = time.perf_counter()
    summary = sweep.sweep()
    return time.perf_counter() - t0, summary


def _bench_default_sweep() -> Row:
    from django.test import override_settings

    from hms_tasks.health import registry

    servers = _Servers({"fast": 7, "hang": 1})
    try:
        ports = servers.ports["fast"] + servers.ports["hang"]
        given = {name: {"instances": [f"http://127.0.0.1:{port}"]}
                 for name, port in zip(SERVICES_8, ports, strict=True)}
        with override_settings(HMS_TASKS_SERVICES=given):
            timeout = max(s.timeout for s in registry.services().values())
            _timed_sweep()  # warm-up: imports, the TLS context, Redis scripts
            runs = [_timed_sweep() for _ in range(ROUNDS)]
            for _, summary in runs:
                assert (summary["up"], summary["down"]) == (7, 1), summary
            baseline = _sequential(list(registry.services().values()))
    finally:
        servers.close()
    ours = max(d for d, _ in runs) * 1000
    return Row(what=f"sweep of 8 services, 1 hanging (timeout {timeout:g} s;"
                    f" worst of {ROUNDS})",
               ours=ours, baseline=baseline * 1000, unit="ms",
               target=f"<= {timeout * 1000 + 100:,.0f} ms", ratio=baseline * 1000 / ours,
               ok=ours <= timeout * 1000 + 100)


def _bench_500() -> Row:
    from django.test import override_settings

    from hms_tasks.health import registry

    servers = _Servers({"slow": SERVICES_500 * PER_SERVICE})
    try:
        ports = servers.ports["slow"]
        given: dict[str, Any] = {}
        for s in range(SERVICES_500):
            chunk = ports[s * PER_SERVICE:(s + 1) * PER_SERVICE]
            given[f"svc-{s:02d}"] = {"instances": [f"http://127.0.0.1:{p}" for p in chunk],
                                     "max_connections": PER_SERVICE}
        with override_settings(HMS_TASKS_SERVICES=given):
            _timed_sweep()
            runs = [_timed_sweep() for _ in range(ROUNDS)]
            for _, summary in runs:
                assert summary["instances_up"] == SERVICES_500 * PER_SERVICE, summary
            baseline = _sequential(list(registry.services().values()))
    finally:
        servers.close()
    ours = statistics.median(d for d, _ in runs) * 1000
    return Row(what=f"sweep of {SERVICES_500 * PER_SERVICE} instances answering in 50 ms"
                    f" ({SERVICES_500} services x {PER_SERVICE}; median of {ROUNDS})",
               ours=ours, baseline=baseline * 1000, unit="ms", target="<= 1,500 ms",
               ratio=baseline * 1000 / ours, ok=ours <= 1500)


def _commands(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


def _bench_guard(url: str) -> list[Row]:
    from django.test import override_settings

    # A registered service whose instance is never contacted: the guarded call is a no-op.
    with override_settings(HMS_TASKS_SERVICES={"ehr": {"instances": ["http://127.0.0.1:9"]}}):
        return _guard_rows(url)


def _guard_rows(url: str) -> list[Row]:
    from hms_tasks import health

    def noop() -> None:
        return None

    def unguarded() -> float:
        t0 = time.perf_counter()
        for _ in range(GUARD_N):
            noop()
        return time.perf_counter() - t0

    def guarded() -> float:
        t0 = time.perf_counter()
        for _ in range(GUARD_N):
            with health.guard("ehr"):
                noop()
        return time.perf_counter() - t0

    client = redis.Redis.from_url(url, decode_responses=True)
    guarded()  # warm-up: connections
    bare_s, ours_s = [], []
    for _ in range(ROUNDS):
        bare_s.append(unguarded())
        ours_s.append(guarded())
    before = _commands(client)
    guarded()
    per_call = (_commands(client) - before) / GUARD_N
    bare, ours = GUARD_N / statistics.median(bare_s), GUARD_N / statistics.median(ours_s)
    return [
        Row(what=f"guarded no-op, closed breaker, 1 thread ({GUARD_N:,} calls, median of"
                 f" {ROUNDS}) vs unguarded", ours=ours, baseline=bare, unit="calls/s",
            target=">= 10,000 calls/s", ratio=ours / bare, ok=ours >= 10_000),
        Row(what="guard cost per call vs an unguarded no-op call",
            ours=1e6 / ours, baseline=1e6 / bare, unit="us", target="-"),
        Row(what="Redis commands per 1,000 guarded calls (INFO commandstats)",
            ours=per_call * 1000, baseline=None, unit="cmd",
            target="<= 1,000 (1 round trip a call)", ok=per_call <= 1.0),
    ]


def run() -> list[Row]:
    chosen = [p for p in os.environ.get("BENCH_PARTS", "").split(",") if p] or list(PARTS)
    if unknown := [p for p in chosen if p not in PARTS]:
        raise SystemExit(f"BENCH_PARTS: unknown part {unknown[0]!r}; known: {', '.join(PARTS)}")
    _more_files()
    with private_redis() as url:
        os.environ["REDIS_URL"] = url
        import django

        django.setup()
        from hms_tasks import conf, store
        from hms_tasks.celery import app

        conf.reset()
        store.reset()
        app.conf.update(broker_url=url, result_backend=url)
        rows: list[Row] = []
        if "sweep8" in chosen:
            rows.append(_bench_default_sweep())
        if "sweep500" in chosen:
            rows.append(_bench_500())
        if "guard" in chosen:
            rows += _bench_guard(url)
    return rows
