"""``python -m hms_tasks.loadtest.runner``: one shard's load generator, in its own process.

Locust is imported here, inside :func:`main`, and nowhere else: importing it monkey-patches the
process with gevent, which must never happen in a Celery worker. A shard
(:mod:`hms_tasks.loadtest.shard`) starts this module as a subprocess, writes one JSON line of
configuration to its stdin and reads JSON lines from the file descriptor the configuration
names (``out_fd``; stdout and stderr are the Locust log)::

    {"type": "ready", "pid", "locust"}                      setup done, waiting for start_at
    {"type": "tick", "t", "u", "e": {key: [n, f, sum_ms, min_ms, max_ms, none, {bucket: count}]},
     "x": {"<key>\t<error>": count}, "b": blocked}           one wall-clock second (deltas)
    {"type": "final", "reason", "started_at", "stopped_at", "locust": {key: {n, f, hist}}}
    {"type": "error", "stage", "error"}                     setup failed (exit code 3)

Ticks carry the requests Locust counted since the previous tick, taken at the start of second
``t + 1`` (so, to within the main loop's few milliseconds, those that completed in second
``t``), per request key ``"<method> <name>"``: count, failures, the sum,
minimum and maximum of response times, requests without a response time, and the response-time
histogram in Locust's own rounded buckets (:func:`locust.stats.bucket_response_time`). Merging
the buckets of every shard gives exactly the percentiles one Locust process would report for
the same requests. ``final`` repeats Locust's own cumulative counters, so the shard can check
its sum of ticks against them.

Safety: only the target may be contacted. Where the host allows it, the shard starts this
module in a network namespace of its own, set up by :mod:`hms_tasks.loadtest.containment`
(which then runs this module in the same process): nothing leads out of it, whatever code
connects. In every case, after Locust is imported, every socket ``connect`` made through
Python's socket class (``gevent.socket.socket``, which monkey-patching makes ``socket.socket``:
FastHttpUser's geventhttpclient, HttpUser's urllib3, ``socket`` in a locustfile) is checked
against the target's resolved addresses and port, and anything else (another host, another
port, a redirect elsewhere, a Unix socket) fails with ``ConnectionRefusedError`` before a
packet is sent; such attempts are counted (``b``). A connect to the target from a contained
runner then goes through the shard: the shard connects in the host's namespace and sends the
connected socket back over the socket pair the configuration names (``connect_fd``), which
takes the place of the caller's socket (:class:`~hms_tasks.loadtest.containment.Dialer`); the
requests then flow directly, with nothing relayed. The guard is Python-level only: ``_socket``
or a C extension opens sockets beneath it, and only the namespace stops those (they reach
nothing, the target included).

The run is bounded on its own: at ``end_at`` the users stop (in-flight requests finish within
``stop_timeout``), at ``hard_deadline`` the process exits whatever happens, and it stops when
its parent (the shard) is gone. SIGTERM stops the load at once and still writes the final line
(an abort keeps partial results).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:  # imported in main(), after gevent's monkey-patching (it imports asyncio)
    from hms_tasks.loadtest import containment

__all__ = ["main"]

#: Distinct request keys and error keys one shard tracks; more fold into "(other)".
MAX_KEYS = 500
MAX_ERRORS = 100
EXIT_SETUP_FAILED = 3


def _allowed_addresses(base_url: str) -> tuple[set[str], int]:
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    try:
        return {str(ipaddress.ip_address(host))}, port
    except ValueError:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return {str(ipaddress.ip_address(i[4][0])) for i in infos}, port


def _install_guard(base_url: str, counter: list[int],
                   dialer: containment.Dialer | None) -> None:
    """Refuse every connection but to the target, and with ``dialer`` (a contained runner)
    get the target's from the shard (see the module docstring). Patches ``connect`` and
    ``connect_ex`` of gevent's public socket class, which every gevent socket (and, after
    monkey-patching, every ``socket.socket``) is."""
    from gevent import socket as gsocket  # type: ignore[import-untyped]

    ips, port = _allowed_addresses(base_url)
    cls = gsocket.socket
    original_connect = cls.connect
    original_connect_ex = cls.connect_ex

    def target_address(sock: Any, address: Any) -> str | None:
        """The target's address ``address`` names, or ``None`` if it is not the target."""
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        if not isinstance(address, tuple) or len(address) < 2 or address[1] != port:
            return None
        host = address[0]
        try:
            ip = str(ipaddress.ip_address(host))
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError:
                return None
            found = [(info[0], str(ipaddress.ip_address(info[4][0]))) for info in infos]
            if not found or not {a for _, a in found} <= ips:
                return None
            # The address a connect would take: the first of the socket's family.
            return next((a for family, a in found if family == sock.family), found[0][1])
        return ip if ip in ips else None

    def through_shard(sock: Any, ip: str) -> bool:
        # Only a TCP socket of the address's family can take the shard's socket's place; any
        # other connect goes on as it would (contained, into the empty namespace).
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        return dialer is not None and sock.family == family and sock.type == socket.SOCK_STREAM

    def refuse() -> ConnectionRefusedError:
        counter[0] += 1
        return ConnectionRefusedError(errno.EACCES, "hms-tasks load test: only the target may"
                                                    " be contacted")

    def connect(self: Any, address: Any) -> None:
        ip = target_address(self, address)
        if ip is None:
            raise refuse()
        if not through_shard(self, ip):
            return original_connect(self, address)  # type: ignore[no-any-return]
        assert dialer is not None
        dialer.connect(self, ip, port)
        return None

    def connect_ex(self: Any, address: Any) -> int:
        ip = target_address(self, address)
        if ip is None:
            refuse()
            return errno.EACCES
        if not through_shard(self, ip):
            return original_connect_ex(self, address)  # type: ignore[no-any-return]
        assert dialer is not None
        try:
            dialer.connect(self, ip, port)
        except TimeoutError:
            return errno.EAGAIN  # what gevent's connect_ex answers to a timeout
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0

    cls.connect = connect
    cls.connect_ex = connect_ex


