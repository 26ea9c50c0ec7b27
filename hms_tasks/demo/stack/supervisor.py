"""``hms-tasks run`` (what ``make run`` runs): the whole demo stack in one terminal.

:func:`run` provisions Redis (:mod:`hms_tasks.demo.stack.provision`), migrates and seeds the
demo database in a child process (so Django state never loads into the supervisor), then starts
four children, each in its own session and process group:

``worker``  one Celery worker consuming every hms queue (prefork, concurrency 2)
``beat``    celery beat, its schedule state in ``<home>/celerybeat-schedule``
``flower``  Flower; bound to loopback, or it must have ``FLOWER_BASIC_AUTH``
``api``     the demo HMS JSON API under gunicorn

Each child's output is streamed line by line with a fixed-width prefix (``worker | ...``).

Stopping: SIGINT, SIGTERM or SIGHUP sends SIGTERM to each child's leader process, waits up to
:data:`STOP_SECONDS` for them, then SIGKILLs whatever is left of each process group, and
finally stops a private Redis (last: a worker shutting down warm hands its unacknowledged
messages back to Redis). Exit code 0. A second signal skips the wait. If a child exits on its
own, the rest are stopped the same way and the exit code is 1.

Own sessions matter twice: a Ctrl-C from the terminal reaches only the supervisor, which then
stops the children in order; and a process group lets us kill grandchildren (pool processes,
gunicorn workers) that outlive their parent. If the supervisor itself dies without stopping them
(``kill -9``), the kernel signals them (a parent-death signal, :mod:`.orphans`): the worker gets
a cold shutdown, gunicorn a quick one, the others SIGTERM, so the ports are free again at once.

Under ``make run`` (or a script) the supervisor shares its process group with make, and a Ctrl-C
would reach make too, which then exits 130 whatever the supervisor does. So when it is in the
terminal's foreground group without leading it, the supervisor moves into a group of its own and
makes that the foreground one for as long as it runs: Ctrl-C reaches only the supervisor, which
exits 0, and make exits 0 with it (:func:`terminal_foreground`).

Flower: bound to loopback, its REST API answers without a password (``FLOWER_UNAUTHENTICATED_API``
in Flower's environment only), so tasks can be run from it; off loopback ``FLOWER_BASIC_AUTH`` is
required and guards the pages and the API alike. Either way Flower is read-only (no worker
shutdown, pool change or revoke) and refuses cross-site requests (:mod:`hms_tasks.flower`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import FrameType
from typing import IO, Final

import psutil

from hms_tasks import conf, names
from hms_tasks.demo.stack.orphans import preexec_die_with
from hms_tasks.demo.stack.provision import (
    ProvisionedRedis,
    RedisUnavailable,
    provision_redis,
    redact_url,
)

__all__ = [
    "DEATH_SIGNALS",
    "STOP_SECONDS",
    "Output",
    "child_commands",
    "prepare_database",
    "run",
    "terminal_foreground",
]

#: Seconds children get to shut down after SIGTERM before their process groups get SIGKILL.
STOP_SECONDS: Final = 15.0
# How often the supervision loop looks at its children when nothing else wakes it.
_POLL_SECONDS: Final = 0.5
# Width of the name column of the output: the longest child name.
_NAME_WIDTH: Final = 6
_ME: Final = "supervisor"

#: What each child gets from the kernel when the supervisor dies without stopping it: the worker
#: shuts down cold (running tasks go back to the queue, it exits within seconds), gunicorn
#: quickly (its workers die with it), the rest on SIGTERM.
DEATH_SIGNALS: Final[dict[str, int]] = {
    "worker": signal.SIGQUIT,
    "api": signal.SIGQUIT,
}
_DEFAULT_DEATH_SIGNAL: Final = signal.SIGTERM

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_BAD_INPUT: Final = 2


class Output:
    """Serialises lines from many threads onto one stream, each prefixed ``<name> | ``."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def line(self, name: str, text: str) -> None:
        """Write one line from ``name`` (padded to the width of the longest child name)."""
        stream = self._stream or sys.stdout
        # A closed stdout (`hms-tasks run | head`) must not kill the thread that drains a
        # child's pipe: the child would block on a full pipe. Its lines are lost instead.
        with self._lock, contextlib.suppress(OSError, ValueError):
            stream.write(f"{name.ljust(_NAME_WIDTH)} | {text}\n")
            stream.flush()

    def say(self, text: str) -> None:
        """Write one line from the supervisor itself."""
        self.line(_ME, text)


