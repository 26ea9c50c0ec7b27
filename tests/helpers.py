"""Test helpers: a real redis-server the test session owns, and polling with a deadline."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import redis

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], T], *, timeout: float = 15.0, interval: float = 0.02,
             what: str = "condition") -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T = check()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
        last = check()
    return last


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM a child process if it still runs (a Celery worker shuts down warm on it), then
    SIGKILL after ``timeout``: a test never leaves one behind."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RedisServer:
    """A private ``redis-server`` on a free loopback port, which tests may stop and restart."""

    def __init__(self, workdir: Path, *, appendfsync: str = "everysec") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH; `make test` installs it")
        self.binary = binary
        self.workdir = workdir
        #: Kept across restarts: clients reconnect to the same address, as after a real outage.
        self.port = free_port()
        #: ``everysec`` (the shipped broker setting) or ``always`` (no acknowledged write lost).
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen[bytes] | None = None
        #: How many times the server was started: a test that restarts it changes this.
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.starts += 1
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            # AOF, like a broker in production: a test that stops and restarts the server
            # finds its data again, as it would after a real outage.
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", self.appendfsync, "--dir", str(self.workdir),
             "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                assert self.proc is not None
                assert self.proc.poll() is None, "redis-server exited"
                return False

        wait_for(up, timeout=10, what="redis-server to answer PING")
        client.close()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing (a hung Redis)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a power cut would: only what the AOF holds survives."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


class CountingListener:
    """A TCP listener (``host``, a free port) that counts the connections it accepted, sends
    each ``greeting`` (if any) and closes it."""

    def __init__(self, host: str = "127.0.0.1", greeting: bytes = b"") -> None:
        self.sock = socket.create_server((host, 0))
        self.port = int(self.sock.getsockname()[1])
        self.address = f"127.0.0.1:{self.port}"
        self.greeting = greeting
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                if self.greeting:
                    conn.sendall(self.greeting)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # stops listening and wakes accept() now
        self.sock.close()


def until_written(client: redis.Redis, key: str, *, on: redis.Redis) -> None:
    """Write ``key`` through ``client`` until the master ``on`` has it: until the old master
    is demoted, a write may still land there (and be lost), as replication is asynchronous."""

    def written() -> bool:
        try:
            client.set(key, "1")
        except redis.ConnectionError:
            return False
        return bool(on.get(key) in ("1", b"1"))

    wait_for(written, timeout=30, interval=0.05, what="a write on the new master")
