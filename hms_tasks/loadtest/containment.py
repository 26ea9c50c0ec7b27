"""OS-level containment of a load-test runner: an empty network namespace, sockets from outside.

A user's locustfile is code. The runner's Python-level connect guard
(:mod:`hms_tasks.loadtest.runner`) checks connects made through Python's (gevent's) socket
class, but ``import _socket`` or a C extension opens sockets beneath it. Where the host allows
it, each shard therefore starts its runner in new network and mount namespaces
(``unshare --net --mount``, or ``unshare --user --map-root-user --net --mount`` for a worker
that is not root, with unprivileged user namespaces on), and the namespace has nothing but its
own loopback device, with no listener on it. Nothing there leads out, not even to the target:

- Inside, before any user code is loaded (:func:`enter`, called first thing), ``lo`` comes up,
  and a host name target gets an ``/etc/hosts`` of its own (a bind mount visible in the
  runner's mount namespace only) that maps the name to the addresses the shard resolved once,
  outside, so URLs, ``Host`` headers and TLS server names stay what the settings say.
- The runner keeps one end of a Unix ``SOCK_SEQPACKET`` socket pair inherited from the shard.
  When its guard lets a connect to the target through, the runner does not connect: it asks
  the shard for a socket already connected to that address and port (:class:`Dialer`: one
  message carrying the address, the port, the timeout and a fresh reply socket), and puts the
  descriptor it gets back (``SCM_RIGHTS``) in place of its own socket's with ``dup2``. The
  bytes then go straight between the runner and the target: no relay, no second hop.
- Outside, the shard's :class:`Connector` (a thread running an asyncio loop) answers each
  request: it connects in the host's namespace only if the address is one of the target's
  (resolved once, as above) and the port is the target's, and sends the connected socket back,
  or the ``errno`` of the failure (``EACCES`` for anything that is not the target).

Any other connect from the runner, whatever code makes it, meets an empty namespace: a loopback
port is refused, any other address has no route, DNS servers are out of reach; native code
(``_socket``, a C extension) cannot reach the target either, only Python's socket class can,
through the shard. What the namespace does not cover: Unix sockets bound to a path are files,
not network endpoints, so a runner can still open those its user may open
(``/run/postgresql``, a Redis ``unixsocket``); keep such sockets out of reach of the worker's
user. Where namespaces cannot be made (no root and no unprivileged user namespaces, a
container without ``CAP_SYS_ADMIN``, no ``unshare`` or ``ip``), only the Python-level guard
holds: ``HMS_TASKS_LOADTEST_CONTAINMENT`` says whether that is acceptable (``auto`` warns,
``required`` fails the shard).

Cost, measured (bench/RESULTS.md, "containment without a relay"): about 150 us of CPU per new
connection (a plain connect: 37 us), nothing per request, and Locust's users keep their
connections alive; a contained shard did 0.98 of plain Locust's requests per generator
CPU-second. The relay this replaced (listening sockets in the namespace, every byte copied by
the shard to the target) cost 15-16 us of CPU per request, mostly the kernel's second loopback
TCP hop, and left a contained shard at 0.70-0.80 of an uncontained one.

This module is imported by the runner subprocess too: it stays free of Django, Celery, pydantic,
Locust and gevent (the runner imports it after gevent's monkey-patching, so its ``socket`` and
``threading`` calls there are gevent's).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
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

__all__ = ["Connector", "Dialer", "Target", "enter", "namespace_command", "socket_pair",
           "target_of"]

logger = logging.getLogger(__name__)

#: Seconds a namespace probe may take.
_PROBE_TIMEOUT = 30
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
    with nothing of this setup loaded; the runner's end of the socket pair stays open across
    it). SPEC is JSON: ``Target.to_json()`` plus ``out_fd`` (where a setup failure is
    reported, as the runner reports its own)."""
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
    """Set up the runner's namespace for ``spec`` (``Target.to_json()``): ``lo`` up, and
    ``/etc/hosts`` for a host name. Raises ``OSError`` (or ``CalledProcessError``) if any step
    fails: the runner must not go on uncontained."""
    target = Target(str(spec["host"]), int(spec["port"]), tuple(spec["addresses"]))
    ip = shutil.which("ip") or "ip"
    # Loopback up, as on any host: code in the runner that talks to itself over 127.0.0.1
    # works, and nothing outside is on it.
    subprocess.run([ip, "link", "set", "lo", "up"], check=True, capture_output=True)
    if target.is_name:
        _hosts_file(target)


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


# -- the protocol on the socket pair ------------------------------------------------------------
#
# Runner -> shard, one SOCK_SEQPACKET message: JSON {"address", "port", "timeout"} and one
# descriptor, a Unix socket to answer on (each request has its own, so concurrent connects need
# no matching of answers to requests). Shard -> runner, on that socket: b"0" and the connected
# socket, or the errno of the failure as ASCII digits and no descriptor.