@dataclass
class _Child:
    """A started child: its process, and the thread copying its output."""

    name: str
    proc: subprocess.Popen[bytes]
    reader: threading.Thread | None = None

    @property
    def pgid(self) -> int:
        # start_new_session makes the child the leader of a group whose id is its pid.
        return self.proc.pid

    def group_alive(self) -> bool:
        """Whether any live process of this child's group (grandchildren too) is left."""
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a member changed user: look closer below
            pass
        # killpg also reaches zombies: orphans that exited but that their new parent (init)
        # has not reaped yet. They are not running; waiting for them would only waste time.
        for proc in psutil.process_iter(["status"]):
            with contextlib.suppress(OSError, psutil.Error):
                if os.getpgid(proc.pid) == self.pgid and proc.status() != psutil.STATUS_ZOMBIE:
                    return True
        return False

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to the whole process group, if any of it is left."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signum)


# -- commands ---------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _hostport(host: str, port: int) -> str:
    bare = host.strip("[]")
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def _browse_host(host: str) -> str:
    # 0.0.0.0 and :: are where we listen, not an address a browser can open.
    return "127.0.0.1" if host.strip("[]") in ("0.0.0.0", "::") else host  # noqa: S104


def child_commands(
    *, state_dir: Path, api_port: int, flower_port: int, host: str
) -> dict[str, list[str]]:
    """The argv of each long-running child, by name, in start order.

    Every tool runs as ``sys.executable -m ...`` so the interpreter (and virtualenv) of the
    supervisor is used, whatever is on ``PATH``.
    """
    py = sys.executable
    celery = [py, "-m", "celery", "-A", "hms_tasks"]
    return {
        "worker": [
            *celery, "worker",
            "-Q", ",".join(names.ALL_QUEUES),
            "-n", "worker@%h",
            "--loglevel", "INFO",
            "-E",
            "--pool", "prefork",
            "--concurrency", "2",
        ],
        "beat": [
            *celery, "beat",
            "-s", str(state_dir / "celerybeat-schedule"),
            "--loglevel", "INFO",
        ],
        # Basic-auth credentials, when needed, reach Flower through FLOWER_BASIC_AUTH in its
        # environment (Flower reads FLOWER_* variables): on the command line they would show
        # in `ps` to every local user, and in our own "started" lines.
        "flower": [*celery, "flower", f"--address={host.strip('[]')}", f"--port={flower_port}"],
        "api": [
            py, "-m", "gunicorn", "hms_tasks.demo.wsgi:application",
            "-b", _hostport(host, api_port),
            "-w", "2",
            # gunicorn's own refusals (a query string over its 4094-byte request line, bad
            # headers) answered as the API's JSON errors, never quoting the request line.
            "--worker-class", "hms_tasks.demo.stack.http_errors.JsonErrorWorker",
            "--graceful-timeout", str(int(STOP_SECONDS) - 5),
            "--access-logfile", "-",
            # Path only (%(U)s), never the query string: searches can carry patient names.
            "--access-logformat", '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms',
            *_gunicorn_no_control_socket(),
        ],
    }  # fmt: skip


