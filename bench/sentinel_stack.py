"""A Redis master, two replicas and three sentinels on loopback: ``make sentinel``, the failover
fault test and ``make bench BENCH=failover``.

Each server is a ``redis-server`` (a sentinel is ``redis-server <file> --sentinel``, from Debian's
redis-server package) with its own directory; the master set is monitored as ``mymaster`` with
a quorum of 2. Brokers' settings: AOF ``everysec``, ``noeviction``, and
``min-replicas-to-write 1`` / ``min-replicas-max-lag 10``: a master that has had no replica
acknowledging for 10 s refuses writes, which bounds what a failover can lose to that window.
``python -m bench.sentinel_stack`` starts it in the foreground (Ctrl-C stops it) and prints the
settings that point hms-tasks at it.

With ``tls`` (:class:`TlsFiles`, certificates the caller made), every server and sentinel
listens on TLS only (``port 0``, ``tls-port``), replication and the sentinels' links to the
servers and to each other are TLS (``tls-replication yes``), and every client must present a
certificate the CA signed (``tls-auth-clients yes``): tests/faults/test_sentinel_tls.py.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis

MASTER_NAME = "mymaster"
#: A master unreachable for this long is subjectively down (sentinel's down-after-milliseconds).
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except (redis.RedisError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS stack: the CA every party trusts, the certificate every server and
    sentinel presents (as a server, and as a client to each other: it needs both key usages),
    and the certificate clients present."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path


class SentinelStack:
    """One master, two replicas, three sentinels on 127.0.0.1 (``ports``: 3 Redis, then 3
    sentinels; free ports when None). ``password`` sets ``requirepass`` on every server and
    sentinel (and the sentinels' ``auth-pass``); ``tls`` makes every port TLS only (module
    docstring)."""

    def __init__(self, workdir: Path, *, ports: list[int] | None = None,
                 password: str | None = None, tls: TlsFiles | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH: apt-get install redis-server")
        self.binary = binary
        self.workdir = workdir
        ports = ports or [free_port() for _ in range(6)]
        self.redis_ports, self.sentinel_ports = ports[:3], ports[3:]
        self.password = password
        self.tls = tls
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    # -- addresses --------------------------------------------------------------------------

    @property
    def sentinels(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.sentinel_ports]

    def url(self, db: int = 0) -> str:
        """The Redis URL for hms-tasks: host and port are not used with sentinels."""
        auth = f":{self.password}@" if self.password else ""
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.redis_ports[0]}/{db}"
        query = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in self.tls_query().items())
        return f"rediss://{auth}127.0.0.1:{self.redis_ports[0]}/{db}?{query}"

    def tls_query(self) -> dict[str, Path]:
        """The ``ssl_*`` options of a client of this stack (none without TLS)."""
        if self.tls is None:
            return {}
        return {"ssl_ca_certs": self.tls.ca, "ssl_certfile": self.tls.client_cert,
                "ssl_keyfile": self.tls.client_key}

    def client(self, port: int) -> redis.Redis:
        tls: dict[str, Any] = {k: str(v) for k, v in self.tls_query().items()}
        return redis.Redis(port=port, password=self.password, socket_timeout=2,
                           socket_connect_timeout=1, decode_responses=True,
                           ssl=bool(tls), **tls)

    def _listen(self, port: int) -> list[tuple[str, str]]:
        """The redis.conf directives that make ``port`` the listening port (TLS only, with
        TLS links to the other servers, with ``tls``)."""
        if self.tls is None:
            return [("port", str(port))]
        return [("port", "0"), ("tls-port", str(port)), ("tls-cert-file", str(self.tls.cert)),
                ("tls-key-file", str(self.tls.key)), ("tls-ca-cert-file", str(self.tls.ca)),
                ("tls-replication", "yes"), ("tls-auth-clients", "yes")]

    def master_port(self) -> int:
        """The master's port, as the first sentinel that answers says."""
        for port in self.sentinel_ports:
            try:
                addr = self.client(port).sentinel_get_master_addr_by_name(MASTER_NAME)
            except redis.RedisError:
                continue
            if addr:
                return int(addr[1])
        raise redis.ConnectionError("no sentinel answers")

    def promotions(self) -> int:
        """Failovers the sentinels made since the stack started (a spurious one too: a master
        just promoted that they judged down at once): ``+switch-master`` lines in the first
        sentinel's log. (Their config epoch counts elections, an aborted one too.)"""
        log = self.workdir / f"sentinel-{self.sentinel_ports[0]}" / "sentinel.log"
        return sum(1 for line in log.read_text(errors="replace").splitlines()
                   if "+switch-master" in line)

    # -- processes --------------------------------------------------------------------------

    def _redis_args(self, port: int) -> list[str]:
        d = self.workdir / f"redis-{port}"
        d.mkdir(parents=True, exist_ok=True)
        args = [self.binary, *(w for k, v in self._listen(port) for w in (f"--{k}", v)),
                "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--appendfsync", "everysec",
                "--maxmemory-policy", "noeviction",
                "--min-replicas-to-write", "1", "--min-replicas-max-lag", "10",
                "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
                "--dir", str(d), "--logfile", str(d / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        return args

    def _start_redis(self, port: int, replica_of: int | None) -> None:
        args = self._redis_args(port)
        # A restarted server knows its role from the sentinels' reconfiguration; a first start
        # names the master.
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.procs[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
        _wait(lambda: self.client(port).ping(), 10, f"redis on {port}")

    def _start_sentinel(self, port: int) -> None:
        d = self.workdir / f"sentinel-{port}"
        d.mkdir(parents=True, exist_ok=True)
        lines = [*(f"{k} {v}" for k, v in self._listen(port)), "bind 127.0.0.1",
                 f"dir {d}", f"logfile {d / 'sentinel.log'}",
                 f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.redis_ports[0]} 2",
                 f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
                 f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
                 f"sentinel parallel-syncs {MASTER_NAME} 2"]
        if self.password:
            lines += [f"sentinel auth-pass {MASTER_NAME} {self.password}",
                      f"requirepass {self.password}"]
        conf = d / "sentinel.conf"
        conf.write_text("\n".join(lines) + "\n")  # sentinel rewrites it: a file of its own
        self.procs[port] = subprocess.Popen([self.binary, str(conf), "--sentinel"],
                                            stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
        _wait(lambda: self.client(port).ping(), 10, f"sentinel on {port}")

    def start(self) -> None:
        master = self.redis_ports[0]
        self._start_redis(master, None)
        for port in self.redis_ports[1:]:
            self._start_redis(port, master)
        for port in self.sentinel_ports:
            self._start_sentinel(port)
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 60) -> int:
        """Until every server runs, the master has both replicas in sync, and every sentinel
        names it and knows both replicas and the two other sentinels. Returns its port."""

        def healthy() -> int | None:
            master = self.master_port()
            info = self.client(master).info("replication")
            if info.get("role") != "master" or int(info.get("connected_slaves", 0)) < 2:
                return None
            for i in range(int(info["connected_slaves"])):
                replica = info[f"slave{i}"]
                if replica.get("state") != "online" or int(replica.get("lag", 99)) > 1:
                    return None
            for port in self.sentinel_ports:
                s = self.client(port)
                m = s.sentinel_master(MASTER_NAME)
                if int(m["port"]) != master or int(m["num-other-sentinels"]) < 2:
                    return None
                if sum(1 for r in s.sentinel_slaves(MASTER_NAME)
                       if "s_down" not in r["flags"] and "disconnected" not in r["flags"]) < 2:
                    return None
            return master

        return int(_wait(healthy, timeout, "the sentinel stack to be healthy"))

    def failover(self) -> int:
        """``SENTINEL FAILOVER``; returns the new master's port once the sentinels name it."""
        for attempt in range(3):
            old = self.wait_healthy()
            # A sentinel may refuse or abort a forced failover (a replica it has not yet
            # re-checked after the previous one): ask again, another sentinel.
            try:
                self.client(self.sentinel_ports[attempt]).sentinel_failover(MASTER_NAME)
            except redis.ResponseError:
                time.sleep(1)
                continue
            try:
                return int(_wait(lambda old=old: (p := self.master_port()) != old and p, 15,
                                 "the sentinels to name a new master"))
            except TimeoutError:
                continue
        raise TimeoutError("SENTINEL FAILOVER did not switch the master in 3 attempts")

    def pause(self, port: int) -> None:
        """SIGSTOP a server: it keeps its connections and answers nothing (replication too)."""
        self.procs[port].send_signal(signal.SIGSTOP)

    def resume(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGCONT)

    def kill_master(self, *, healthy_first: bool = True,
                    before_switch: Callable[[], None] | None = None) -> int:
        """SIGKILL the master; returns the new master's port once the sentinels name it, after
        restarting the killed server (the sentinels make it a replica). ``before_switch`` runs
        right after the kill (a test resuming paused replicas, say)."""
        old = self.wait_healthy() if healthy_first else self.master_port()
        proc = self.procs.pop(old)
        proc.kill()
        proc.wait(timeout=10)
        if before_switch is not None:
            before_switch()
        new = int(_wait(lambda: (p := self.master_port()) != old and p, 60,
                        "the sentinels to name a new master"))
        self._start_redis(old, None)
        return new

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-port", type=int, default=6390,
                        help="first of 3 Redis ports (master, replica, replica)")
    parser.add_argument("--sentinel-port", type=int, default=26390,
                        help="first of 3 sentinel ports")
    parser.add_argument("--dir", help="data directory (default: a temporary one)")
    args = parser.parse_args()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="hms-sentinel-"))
    ports = [args.redis_port + i for i in range(3)] + [args.sentinel_port + i for i in range(3)]
    stack = SentinelStack(workdir, ports=ports)
    stack.start()
    print(f"master {MASTER_NAME} on 127.0.0.1:{ports[0]}, replicas on {ports[1]} and "
          f"{ports[2]}, sentinels on {', '.join(map(str, ports[3:]))} (data in {workdir})")
    print(f"REDIS_SENTINELS={','.join(stack.sentinels)} REDIS_SENTINEL_MASTER={MASTER_NAME}")
    print("Ctrl-C stops it.")
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
