"""`hms-tasks run`: the whole stack as real processes, stopped by a signal or by a child dying.

Each test runs the supervisor as a subprocess against the test session's Redis (REDIS_URL) with a
private HMS_TASKS_HOME, talks to the API and Flower over HTTP, and checks afterwards that every
process the supervisor started (its printed pids, and their own children) is gone.
"""

from __future__ import annotations

import http.client
import json
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from hms_tasks import names
from hms_tasks.metrics import names as metrics_names
from tests.helpers import RedisServer, free_port, stop, wait_for

REPO = Path(__file__).resolve().parent.parent
STARTED = re.compile(r"^supervisor \| started (\w+) pid=(\d+)$")


class Stack:
    """A running `hms-tasks run`, its output collected line by line on a thread."""

    def __init__(self, *, env: dict[str, str], patients: int = 200) -> None:
        api_port, flower_port = free_port(), free_port()
        while flower_port == api_port:
            flower_port = free_port()
        self.api = f"http://127.0.0.1:{api_port}"
        self.flower = f"http://127.0.0.1:{flower_port}"
        self.env = env
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hms_tasks.demo.stack.cli",
                "--patients",
                str(patients),
                "--api-port",
                str(api_port),
                "--flower-port",
                str(flower_port),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # Read on a thread so a full pipe can never block the supervisor.
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.descendants: set[int] = set()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def pids(self) -> dict[str, int]:
        """Children the supervisor said it started, by name."""
        found = {}
        for line in list(self.lines):
            m = STARTED.match(line)
            if m:
                found[m.group(1)] = int(m.group(2))
        return found

    def has_line(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def remember_descendants(self) -> None:
        """Note every process below the supervisor now (pool processes, gunicorn workers)."""
        with_children = psutil.Process(self.proc.pid).children(recursive=True)
        self.descendants |= {p.pid for p in with_children}

    def close(self) -> None:
        stop(self.proc)
        # Only if a test failed half-way: never leave processes behind for the next test.
        for pid in [*self.pids().values(), *self.descendants]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        self._reader.join(timeout=10)


def _running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie awaiting its reaper."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _http_json(url: str) -> Any:
    """The JSON body of a 200 answer; ``None`` for anything else (401 included)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def _stack_env(redis_server: RedisServer, home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(REDIS_URL=redis_server.url, HMS_TASKS_HOME=str(home), PYTHONUNBUFFERED="1")
    env.pop("FLOWER_BASIC_AUTH", None)
    # The stack gets a database of its own (SQLite under its home), even when the suite runs
    # against PostgreSQL: the session's test database is not the stack's to seed.
    env.pop("DATABASE_URL", None)
    return env


@pytest.fixture
def stack(redis_server: RedisServer, tmp_path: Path) -> Iterator[Stack]:
    running = Stack(env=_stack_env(redis_server, tmp_path / "home"))
    try:
        yield running
    finally:
        running.close()


def _wait_until_up(stack: Stack) -> dict[str, int]:
    """Wait for all four services; return the pids the supervisor printed."""
    api, flower = stack.api, stack.flower

    def up(check: object) -> object:
        assert stack.proc.poll() is None, f"supervisor exited early:\n{stack.output()}"
        return check

    try:
        wait_for(lambda: up(_http_status(f"{api}/healthz") == 200), timeout=90, what="API")
        wait_for(
            lambda: up(_http_status(f"{api}/api/patients/?limit=1") == 200),
            timeout=30,
            what="API patients",
        )
        wait_for(
            lambda: up(_http_status(f"{flower}/healthcheck") == 200), timeout=60, what="Flower"
        )
        wait_for(lambda: up(stack.has_line("beat: Starting")), timeout=60, what="beat")
        wait_for(lambda: up(stack.has_line(" ready.")), timeout=60, what="worker ready")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- supervisor output ---\n{stack.output()}") from None
    pids = stack.pids()
    assert {"seed", "worker", "beat", "flower", "api"} <= set(pids), stack.output()
    return pids


def _assert_all_gone(stack: Stack, pids: dict[str, int]) -> None:
    for name, pid in pids.items():
        # The supervisor reaps its own children: not even a zombie may remain.
        assert not psutil.pid_exists(pid), f"{name} (pid {pid}) remains:\n{stack.output()}"
    wait_for(
        lambda: not [p for p in stack.descendants if _running(p)],
        timeout=10,
        what="grandchildren to exit",
    )


def test_run_serves_everything_and_stops_cleanly_on_sigterm(stack: Stack) -> None:
    pids = _wait_until_up(stack)
    assert _running(pids["beat"])

    # The worker consumes every hms queue and runs a task sent from another process.
    done = subprocess.run(
        [
            sys.executable, "-m", "hms_tasks", "dispatch", metrics_names.METRICS_COLLECT_HOST,
            "--wait", "--timeout", "60",
        ],
        env=stack.env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{stack.output()}"
    sample = json.loads(done.stdout.split("\n", 1)[1])  # after the "sent <task> id=..." line
    assert "cpu" in sample

    # Flower's REST API answers on loopback without a password (tasks can be run from it),
    # and lists the worker.
    workers = wait_for(
        lambda: [w for w in _http_json(f"{stack.flower}/api/workers?refresh=1") or {}
                 if w.startswith("worker@")],
        timeout=30, what="Flower to list the worker",
    )
    assert len(workers) == 1

    for queue in names.ALL_QUEUES:
        assert stack.has_line(f".> {queue} "), f"worker does not consume {queue}"
    _long_and_malformed_requests_get_json_errors(stack)
    # Access log lines carry the path only, never the query string.
    assert stack.has_line('"GET /api/patients/"')
    assert not stack.has_line("limit=1")
    assert stack.has_line("supervisor | api    http://127.0.0.1:")

    stack.remember_descendants()
    stack.proc.send_signal(signal.SIGTERM)
    assert stack.proc.wait(timeout=40) == 0, stack.output()
    assert stack.has_line("SIGTERM received, stopping")
    for name in ("worker", "beat", "flower", "api"):
        assert stack.has_line(f"supervisor | {name} (pid {pids[name]}) stopped"), stack.output()
    _assert_all_gone(stack, pids)


CANARY = "Canary-Jane-Doe-1957"


def _raw_request(api: str, request: bytes) -> tuple[int, str, bytes]:
    """Send bytes as they are (urllib would refuse a malformed request line): status,
    Content-Type, body."""
    host, port = api.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.getheader("Content-Type") or "", response.read()


def _long_and_malformed_requests_get_json_errors(stack: Stack) -> None:
    """A query string of any length, and a request line gunicorn cannot parse, get the API's
    JSON error (never gunicorn's HTML page), and nothing quotes them in the output."""
    for size in (3_000, 5_000, 9_000, 100_000):
        for path in ("/api/patients/?fields=", f"/api/patients/?name={CANARY}&x="):
            request = f"GET {path}{'a' * size} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            status, kind, body = _raw_request(stack.api, request.encode())
            assert status == 400, (size, path, status, body[:200])
            assert kind == "application/json", (size, path, kind)
            assert "error" in json.loads(body)
            assert CANARY.encode() not in body
    bad_line = f"GET /api/patients/?name={CANARY} x y HTTP/1.1\r\nHost: x\r\n\r\n"
    status, kind, body = _raw_request(stack.api, bad_line.encode())
    assert (status, kind) == (400, "application/json"), body[:200]
    assert json.loads(body)["error"] == "malformed request"
    wait_for(lambda: stack.has_line("Invalid request from ip="), what="gunicorn's log line")
    assert not stack.has_line(CANARY), stack.output()


def test_a_child_that_dies_stops_the_rest_and_exits_1(stack: Stack) -> None:
    pids = _wait_until_up(stack)
    stack.remember_descendants()
    os.kill(pids["beat"], signal.SIGKILL)
    assert stack.proc.wait(timeout=40) == 1, stack.output()
    assert stack.has_line(f"beat (pid {pids['beat']}) exited with code -9"), stack.output()
    _assert_all_gone(stack, pids)


def test_flower_beyond_loopback_needs_basic_auth(redis_server: RedisServer, tmp_path: Path) -> None:
    env = _stack_env(redis_server, tmp_path / "home")
    done = subprocess.run(
        [sys.executable, "-m", "hms_tasks.demo.stack.cli", "--host", "0.0.0.0",
         "--api-port", str(free_port()), "--flower-port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "FLOWER_BASIC_AUTH" in done.stdout
    assert "started" not in done.stdout  # refused before starting anything
    assert not (tmp_path / "home").exists()


def test_a_port_in_use_is_refused_before_anything_starts(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "hms_tasks.demo.stack.cli",
             "--api-port", str(port), "--flower-port", str(free_port())],
            env=_stack_env(redis_server, tmp_path / "home"),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"--api-port: cannot listen on 127.0.0.1:{port}" in done.stdout
    # Who holds it (this test process) and the two ways out.
    assert f"(pid {os.getpid()}) holds it: stop it (kill {os.getpid()})" in done.stdout
    assert 'make run ARGS="--api-port N"' in done.stdout
    assert "started" not in done.stdout


def test_sigkill_of_the_supervisor_leaves_no_child_behind(stack: Stack) -> None:
    pids = _wait_until_up(stack)
    stack.remember_descendants()
    # Grandchildren too: the worker's pool processes and gunicorn's workers.
    assert len(stack.descendants) > len(pids) - 1, stack.output()
    os.kill(stack.proc.pid, signal.SIGKILL)
    stack.proc.wait(timeout=10)
    left = wait_for(
        lambda: not [p for p in stack.descendants if _running(p)],
        timeout=5,
        interval=0.1,
        what="every process of the stack to exit after the supervisor's SIGKILL",
    )
    assert left
    # Their ports are free: the next run can start.
    for url in (stack.api, stack.flower):
        port = int(url.rsplit(":", 1)[1])
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))


def test_flower_env_opens_the_api_on_loopback_only() -> None:
    from hms_tasks.demo.stack.supervisor import _flower_env

    assert _flower_env({}, "127.0.0.1")["FLOWER_UNAUTHENTICATED_API"] == "true"
    assert _flower_env({}, "::1")["FLOWER_UNAUTHENTICATED_API"] == "true"
    off = _flower_env({"FLOWER_UNAUTHENTICATED_API": "true", "FLOWER_BASIC_AUTH": "a:b"}, "0.0.0.0")
    assert "FLOWER_UNAUTHENTICATED_API" not in off
    assert off["FLOWER_BASIC_AUTH"] == "a:b"


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
@pytest.mark.skipif(
    not (REPO / ".venv" / "bin" / "hms-tasks").exists(), reason="no .venv/bin/hms-tasks"
)
def test_make_run_takes_args_and_exits_0_on_ctrl_c(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A real `make run` on a pseudo-terminal, stopped by a Ctrl-C typed on it: the terminal
    sends SIGINT to its foreground process group, as it does for a user."""
    api_port, flower_port = free_port(), free_port()
    args = f"--api-port {api_port} --flower-port {flower_port} --patients 50"
    env = _stack_env(redis_server, tmp_path / "home")
    # `-o venv`: never (re)install the shared virtualenv from a test.
    argv = ["make", "--no-print-directory", "-o", "venv", "run", f"ARGS={args}"]
    pid, terminal = pty.fork()
    if pid == 0:  # the child: a session of its own with the pseudo-terminal as its terminal
        try:
            os.chdir(REPO)
            os.execvpe("make", argv, env)
        finally:
            os._exit(127)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(terminal, 4096)
            except OSError:  # EIO: every process holding the terminal is gone
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def output() -> str:
        return b"".join(chunks).decode("utf-8", "replace")

    status: list[int] = []

    def exited() -> bool:
        if not status:
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status.append(code)
        return bool(status)

    below: set[int] = set()
    try:
        try:
            wait_for(lambda: "Ctrl-C stops everything" in output() or exited(), timeout=120,
                     what="the stack to start")
            assert not status, output()
            wait_for(lambda: _http_status(f"http://127.0.0.1:{api_port}/healthz") == 200,
                     timeout=60, what="the API on the port given in ARGS")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{output()}") from None
        assert "patients=50" in output()
        below = {p.pid for p in psutil.Process(pid).children(recursive=True)}
        os.write(terminal, b"\x03")  # Ctrl-C
        wait_for(exited, timeout=40, interval=0.1, what="make to exit")
        assert os.WIFEXITED(status[0]), f"make died of signal {os.WTERMSIG(status[0])}\n{output()}"
        assert os.WEXITSTATUS(status[0]) == 0, output()
        assert "SIGINT received, stopping" in output()
        assert "Interrupt" not in output()  # make's "*** [run] Interrupt"
    finally:
        if not exited():
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for p in below:
            if _running(p):
                os.kill(p, signal.SIGKILL)
        reader.join(timeout=10)
        os.close(terminal)