def _gunicorn_no_control_socket() -> list[str]:
    """``--no-control-socket`` where gunicorn has one (25.1+).

    Its default path is per user ($HOME/.gunicorn/gunicorn.ctl), so two stacks (a test next to
    ``make run``) would fight over it; the supervisor is the only controller we need.
    """
    try:
        major, minor = (int(p) for p in version("gunicorn").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return []
    return ["--no-control-socket"] if (major, minor) >= (25, 1) else []


def _port_holder(port: int) -> psutil.Process | None:
    """The process listening on TCP ``port`` (any address), if this user may see it."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            if conn.pid is None:
                return None
            with contextlib.suppress(psutil.Error):
                return psutil.Process(conn.pid)
    return None


def _describe_holder(proc: psutil.Process) -> str:
    """Who holds a port: name and pid, and whether it is a leftover of an earlier stack.

    Never the command line: it may carry credentials.
    """
    try:
        name = proc.name()
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return f"pid {proc.pid}"
    ours = ("hms_tasks.demo.wsgi", "-A hms_tasks")
    leftover = (
        ", left over from an earlier hms-tasks run" if any(m in cmdline for m in ours) else ""
    )
    return f"{name} (pid {proc.pid}{leftover})"


def _port_problem(host: str, port: int, option: str) -> str | None:
    """Why ``port`` cannot be bound on ``host`` (already in use, ...) and how to fix it, or
    ``None``."""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # The same option gunicorn and tornado set: a port in TIME_WAIT is free for them.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bare, port))
        except OSError as exc:
            problem = f"{option}: cannot listen on {_hostport(host, port)} ({exc.strerror})"
        else:
            return None
    holder = _port_holder(port)
    if holder is not None:
        problem += f"; {_describe_holder(holder)} holds it: stop it (kill {holder.pid})"
    else:
        problem += "; stop what holds it"
    return (
        f"{problem}, or choose another port: hms-tasks run {option} N"
        f' (make run ARGS="{option} N")'
    )


def _input_problems(*, patients: int, api_port: int, flower_port: int, host: str) -> list[str]:
    problems: list[str] = []
    if patients < 1:
        problems.append("--patients: must be at least 1")
    if api_port == flower_port:
        problems.append("--api-port and --flower-port must differ")
    if not _is_loopback(host) and not os.environ.get("FLOWER_BASIC_AUTH"):
        # Flower shows task arguments and results and can revoke tasks (CVE-2022-30034 class).
        problems.append(
            f"--host {host} is not loopback: set FLOWER_BASIC_AUTH=user:password so Flower"
            " asks for a password"
        )
    if not problems:
        for port, option in ((api_port, "--api-port"), (flower_port, "--flower-port")):
            problem = _port_problem(host, port, option)
            if problem:
                problems.append(problem)
    return problems


# -- the terminal ---------------------------------------------------------------------------


@contextlib.contextmanager
def terminal_foreground() -> Iterator[bool]:
    """Make this process's own group the terminal's foreground group for the duration, when it
    shares its group with a parent (make, a script) that is in the foreground; yields whether
    it did.

    A Ctrl-C then reaches the supervisor alone: make would otherwise get the SIGINT too and,
    whatever the supervisor's exit code, die of it (GNU make re-raises it: exit 130, plus an
    "Interrupt" line). A shell starting us directly already gave us our own foreground group;
    a background job or no terminal at all: nothing to do. Ctrl-Z is ignored meanwhile: it would
    stop the supervisor while make waits, with no shell job to resume.
    """
    try:
        tty = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:  # no controlling terminal
        yield False
        return
    try:
        try:
            original = os.tcgetpgrp(tty)
        except OSError:
            yield False
            return
        if original != os.getpgrp() or os.getpgrp() == os.getpid():
            yield False
            return
        # Once we leave the foreground group, writing the terminal's settings sends SIGTTOU.
        ignored = (signal.SIGTTOU, signal.SIGTTIN, signal.SIGTSTP)
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in ignored}
        try:
            os.setpgid(0, 0)
            os.tcsetpgrp(tty, os.getpgrp())
            try:
                yield True
            finally:
                # Give the terminal back, unless someone (the shell) took it meanwhile.
                with contextlib.suppress(OSError):
                    if os.tcgetpgrp(tty) == os.getpgrp():
                        os.tcsetpgrp(tty, original)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    finally:
        os.close(tty)


# -- database ---------------------------------------------------------------------------------


def prepare_database(*, patients: int, seed: bool) -> int:
    """Migrate the demo database and, with ``seed``, seed it unless it already has demo rows.

    Runs in a child of the supervisor (``python -c``), which keeps Django and the database
    connection out of the supervisor. Prints counts only. Returns an exit code.
    """
    import django
    from django.core.management import call_command

    django.setup()
    from hms_tasks.demo import seed as seeding

    # The status page's assets (/status/): hashed copies and their manifest in STATIC_ROOT.
    call_command("collectstatic", verbosity=0, interactive=False)
    if not seed:
        call_command("migrate", verbosity=0, interactive=False)
        sys.stdout.write("migrated; seeding skipped (--no-seed)\n")
        return EXIT_OK
    try:
        summary = seeding.seed(patients=patients, seed=42)
    except seeding.SeedRefused:
        # seed() migrated first, then found rows: the usual second `make run`.
        sys.stdout.write("migrated; the demo database already holds data, not seeding again\n")
        return EXIT_OK
    counts = ", ".join(f"{k}={v}" for k, v in sorted(summary.items()))
    sys.stdout.write(f"seeded: {counts}\n")
    return EXIT_OK


# -- the supervisor ---------------------------------------------------------------------------


class _Supervisor:
    """State of one :func:`run`: children, the event queue, and what stopped us."""

    def __init__(self, out: Output) -> None:
        self.out = out
        self.children: list[_Child] = []
        # SimpleQueue.put is reentrant, so the signal handler may use it (a Queue or Event
        # could deadlock on its own lock if the signal lands while the main thread holds it).
        self.events: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.signals: list[int] = []

    # signals

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)
        self.events.put("signal")

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[None]:
        """Turn SIGINT, SIGTERM and SIGHUP (the terminal closed) into events for the duration;
        restore the old handlers."""
        stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {s: signal.signal(s, self._on_signal) for s in stops}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    # children

    def start(self, name: str, argv: Sequence[str], env: dict[str, str]) -> _Child:
        """Start ``argv`` in its own session, print its pid, and stream its output.

        Call from the main thread: the parent-death signal fires when the thread that started
        the child exits, and only the main thread lives as long as the supervisor.
        """
        proc = subprocess.Popen(
            list(argv),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec_die_with(
                os.getpid(), DEATH_SIGNALS.get(name, _DEFAULT_DEATH_SIGNAL)
            ),
        )
        child = _Child(name=name, proc=proc)
        self.children.append(child)
        self.out.say(f"started {name} pid={proc.pid}")
        child.reader = threading.Thread(
            target=self._copy_output, args=(child,), name=f"output-{name}", daemon=True
        )
        child.reader.start()
        return child

    def _copy_output(self, child: _Child) -> None:
        assert child.proc.stdout is not None
        with child.proc.stdout:
            for raw in child.proc.stdout:
                self.out.line(child.name, raw.decode("utf-8", "replace").rstrip("\r\n"))
        # EOF: usually the child exited. Wake the main loop so it notices at once.
        self.events.put("eof")

    def wait_one(self, child: _Child) -> int | None:
        """Wait for ``child`` to exit; ``None`` if a signal came first (``child`` stopped)."""
        while child.proc.poll() is None:
            if self.signals:
                self._stop_for_signal()
                return None
            with contextlib.suppress(queue.Empty):
                self.events.get(timeout=_POLL_SECONDS)
        if child.reader is not None:
            child.reader.join(timeout=5)
        return child.proc.returncode

    def supervise(self) -> int:
        """Wait until a signal (exit 0) or a child exiting on its own (exit 1); stop the rest."""
        while True:
            if self.signals:
                self._stop_for_signal()
                return EXIT_OK
            for child in self.children:
                code = child.proc.poll()
                if code is not None:
                    self.out.say(
                        f"{child.name} (pid {child.proc.pid}) exited with code {code};"
                        " stopping the others"
                    )
                    self.stop_all()
                    return EXIT_FAILED
            with contextlib.suppress(queue.Empty):
                self.events.get(timeout=_POLL_SECONDS)

    def _stop_for_signal(self) -> None:
        self.out.say(f"{signal.Signals(self.signals[0]).name} received, stopping")
        self.stop_all()

    def stop_all(self) -> None:
        """SIGTERM every child, wait up to :data:`STOP_SECONDS`, SIGKILL what is left.

        SIGTERM goes to each child's leader, not its whole group: the Celery worker's pool
        processes die on SIGTERM mid-task, whereas the worker itself shuts down warm (lets
        running tasks finish, hands prefetched messages back). Gunicorn and Flower likewise
        stop their own workers. The group is SIGKILLed only for what remains after the grace
        period, or after the leader is gone (orphaned grandchildren).
        """
        for child in self.children:
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
        seen = len(self.signals)
        deadline = time.monotonic() + STOP_SECONDS
        while time.monotonic() < deadline and len(self.signals) == seen:
            if all(c.proc.poll() is not None and not c.group_alive() for c in self.children):
                break
            # Reap exited leaders promptly so they do not linger as zombies.
            for child in self.children:
                child.proc.poll()
            with contextlib.suppress(queue.Empty):
                self.events.get(timeout=0.1)
        for child in self.children:
            if child.proc.poll() is None or child.group_alive():
                self.out.say(f"{child.name} (pid {child.proc.pid}) still running: SIGKILL")
                child.signal_group(signal.SIGKILL)
        for child in self.children:
            code = child.proc.wait()
            if child.reader is not None:
                child.reader.join(timeout=5)
            self.out.say(f"{child.name} (pid {child.proc.pid}) stopped (code {code})")


#: The settings of the stack's processes unless DJANGO_SETTINGS_MODULE names others.
DEMO_SETTINGS: Final = "hms_tasks.demo.settings"


def _settings_defaulted(env: dict[str, str]) -> bool:
    """Whether DJANGO_SETTINGS_MODULE is unset, or was set by the core's fallback."""
    chosen = env.get("DJANGO_SETTINGS_MODULE")
    return not chosen or env.get("HMS_TASKS_SETTINGS_DEFAULTED") == chosen


