"""Find or start the Redis that ``hms-tasks run`` uses as broker, result backend and cache.

:func:`provision_redis` tries, in this order, and stops at the first that works:

1. ``$REDIS_URL``: used as given. If it does not answer PING within a few seconds this is an
   error (:class:`RedisUnavailable`): the operator named a Redis, so silently starting another
   one would split the queues between two brokers.
2. A Redis already answering on ``default_url`` (``redis://127.0.0.1:6379/0``).
3. ``redis-server`` on ``PATH``: a private server on a free loopback port, its data (AOF, log,
   pid file) under ``<state_dir>/redis/``, configured as a broker (AOF every second, no
   eviction). :meth:`ProvisionedRedis.stop` stops it.
4. Running as root with ``apt-get`` and ``allow_install``: install ``redis-server``, then as 3.
5. Otherwise :class:`RedisUnavailable`, saying how to install or start Redis.

Messages name a Redis by ``host:port`` only: a URL may carry a password.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Literal, Self
from urllib.parse import urlsplit, urlunsplit

import psutil
import redis

from hms_tasks.conf import DEFAULT_REDIS_URL
from hms_tasks.demo.stack.orphans import preexec_die_with
from hms_tasks.errors import HmsTasksError

__all__ = [
    "ProvisionedRedis",
    "RedisUnavailable",
    "Source",
    "provision_redis",
    "redact_url",
    "redis_location",
]

#: Where the Redis in use came from.
Source = Literal["env", "default", "private", "installed"]

#: How ``provision_redis`` reports what it does (one line each, no newline).
Echo = Callable[[str], None]

# $REDIS_URL may point at a server that is still starting (docker compose up): give it this long.
ENV_PING_SECONDS = 5.0
# A private server replays its AOF before it answers; a large one takes a while.
PRIVATE_START_SECONDS = 30.0
# SIGTERM makes redis-server fsync the AOF and exit; after this long it gets SIGKILL.
STOP_SECONDS = 10.0

HOW_TO_INSTALL = (
    "install Redis (Debian/Ubuntu: `sudo apt-get install redis-server`; macOS: "
    "`brew install redis`) so hms-tasks can start a private redis-server, or start one with "
    "`docker compose up redis` and set REDIS_URL (for example redis://127.0.0.1:6379/0)"
)


class RedisUnavailable(HmsTasksError):
    """No usable Redis: ``$REDIS_URL`` does not answer, or none can be found, started or
    installed. The message says what to do and names Redis by ``host:port`` only."""


def _stderr_echo(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def redis_location(url: str) -> str:
    """``host:port`` (or the socket path) of a Redis URL: safe to print, carries no password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path or "?"
    try:
        port = parts.port or 6379
    except ValueError:  # a port that is not a number: still say which host
        port = 6379
    host = parts.hostname or "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (user name, host, port and db kept)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _scrub(text: str, url: str) -> str:
    # redis-py's messages name host and port only, but never risk echoing a password.
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


def _ping_error(url: str, *, timeout: float) -> Exception | None:
    """``None`` if Redis at ``url`` answers PING within ``timeout``, else the last error."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        return exc
    finally:
        client.close()
    return None


def _eviction_warning(url: str) -> str | None:
    """A warning if the Redis at ``url`` may evict keys (it would drop queued messages)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
    except (redis.RedisError, OSError):
        return None  # CONFIG is often disabled on managed Redis: nothing to check then
    finally:
        client.close()
    if policy in (None, "noeviction"):
        return None
    return (
        f"warning: Redis at {redis_location(url)} has maxmemory-policy {policy!r}; a broker "
        "needs 'noeviction' or it may silently drop queued tasks"
    )


class ProvisionedRedis:
    """The Redis to use: :attr:`url`, :attr:`source`, and the private server if we started one.

    A context manager: leaving the ``with`` block calls :meth:`stop`.
    """

    def __init__(
        self,
        *,
        url: str,
        source: Source,
        process: subprocess.Popen[bytes] | None = None,
        data_dir: Path | None = None,
    ) -> None:
        self.url = url
        self.source: Source = source
        #: The private ``redis-server`` (sources ``private`` and ``installed``), else ``None``.
        self.process = process
        #: Its data directory (AOF, log, pid file), else ``None``.
        self.data_dir = data_dir

    @property
    def location(self) -> str:
        """``host:port`` of this Redis, safe to print."""
        return redis_location(self.url)

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """Stop the private server, if one was started, and wait until it is gone.

        SIGTERM first (Redis then fsyncs its AOF, so queued messages survive), SIGKILL after
        ``timeout`` seconds. A Redis we did not start is left alone. Idempotent.
        """
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ProvisionedRedis(url={redact_url(self.url)!r}, source={self.source!r})"