def _endpoint_users(config: dict[str, Any]) -> list[type[Any]]:
    from locust import FastHttpUser, HttpUser, between

    scenario = config["scenario"]
    base: type[Any] = FastHttpUser if scenario.get("user_class", "fast") == "fast" else HttpUser
    tasks: dict[Any, int] = {}
    for ep in scenario["endpoints"]:
        def request(user: Any, ep: dict[str, Any] = ep) -> None:
            kwargs: dict[str, Any] = {"name": ep["name"], "allow_redirects": False}
            if ep.get("json") is not None:
                kwargs["json"] = ep["json"]
            user.client.request(ep["method"], ep["path"], **kwargs)

        request.__name__ = f"request_{len(tasks)}"
        tasks[request] = ep["weight"]
    low, high = scenario.get("wait", [0.5, 1.5])
    attrs: dict[str, Any] = {"tasks": tasks, "wait_time": between(low, high),
                             "host": config["host"]}
    if base is FastHttpUser:
        attrs.update(connection_timeout=5.0, network_timeout=30.0)
    return [type("EndpointsUser", (base,), attrs)]


def _file_users(path: str) -> list[type[Any]]:
    from locust.util.load_locustfile import load_locustfile

    classes, shapes = load_locustfile(path)
    if shapes:
        raise ValueError("load test shapes are not supported (users, spawn rate and duration"
                         " come from the test definition)")
    users = list(classes.values())
    if not users:
        raise ValueError("the locustfile defines no user class")
    return users


