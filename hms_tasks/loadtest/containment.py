"""OS-level containment of a load-test runner: a network namespace whose only way out is the target.

A user's locustfile is code. The runner's Python-level connect guard
(:mod:`hms_tasks.loadtest.runner`) checks connects made through Python's (gevent's) socket
class, but ``import _socket`` or a C extension opens sockets beneath it. Where the host allows
it, each shard therefore starts its runner in new network and mount namespaces
(``unshare --net --mount``, or ``unshare --user --map-root-user --net --mount`` for a worker
that is not root, with unprivileged user namespaces on), and the namespace has nothing but its
own loopback device:

- Inside, before any user code is loaded (:func:`enter`, called by the runner first thing),
  ``lo`` comes up and carries each of the target's addresses (resolved once by the shard,
  outside), a listening socket is opened on each address and the target's port, and the
  listening sockets are handed to the shard over an inherited Unix socket pair
  (``SCM_RIGHTS``), which the runner then closes. A host name target gets an ``/etc/hosts``
  of its own (a bind mount visible in the runner's mount namespace only) that maps the name to
  those addresses, so URLs, ``Host`` headers and TLS server names stay what the settings say.
- Outside, the shard's :class:`Forwarder` (a thread running an asyncio loop) accepts on those
  listening sockets and relays each connection, byte for byte, to the same address and port in
  the host's namespace: the only connection the runner can get out of its namespace.

Any other connect from the runner, whatever code makes it, meets an empty namespace: another
port on loopback is refused, any other address has no route, and DNS servers are out of
reach. What the namespace does not cover: Unix sockets bound to a path are files, not network
endpoints, so a runner can still open those its user may open (``/run/postgresql``, a Redis
``unixsocket``); keep such sockets out of reach of the worker's user. Where namespaces cannot
be made (no root and no unprivileged user namespaces, a container without ``CAP_SYS_ADMIN``,
no ``unshare`` or ``ip``), only the Python-level guard holds: ``HMS_TASKS_LOADTEST_CONTAINMENT``
says whether that is acceptable (``auto`` warns, ``required`` fails the shard).

This module is imported by the runner subprocess too: it stays free of Django, Celery, pydantic,
Locust and gevent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Forwarder", "Target", "enter", "namespace_command", "target_of"]

logger = logging.getLogger(__name__)

#: Seconds a namespace probe may take.
_PROBE_TIMEOUT = 30
_LISTEN_BACKLOG = 1024
#: The exit code of a runner whose namespace could not be set up (the runner's own setup
#: failures exit 3 too).
EXIT_SETUP_FAILED = 3


@dataclass(frozen=True)
class Target:
    """Where a runner may connect: the URL's host and port, and the addresses the host
    resolved to (once, outside the namespace)."""

    host: str
    port: int
    addresses: tuple[str, ...]

    @property
    def is_name(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return True
        return False

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "addresses": list(self.addresses)}


def target_of(base_url: str) -> Target:
    """The target of ``base_url``, its host name resolved here; ``OSError`` if it does not
    resolve."""
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    try:
        return Target(host, port, (str(ipaddress.ip_address(host)),))
    except ValueError:
        pass
    found: list[str] = []
    for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        address = str(ipaddress.ip_address(info[4][0]))
        if address not in found:
            found.append(address)
    return Target(host, port, tuple(found))


def namespace_command() -> tuple[list[str] | None, str]:
    """The command prefix that starts a program in new network and mount namespaces on this
    host, or ``None`` and why not. Probed once per process, ``PATH`` and user (it starts
    ``unshare`` and ``ip`` once or twice), then remembered."""
    prefix, why = _probe(os.environ.get("PATH", os.defpath), os.geteuid())
    return (list(prefix) if prefix is not None else None), why


@functools.lru_cache(maxsize=4)
def _probe(path: str, euid: int) -> tuple[tuple[str, ...] | None, str]:
    unshare, ip, mount = (shutil.which(name, path=path) for name in ("unshare", "ip", "mount"))
    if unshare is None or ip is None or mount is None:
        missing = [name for name, found in (("unshare", unshare), ("ip", ip), ("mount", mount))
                   if found is None]
        return None, f"{', '.join(missing)} not found on PATH (util-linux, iproute2)"
    candidates: list[tuple[str, ...]] = [(unshare, "--net", "--mount")] if euid == 0 else []
    candidates.append((unshare, "--user", "--map-root-user", "--net", "--mount"))
    why = ""
    for prefix in candidates:
        try:
            proc = subprocess.run([*prefix, ip, "link", "set", "lo", "up"], capture_output=True,
                                  text=True, timeout=_PROBE_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            why = type(exc).__name__
            continue
        if proc.returncode == 0:
            return prefix, ""
        why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1][:200]
    return None, f"cannot create a network namespace here ({why})"


# -- inside the namespace, before the runner -----------------------------------------------------


def main() -> int:
    """``python -m hms_tasks.loadtest.containment SPEC``, the first program in a runner's
    namespaces: :func:`enter`, then ``exec`` of the runner (same process, a fresh interpreter
    with nothing of this setup loaded). SPEC is JSON: ``Target.to_json()`` plus ``fd`` (this
    end of the socket pair) and ``out_fd`` (where a setup failure is reported, as the runner
    reports its own)."""
    spec = json.loads(sys.argv[1])
    try:
        enter(spec)
    except subprocess.CalledProcessError as exc:
        detail = bytes(exc.stderr or b"").decode(errors="replace").strip()[-200:]
        step = " ".join(str(part) for part in exc.cmd[1:3])
        return _setup_failed(spec, f"{step} failed: {detail or exc.returncode}")
    except OSError as exc:
        return _setup_failed(spec, f"{type(exc).__name__}: {str(exc)[:200]}")
    os.execv(sys.executable, [sys.executable, "-m", "hms_tasks.loadtest.runner"])  # noqa: S606


def _setup_failed(spec: dict[str, Any], detail: str) -> int:
    with os.fdopen(int(spec["out_fd"]), "w") as out:
        out.write(json.dumps({"type": "error", "stage": "containment",
                              "error": f"its network namespace could not be set up ({detail})"})
                  + "\n")
    return EXIT_SETUP_FAILED




def enter(spec: dict[str, Any]) -> None:
    """Set up the runner's namespace for ``spec`` (``Target.to_json()`` plus ``fd``, the
    runner's end of the socket pair): ``lo`` up with the target's addresses, ``/etc/hosts`` for
    a host name, and a listening socket per address handed to the shard. Raises ``OSError``
    (or ``CalledProcessError``) if any step fails: the runner must not go on uncontained."""
    target = Target(str(spec["host"]), int(spec["port"]), tuple(spec["addresses"]))
    ip = shutil.which("ip") or "ip"
    subprocess.run([ip, "link", "set", "lo", "up"], check=True, capture_output=True)
    for address in target.addresses:
        addr = ipaddress.ip_address(address)
        if not addr.is_loopback:  # 127.0.0.0/8 and ::1 are on lo already
            subprocess.run([ip, "addr", "add", f"{addr}/{addr.max_prefixlen}", "dev", "lo",
                            *(["nodad"] if addr.version == 6 else [])],
                           check=True, capture_output=True)
    if target.is_name:
        _hosts_file(target)
    listeners: list[socket.socket] = []
    for address in target.addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            listeners.append(socket.create_server((address, target.port), family=family,
                                                  backlog=_LISTEN_BACKLOG))
        except OSError:
            if ipaddress.ip_address(address).version == 4:
                raise
            # No IPv6 in this namespace (disabled on the host): the IPv4 addresses remain.
    if not listeners:
        raise OSError("no address of the target could be bound in the runner's namespace")
    with socket.socket(fileno=int(spec["fd"])) as channel:
        socket.send_fds(channel, [b"L"], [s.fileno() for s in listeners])
    for s in listeners:
        s.close()


def _hosts_file(target: Target) -> None:
    fd, path = tempfile.mkstemp(prefix="hms-loadtest-hosts-")
    with os.fdopen(fd, "w") as f:
        f.write("127.0.0.1 localhost\n::1 localhost\n")
        f.writelines(f"{address} {target.host}\n" for address in target.addresses)
    os.chmod(path, 0o644)
    mount = shutil.which("mount") or "mount"
    # Visible in this mount namespace only (unshare makes its mounts private).
    subprocess.run([mount, "--bind", path, "/etc/hosts"], check=True, capture_output=True)
    os.unlink(path)  # the bind mount keeps the inode


# -- outside: the shard's forwarder ------------------------------------------------------------


class _Pipe(asyncio.Protocol):
    """One side of a relayed connection: what it receives goes to its peer, and a full peer
    pauses it (the peer's write buffer is bounded by asyncio's flow control)."""

    def __init__(self, forwarder: Forwarder, peer: _Pipe | None = None) -> None:
        self.forwarder = forwarder
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.forwarder.transports.add(transport)
        if self.peer is None:  # accepted from the runner: hold its bytes until upstream is up
            transport.pause_reading()
            self.forwarder.connect_upstream(self)
        else:
            self.peer.peer = self

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        peer = self.peer.transport if self.peer is not None else None
        if peer is not None and peer.can_write_eof() and not peer.is_closing():
            peer.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.transport is not None:
            self.forwarder.transports.discard(self.transport)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()  # flushes what it still buffers first

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


@dataclass
class Forwarder:
    """The shard's side of a contained runner: receives the runner's listening sockets over
    ``channel`` and relays every connection made to them to the same address and port in this
    namespace (see the module doc). One daemon thread; :meth:`close` stops it.

    Cost, measured with plain Locust (20 FastHttpUsers, a 2-byte answer on loopback) through
    this forwarder: about 15.5 us of CPU per request (4.5 us user, 11 us system: most of it
    the kernel's second loopback TCP hop). Blocking sockets with two threads per connection,
    tried instead, cost 18 to 23 us (more system time in thread wake-ups) and a thread pair
    per Locust connection.
    """

    channel: socket.socket
    #: Connections relayed so far, and upstream connects that failed.
    connections: int = 0
    failed: int = 0
    transports: set[asyncio.Transport] = field(default_factory=set)
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None
    _closing: bool = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="loadtest-forwarder",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            _, fds, _, _ = socket.recv_fds(self.channel, 16, 16)
        except OSError:
            fds = []
        finally:
            self.channel.close()
        listeners = [socket.socket(fileno=fd) for fd in fds]
        try:
            if listeners and not self._closing:
                asyncio.run(self._serve(listeners))
        finally:
            for s in listeners:
                s.close()

    async def _serve(self, listeners: list[socket.socket]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        servers = [await self._loop.create_server(lambda: _Pipe(self), sock=s)
                   for s in listeners]
        if not self._closing:
            await self._stop.wait()
        for server in servers:
            server.close()
        for transport in list(self.transports):
            transport.abort()

    def connect_upstream(self, inbound: _Pipe) -> None:
        assert self._loop is not None
        assert inbound.transport is not None
        local = inbound.transport.get_extra_info("sockname")
        self._loop.create_task(self._upstream(inbound, str(local[0]), int(local[1])))

    async def _upstream(self, inbound: _Pipe, host: str, port: int) -> None:
        # The runner reached one of its listening sockets: the same address and port here,
        # never anything else.
        assert self._loop is not None
        assert inbound.transport is not None
        try:
            await self._loop.create_connection(lambda: _Pipe(self, inbound), host, port)
        except OSError:
            self.failed += 1
            inbound.transport.abort()  # the runner sees a reset, as if the target refused
            return
        self.connections += 1
        if inbound.closed:
            assert inbound.peer is not None
            assert inbound.peer.transport is not None
            inbound.peer.transport.close()
        else:
            inbound.transport.resume_reading()

    def close(self) -> None:
        """Stop relaying and close every relayed connection (the runner is gone by then)."""
        self._closing = True
        with contextlib.suppress(OSError):
            self.channel.shutdown(socket.SHUT_RDWR)
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop already ended
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