def provision_redis(
    *,
    state_dir: Path,
    default_url: str = DEFAULT_REDIS_URL,
    allow_install: bool = True,
    echo: Echo | None = None,
) -> ProvisionedRedis:
    """Find or start a Redis, in the order of the module docstring; report steps to ``echo``.

    ``state_dir`` holds a private server's data (``<state_dir>/redis/``). ``echo`` receives
    one line per notable step (default: standard error). Raises :class:`RedisUnavailable`.
    """
    say = echo or _stderr_echo
    env_url = os.environ.get("REDIS_URL")
    if env_url:
        error = _wait_for_ping(env_url, seconds=ENV_PING_SECONDS)
        if error is not None:
            raise RedisUnavailable(
                f"REDIS_URL is set, but Redis at {redis_location(env_url)} does not answer PING"
                f" ({type(error).__name__}: {_scrub(str(error), env_url)}); start that Redis,"
                " correct REDIS_URL, or unset it to let hms-tasks find or start one"
            )
        _warn_eviction(env_url, say)
        return ProvisionedRedis(url=env_url, source="env")

    if _ping_error(default_url, timeout=1.0) is None:
        _warn_eviction(default_url, say)
        return ProvisionedRedis(url=default_url, source="default")

    binary = shutil.which("redis-server")
    if binary is not None:
        return _start_private(binary, state_dir=state_dir, source="private", say=say)

    apt_get = shutil.which("apt-get")
    if allow_install and apt_get is not None and os.geteuid() == 0:
        binary = _apt_install(apt_get, say)
        return _start_private(binary, state_dir=state_dir, source="installed", say=say)

    raise RedisUnavailable(
        f"no Redis: REDIS_URL is not set, nothing answers at {redis_location(default_url)},"
        f" and redis-server is not on PATH; {HOW_TO_INSTALL}"
    )


def _wait_for_ping(url: str, *, seconds: float) -> Exception | None:
    """Poll PING until it answers (``None``) or ``seconds`` pass (the last error)."""
    deadline = time.monotonic() + seconds
    while True:
        remaining = deadline - time.monotonic()
        error = _ping_error(url, timeout=max(0.2, min(1.0, remaining)))
        if error is None:
            return None
        # A wrong password or database stays wrong: no point waiting for it.
        if isinstance(error, redis.AuthenticationError | redis.ResponseError):
            return error
        if time.monotonic() >= deadline:
            return error
        time.sleep(0.1)


def _warn_eviction(url: str, say: Echo) -> None:
    warning = _eviction_warning(url)
    if warning:
        say(warning)


def _apt_install(apt_get: str, say: Echo) -> str:
    """Install ``redis-server`` with apt-get (we are root); return the binary's path."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in ([apt_get, "update"], [apt_get, "install", "-y", "redis-server"]):
        say(f"redis-server is not installed; running: {' '.join(argv)}")
        done = subprocess.run(argv, env=env, check=False)
        if done.returncode != 0:
            raise RedisUnavailable(
                f"`{' '.join(argv)}` failed with exit code {done.returncode}; {HOW_TO_INSTALL}"
            )
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        raise RedisUnavailable(f"apt-get installed no redis-server binary; {HOW_TO_INSTALL}")
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop_stale(data_dir: Path, say: Echo) -> None:
    """Stop a private redis-server a killed supervisor left running on ``data_dir``.

    Two servers appending to one AOF would corrupt it. The pid file alone is not proof (pids
    are reused), so the process must also be a redis-server whose working directory (Redis
    changes into ``--dir``) is ``data_dir``.
    """
    pidfile = data_dir / "redis.pid"
    try:
        pid = int(pidfile.read_text().strip())
        proc = psutil.Process(pid)
        ours = "redis" in proc.name() and Path(proc.cwd()).resolve() == data_dir.resolve()
    except (OSError, ValueError, psutil.Error):
        return
    if not ours:
        return
    say(f"stopping a private redis-server left over from an earlier run (pid {pid})")
    proc.terminate()
    try:
        proc.wait(timeout=STOP_SECONDS)
    except psutil.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_SECONDS)


def _start_private(binary: str, *, state_dir: Path, source: Source, say: Echo) -> ProvisionedRedis:
    """Start ``binary`` on a free loopback port with its data under ``state_dir/redis``."""
    data_dir = (state_dir / "redis").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    _stop_stale(data_dir, say)
    last_problem = "it did not start"
    # Another program may take the free port between our probe and redis-server's bind: retry.
    for _attempt in range(3):
        port = _free_port()
        argv = [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(data_dir),
            "--logfile", str(data_dir / "redis.log"),
            "--pidfile", str(data_dir / "redis.pid"),
            "--daemonize", "no",
            # A broker: a restart must keep queued and unacknowledged messages (AOF), and a
            # full Redis must refuse writes rather than evict tasks.
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        # Own session: a Ctrl-C in the terminal must not stop the broker before the workers
        # that still need it to hand back their unacknowledged messages. If we die without
        # stopping it, SIGTERM (Redis then fsyncs its AOF) rather than a server left running.
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=preexec_die_with(os.getpid(), signal.SIGTERM),
        )
        server = ProvisionedRedis(
            url=f"redis://127.0.0.1:{port}/0", source=source, process=proc, data_dir=data_dir
        )
        deadline = time.monotonic() + PRIVATE_START_SECONDS
        while proc.poll() is None and time.monotonic() < deadline:
            if _ping_error(server.url, timeout=0.5) is None:
                say(f"started a private redis-server on 127.0.0.1:{port} (pid {proc.pid})")
                return server
            time.sleep(0.05)
        if proc.poll() is None:
            last_problem = f"it did not answer PING within {PRIVATE_START_SECONDS:g} s"
        else:
            last_problem = f"it exited with code {proc.returncode}"
        server.stop()
    with contextlib.suppress(OSError):
        tail = (data_dir / "redis.log").read_text(errors="replace").splitlines()[-5:]
        last_problem += "; redis.log ends:\n  " + "\n  ".join(tail)
    raise RedisUnavailable(f"could not start a private redis-server ({binary}): {last_problem}")