class _Deltas:
    """Per-second deltas of Locust's own cumulative statistics (``env.stats``).

    Nothing runs per request: Locust already counts every request in its own histogram, and a
    listener of our own on every request cost about 1.2 us of the generator's ~70 us per
    request (bench/loadtest.py). Once a second the entries are compared with the previous
    snapshot; the difference is the tick. Minimum and maximum are Locust's running ones (the
    merge only needs the run's). Raw samples (``HMS_TASKS_LOADTEST_KEEP_RAW``, audits and
    tests) still need a listener: it is added only then.
    """

    def __init__(self, env: Any, raw_path: str | None) -> None:
        from locust.stats import StatsError

        self.stats = env.stats
        self.parse_error = StatsError.parse_error
        self.seen: dict[str, tuple[int, int, float, int, dict[int, int]]] = {}
        self.errors_seen: dict[str, int] = {}
        self.shown: set[str] = set()
        self.shown_errors: set[str] = set()
        self.raw = open(raw_path, "a", buffering=1 << 16) if raw_path else None  # noqa: SIM115
        if self.raw is not None:
            env.events.request.add_listener(self.on_request)

    def on_request(self, request_type: str, name: str, response_time: float | None,
                   **_: Any) -> None:
        assert self.raw is not None
        self.raw.write(f"{request_type} {name}\t{response_time!r}\n")

    def _shown(self, key: str, other: str, limit: int) -> str:
        if key in self.shown or len(self.shown) < limit:
            self.shown.add(key)
            return key
        return other

    def _rows(self) -> dict[str, list[Any]]:
        rows: dict[str, list[Any]] = {}
        for entry in list(self.stats.entries.values()):
            key = f"{entry.method} {entry.name}"
            hist = dict(entry.response_times)
            now = (entry.num_requests, entry.num_failures, float(entry.total_response_time),
                   entry.num_none_requests, hist)
            n0, f0, rt0, none0, hist0 = self.seen.get(key, (0, 0, 0.0, 0, {}))
            self.seen[key] = now
            if now[0] == n0:
                continue
            row = rows.setdefault(self._shown(key, "OTHER (other)", MAX_KEYS),
                                  [0, 0, 0.0, None, 0.0, 0, {}])
            row[0] += now[0] - n0
            row[1] += now[1] - f0
            row[2] += now[2] - rt0
            low = entry.min_response_time
            row[3] = low if row[3] is None or low is None else min(row[3], low)
            row[4] = max(row[4], entry.max_response_time)
            row[5] += now[3] - none0
            for b, c in hist.items():
                if c != hist0.get(b, 0):
                    row[6][b] = row[6].get(b, 0) + c - hist0.get(b, 0)
        return rows

    def _errors(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for err in list(self.stats.errors.values()):
            key = f"{err.method} {err.name}\t{self.parse_error(err.error)}"[:300]
            before = self.errors_seen.get(key, 0)
            self.errors_seen[key] = err.occurrences
            if err.occurrences > before:
                shown = self._shown_error(key, f"{err.method} {err.name}\t(other errors)"[:300])
                out[shown] = out.get(shown, 0) + err.occurrences - before
        return out

    def _shown_error(self, key: str, other: str) -> str:
        if key in self.shown_errors or len(self.shown_errors) < MAX_ERRORS:
            self.shown_errors.add(key)
            return key
        return other

    def ticks(self, *, before: int, users: int, blocked: int, since: int) -> list[dict[str, Any]]:
        """Ticks for every second from ``since`` to ``before`` (exclusive), empty ones too;
        what Locust counted since the last call goes into the last of them."""
        out = [{"type": "tick", "t": t, "u": users, "e": {}, "x": {}, "b": blocked}
               for t in range(since, before)]
        if out:
            out[-1].update(e=self._rows(), x=self._errors())
        return out


def main() -> int:
    config: dict[str, Any] = json.loads(sys.stdin.readline())
    out = os.fdopen(int(config["out_fd"]), "w", buffering=1)

    def emit(doc: dict[str, Any]) -> None:
        out.write(json.dumps(doc, separators=(",", ":")) + "\n")

    # Locust (and gevent's monkey-patching) from here on: this process only.
    from gevent import monkey

    monkey.patch_all()
    import gevent
    import locust
    from locust.env import Environment

    from hms_tasks.loadtest import containment

    blocked = [0]
    stopping = {"reason": ""}
    try:
        connect_fd = config.get("connect_fd")
        dialer = containment.Dialer(int(connect_fd)) if connect_fd is not None else None
        _install_guard(config["host"], blocked, dialer)
        kind = config["scenario"]["kind"]
        if kind == "endpoints":
            user_classes = _endpoint_users(config)
        else:
            user_classes = _file_users(config["locustfile"])
        env = Environment(user_classes=user_classes, host=config["host"],
                          stop_timeout=float(config.get("stop_timeout", 10)),
                          catch_exceptions=True)
        runner = env.create_local_runner()
        recorder = _Deltas(env, config.get("raw_path"))
    except Exception as exc:
        emit({"type": "error", "stage": "setup",
              "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        return EXIT_SETUP_FAILED

    parent = os.getppid()
    start_at = float(config["start_at"])
    end_at = float(config["end_at"])
    hard_deadline = float(config["hard_deadline"])

    def on_term() -> None:
        if not stopping["reason"]:
            stopping["reason"] = "terminated"

    gevent.signal_handler(signal.SIGTERM, on_term)
    emit({"type": "ready", "pid": os.getpid(), "locust": locust.__version__})

    def must_stop() -> bool:
        if os.getppid() != parent and not stopping["reason"]:
            stopping["reason"] = "parent-gone"
        return bool(stopping["reason"]) or time.time() >= hard_deadline

    while time.time() < start_at and not must_stop():
        gevent.sleep(min(0.05, max(0.0, start_at - time.time())))
    started_at = time.time()
    first_second = int(started_at)
    next_second = first_second
    last_users = 0
    if not must_stop():
        runner.start(int(config["users"]), spawn_rate=float(config["spawn_rate"]))
        while True:
            now = time.time()
            if now >= end_at and not stopping["reason"]:
                stopping["reason"] = "done"
            if must_stop():
                break
            current = int(now)
            last_users = runner.user_count
            if current > next_second:
                for tick in recorder.ticks(before=current, users=last_users,
                                           blocked=blocked[0], since=next_second):
                    emit(tick)
                next_second = current
            gevent.sleep(min(0.1, max(0.005, min(end_at, current + 1) - time.time())))
        if stopping["reason"] != "done":
            env.stop_timeout = 1.0  # an abort: in-flight requests get one second
        stopper = gevent.spawn(runner.stop)
        stopper.join(timeout=max(0.5, hard_deadline - time.time()))
    else:
        stopping["reason"] = stopping["reason"] or "deadline"
    stopped_at = time.time()
    for tick in recorder.ticks(before=int(stopped_at) + 1, users=last_users, blocked=blocked[0],
                               since=next_second):
        emit(tick)
    own = {f"{e.method} {e.name}": {"n": e.num_requests, "f": e.num_failures,
                                    "hist": dict(e.response_times)}
           for e in env.stats.entries.values()}
    emit({"type": "final", "reason": stopping["reason"] or "done", "started_at": started_at,
          "stopped_at": stopped_at, "blocked": blocked[0], "locust": own})
    if recorder.raw is not None:
        recorder.raw.close()
    out.flush()
    # Greenlets of users that ignored the stop may still run: leave without waiting for them.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
