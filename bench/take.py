"""The guarded transport's atomic take (``hms_tasks.broker.TAKE``) against kombu's BRPOP.

Both sides are a kombu consumer (one connection, ack on receipt) on the same private Redis,
alternating in rounds:

- drain throughput: the consumer drains N queued messages (time to the last ack);
- pick-up latency when idle: the consumer has waited on an empty queue for 0.3 s, one message
  is published, and the time to its callback is taken (M samples; median and p95).

The take replaces kombu's pop-then-record (two round trips) with one script, so it should
drain at least as fast (target: at least 0.9x kombu's). An idle consumer cannot block in a
script: it takes again after a wait of ``IDLE_WAIT`` inside Redis, which Redis ends at its next
timer tick (every 100 ms at the default ``hz 10``), so the pick-up latency of a message that
lands on idle consumers is a cost, reported beside BRPOP's immediate wake-up (no target).
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import threading
import time
from typing import Any

from kombu import Connection, Exchange, Producer, Queue

from bench.common import Row, private_redis

N = int(os.environ.get("BENCH_TAKE_N", "5000"))
M = int(os.environ.get("BENCH_TAKE_SAMPLES", "40"))
ROUNDS = int(os.environ.get("BENCH_TAKE_ROUNDS", "3"))
KOMBU = "kombu.transport.redis:Transport"


def _drain(url: str, transport: str, name: str) -> float:
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    with Connection(url, transport=transport) as conn:
        producer = Producer(conn.channel())
        queue(producer.channel).declare()
        for n in range(N):
            producer.publish({"n": n}, exchange=name, routing_key=name, serializer="json")
        got = 0

        def on_message(body: Any, message: Any) -> None:
            nonlocal got
            got += 1
            message.ack()

        with conn.Consumer(queue, callbacks=[on_message]):
            t0 = time.perf_counter()
            while got < N:
                conn.drain_events(timeout=5)
            return N / (time.perf_counter() - t0)


def _pickup(url: str, transport: str, name: str) -> list[float]:
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    arrived = threading.Event()
    sent = [0.0]
    latencies: list[float] = []
    stop = threading.Event()

    def on_message(body: Any, message: Any) -> None:
        latencies.append(time.perf_counter() - sent[0])
        message.ack()
        arrived.set()

    def consume() -> None:
        with Connection(url, transport=transport) as conn, \
                conn.Consumer(queue, callbacks=[on_message]):
            while not stop.is_set():
                with contextlib.suppress(socket.timeout):
                    conn.drain_events(timeout=0.2)

    with Connection(url) as conn:
        producer = Producer(conn.channel())
        queue(producer.channel).declare()
        thread = threading.Thread(target=consume)
        thread.start()
        try:
            for _ in range(M):
                arrived.clear()
                stop.wait(0.3)  # the consumer is idle, waiting on the empty queue
                sent[0] = time.perf_counter()
                producer.publish({}, exchange=name, routing_key=name, serializer="json")
                if not arrived.wait(10):
                    raise RuntimeError(f"{transport}: a message was not picked up in 10 s")
        finally:
            stop.set()
            thread.join()
    return latencies


def run() -> list[Row]:
    from hms_tasks import broker

    with private_redis() as url:
        rate: dict[str, list[float]] = {KOMBU: [], broker.TRANSPORT: []}
        idle: dict[str, list[float]] = {KOMBU: [], broker.TRANSPORT: []}
        for r in range(ROUNDS):
            for transport in (KOMBU, broker.TRANSPORT):
                rate[transport].append(_drain(url, transport, f"bench.take.{r}.{len(transport)}"))
                idle[transport] += _pickup(url, transport, f"bench.idle.{r}.{len(transport)}")
    ours, base = statistics.median(rate[broker.TRANSPORT]), statistics.median(rate[KOMBU])

    def p95(xs: list[float]) -> float:
        return statistics.quantiles(xs, n=20)[-1] * 1000

    p_ours, p_base = p95(idle[broker.TRANSPORT]), p95(idle[KOMBU])
    return [
        Row(what=f"drain throughput, 1 consumer ({N} messages x {ROUNDS}, median)",
            ours=ours, baseline=base, unit="msg/s", target=">= 0.9", ratio=ours / base,
            ok=ours / base >= 0.9),
        Row(what=f"idle pick-up latency, median ({M * ROUNDS} samples)",
            ours=statistics.median(idle[broker.TRANSPORT]) * 1000,
            baseline=statistics.median(idle[KOMBU]) * 1000, unit="ms", target="-"),
        Row(what=f"idle pick-up latency, p95 ({M * ROUNDS} samples)", ours=p_ours,
            baseline=p_base, unit="ms", target="-"),
    ]