_REQUEST_MAX = 512
#: Options a caller may have set on its socket before connecting, copied onto the socket that
#: replaces it (urllib3, HttpUser's client, sets TCP_NODELAY before connect).
_KEPT_OPTIONS = ((socket.IPPROTO_TCP, socket.TCP_NODELAY), (socket.SOL_SOCKET, socket.SO_KEEPALIVE))


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """The shard's and the runner's ends of a new channel."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class Dialer:
    """The runner's side: asks the shard for sockets connected to the target (see the module
    doc). Built after gevent's monkey-patching, so its waits are cooperative."""

    def __init__(self, fd: int) -> None:
        os.set_inheritable(fd, False)  # a locustfile's subprocesses do not get the channel
        self.channel = socket.socket(fileno=fd)
        # One sender at a time: two greenlets waiting to write on one socket is an error in
        # gevent (the channel only fills if the shard stops reading).
        self._sending = threading.Lock()

    def connected_fd(self, address: str, port: int, timeout: float | None) -> int:
        """A new descriptor of a TCP socket connected to ``address``, ``port`` (in the host's
        namespace); ``OSError`` with the connect's ``errno``, or ``TimeoutError`` after
        ``timeout`` seconds, as a connect would raise them."""
        ours, theirs = socket.socketpair()
        with ours:
            try:
                request = json.dumps({"address": address, "port": port, "timeout": timeout})
                with self._sending:
                    socket.send_fds(self.channel, [request.encode()], [theirs.fileno()])
            finally:
                theirs.close()
            ours.settimeout(timeout)
            data, fds, _, _ = socket.recv_fds(ours, 16, 1)
        code = int(data) if data.isdigit() else errno.ECONNABORTED  # no answer: shard gone
        if code == 0 and fds:
            return fds[0]
        for fd in fds:
            os.close(fd)
        code = code or errno.ECONNABORTED
        raise OSError(code, os.strerror(code))

    def connect(self, sock: socket.socket, address: str, port: int) -> None:
        """Connect ``sock`` (a TCP socket of ``address``'s family, not yet used) to
        ``address``, ``port`` through the shard: the connected descriptor takes the place of
        ``sock``'s own (``dup2``), so the object, its file number and gevent's (not yet
        started) watchers on that number stay valid. A non-blocking socket waits for the
        connect like a blocking one (cooperatively, under gevent)."""
        fd = self.connected_fd(address, port, sock.gettimeout() or None)
        try:
            kept = [(level, name, sock.getsockopt(level, name)) for level, name in _KEPT_OPTIONS]
            # As the descriptor it replaces: gevent's sockets are non-blocking underneath.
            os.set_blocking(fd, os.get_blocking(sock.fileno()))
            os.dup2(fd, sock.fileno(), inheritable=False)
        finally:
            os.close(fd)
        for level, name, value in kept:
            sock.setsockopt(level, name, value)


# -- outside: the shard's connector ------------------------------------------------------------


@dataclass
class Connector:
    """The shard's side of a contained runner: answers the runner's requests on ``channel``
    with sockets connected to ``target`` in this namespace, and refuses any other address or
    port (see the module doc). One daemon thread with an asyncio loop, so a slow connect (a
    target that does not answer) holds up no other; :meth:`close` stops it, and so does the
    runner's end closing.

    Cost: about 150 us of CPU per connection for both ends (bench.loadtest.connect_cost), and
    nothing per request: the shard's process takes no part in the requests. The byte-for-byte
    relay it replaced cost 15-16 us of CPU per request.
    """

    channel: socket.socket
    target: Target
    #: Sockets handed over, connects that failed, and requests refused (not the target).
    connections: int = 0
    failed: int = 0
    refused: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None
    _closing: bool = False
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="loadtest-connector",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        finally:
            self.channel.close()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self._closing:
            return
        self.channel.setblocking(False)
        self._loop.add_reader(self.channel.fileno(), self._on_request)
        try:
            await self._stop.wait()
        finally:
            self._loop.remove_reader(self.channel.fileno())
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_request(self) -> None:
        assert self._loop is not None
        assert self._stop is not None
        try:
            data, fds, _, _ = socket.recv_fds(self.channel, _REQUEST_MAX, 1)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if not data and not fds:  # the runner's end is closed: it is gone
            self._stop.set()
            return
        if not fds:
            return  # nowhere to answer
        try:
            reply = socket.socket(fileno=fds[0])
        except OSError:  # not a socket
            os.close(fds[0])
            return
        task = self._loop.create_task(self._answer(data, reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, data: bytes, reply: socket.socket) -> None:
        with reply:
            sock: socket.socket | None = None
            try:
                sock = await self._connect(data)
                code = 0
            except TimeoutError:
                code = errno.ETIMEDOUT
            except OSError as exc:
                code = exc.errno or errno.EIO
            except (ValueError, TypeError, KeyError):  # not a request of ours
                code = errno.EINVAL
            try:
                reply.setblocking(False)  # whatever the runner sent, it cannot hold us up
                if sock is not None:
                    socket.send_fds(reply, [b"0"], [sock.fileno()])
                else:
                    reply.send(str(code).encode())
            except OSError:
                pass  # the runner gave up (its timeout): the socket is closed unused
            finally:
                if sock is not None:
                    sock.close()

    async def _connect(self, data: bytes) -> socket.socket:
        assert self._loop is not None
        request = json.loads(data)
        address, port = str(request["address"]), int(request["port"])
        timeout = None if request.get("timeout") is None else float(request["timeout"])
        if port != self.target.port or address not in self.target.addresses:
            # The runner's guard refuses these before asking; only code talking to the
            # channel itself gets here.
            self.refused += 1
            raise PermissionError(errno.EACCES, "not the load test's target")
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.wait_for(self._loop.sock_connect(sock, (address, port)), timeout)
        except BaseException:
            sock.close()
            self.failed += 1
            raise
        self.connections += 1
        return sock

    def close(self) -> None:
        """Stop answering (the runner is gone by then)."""
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