def _child_env(redis_url: str, state_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["REDIS_URL"] = redis_url
    env["HMS_TASKS_HOME"] = str(state_dir)
    # The demo stack runs the demo settings on purpose: chosen here, explicitly, so its children
    # do not each warn that they fell back to them (the supervisor says it once).
    if _settings_defaulted(env):
        env.pop("HMS_TASKS_SETTINGS_DEFAULTED", None)
        env["DJANGO_SETTINGS_MODULE"] = DEMO_SETTINGS
    # Children write into pipes: unbuffered, or their lines would arrive in bursts, late.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _flower_env(env: dict[str, str], host: str) -> dict[str, str]:
    """Flower's environment: on loopback its REST API answers without a password (otherwise
    every API call is a 401 and no task can be run from Flower); off loopback
    ``FLOWER_BASIC_AUTH`` (checked before anything starts) guards the API like the pages."""
    flower = dict(env)
    if _is_loopback(host):
        flower["FLOWER_UNAUTHENTICATED_API"] = "true"
    else:
        flower.pop("FLOWER_UNAUTHENTICATED_API", None)
    return flower


def _prepare_argv(*, patients: int, seed: bool) -> list[str]:
    code = (
        "import sys; from hms_tasks.demo.stack.supervisor import prepare_database;"
        f" sys.exit(prepare_database(patients={int(patients)}, seed={bool(seed)}))"
    )
    return [sys.executable, "-c", code]


def run(
    *,
    patients: int = 2000,
    seed: bool = True,
    api_port: int = 8000,
    flower_port: int = 5555,
    host: str = "127.0.0.1",
    out: Output | None = None,
) -> int:
    """Run Redis (if needed), the worker, beat, Flower and the demo API until stopped.

    Returns the exit code: 0 after SIGINT/SIGTERM, 1 if Redis, the database preparation or a
    child failed, 2 for bad arguments (nothing started then).
    """
    output = out or Output()
    say = output.say
    problems = _input_problems(
        patients=patients, api_port=api_port, flower_port=flower_port, host=host
    )
    if problems:
        for problem in problems:
            say(f"error: {problem}")
        return EXIT_BAD_INPUT

    sup = _Supervisor(output)
    # Signal handlers first: a Ctrl-C as soon as we hold the terminal must find them.
    with sup.handling_signals(), terminal_foreground():
        return _run(sup, patients=patients, seed=seed, api_port=api_port,
                    flower_port=flower_port, host=host)


def _run(
    sup: _Supervisor, *, patients: int, seed: bool, api_port: int, flower_port: int, host: str
) -> int:
    say = sup.out.say
    state_dir = conf.home()
    state_dir.mkdir(parents=True, exist_ok=True)
    redis: ProvisionedRedis | None = None
    try:
        try:
            redis = provision_redis(state_dir=state_dir, echo=say)
        except RedisUnavailable as exc:
            say(f"error: {exc}")
            return EXIT_FAILED
        say(f"redis  {redact_url(redis.url)} ({redis.source})")
        if sup.signals:  # Ctrl-C while Redis was being found or started
            sup._stop_for_signal()
            return EXIT_OK
        env = _child_env(redis.url, state_dir)
        # The load tests' "demo" target is the API this stack serves.
        env["HMS_DEMO_API_URL"] = f"http://{_hostport(_browse_host(host), api_port)}"

        step = sup.start("seed", _prepare_argv(patients=patients, seed=seed), env)
        code = sup.wait_one(step)
        if code is None:
            return EXIT_OK
        if code != 0:
            say(f"error: preparing the demo database failed (exit code {code})")
            return EXIT_FAILED
        sup.children.remove(step)

        commands = child_commands(
            state_dir=state_dir, api_port=api_port, flower_port=flower_port, host=host
        )
        for name, argv in commands.items():
            sup.start(name, argv, _flower_env(env, host) if name == "flower" else env)
        browse = _browse_host(host)
        say(f"api    http://{_hostport(browse, api_port)}/api/patients/")
        say(f"flower http://{_hostport(browse, flower_port)}/")
        say("Ctrl-C stops everything")
        return sup.supervise()
    finally:
        # Whatever happened above (a bug included), leave nothing running.
        if any(c.proc.poll() is None or c.group_alive() for c in sup.children):
            sup.stop_all()
        if redis is not None and redis.process is not None:
            say("stopping the private redis-server")
            redis.stop()
        say("stopped")
