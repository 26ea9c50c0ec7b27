"""The SSRF probe of tests/faults/test_ssrf.py: a process that attacks its own forbidden listeners.

Run by the test as ``python -m tests.faults.ssrf_probe MODE HOSTS_FILE`` and prints one JSON
line per vector. MODE ``netns``: the test started it in fresh network and mount namespaces
(``unshare --net --mount``, root only) where ``lo`` also carries 10.0.0.1 and 169.254.169.254
and ``/etc/hosts`` is a bind mount of HOSTS_FILE: nothing here can reach another machine, so
the private and metadata listeners are real, and host names resolve through the real glibc
resolver to addresses the test chose. MODE ``plain``: the host's own namespaces; an audit hook
makes any connect to an address that is not loopback fail before it happens, and the vectors
that need the extra addresses or the hosts file are left out.

Servers: the allowed one (HTTP, 127.0.0.1:A, and 10.0.0.1:A in netns mode, standing for a
hospital service on a private network) and forbidden listeners counting accepted connections:
127.0.0.1:F, 127.0.0.2:A (same port as the allowed server, another loopback address: where a
name resolving "elsewhere" leads), 10.0.0.1:F and 169.254.169.254:80 (netns mode). After each
vector a sentinel connection from 127.0.0.3 to every listener, waited for, makes the counts
exact (a listener accepts in order). An audit hook (``socket.connect``) also records every
connect the vector attempted outside the allowed servers.

Each vector goes through the real client paths: ``hms_tasks.metrics.alerts.deliver`` (webhooks)
and ``hms_tasks.health.checks.run`` with ``HMS_TASKS_SERVICES`` set (health). Control runs
("teeth") send the same vectors through a naive client (urllib, with a separate check
resolution for the rebinding vector) and must reach the forbidden listeners: they prove each
vector is live on this machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import sys
import threading
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.minimal_settings")
os.environ.setdefault("MINIMAL_DB", "/nonexistent/ssrf-probe.sqlite3")
django.setup()

from django.test import override_settings  # noqa: E402

from hms_tasks.errors import ConfigurationError, HmsTasksError  # noqa: E402
from hms_tasks.health import checks, registry  # noqa: E402
from hms_tasks.health import settings as health_settings  # noqa: E402
from hms_tasks.metrics import alerts  # noqa: E402
from hms_tasks.metrics import settings as metrics_settings  # noqa: E402
from tests.helpers import wait_for  # noqa: E402

MODE, HOSTS_FILE = sys.argv[1], sys.argv[2]
NETNS = MODE == "netns"
SENTINEL = "127.0.0.3"
HOSTS_BASE = "127.0.0.1 localhost\n::1 localhost\n"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


A = _free_port("127.0.0.1")
F = _free_port("127.0.0.1")
ALLOWED = {("127.0.0.1", A), ("10.0.0.1", A)}


class Listener:
    """A forbidden TCP listener: counts accepted connections (sentinels apart) and closes them."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_server((host, port))
        self.addr = (host, port)
        self.hits = 0
        self.sentinels = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, peer = self.sock.accept()
            if peer[0] == SENTINEL:
                self.sentinels += 1
            else:
                self.hits += 1
            conn.close()


class Allowed(BaseHTTPRequestHandler):
    paths: list[str] = []

    def _answer(self) -> None:
        Allowed.paths.append(self.path)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.endswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{F}/hooks/x")
        else:
            self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


def _serve_allowed(host: str) -> None:
    server = ThreadingHTTPServer((host, A), Allowed)
    threading.Thread(target=server.serve_forever, daemon=True).start()


_serve_allowed("127.0.0.1")
listeners = [Listener("127.0.0.1", F), Listener("127.0.0.2", A)]
if NETNS:
    _serve_allowed("10.0.0.1")
    listeners += [Listener("10.0.0.1", F), Listener("169.254.169.254", 80)]

# -- the hosts file and the rebinding name -----------------------------------------------------
#: rebind.test answers 10.0.0.1 (a private address, allowed for a name) on its first lookup
#: after a reset, 127.0.0.2 (loopback: a name may not lead there) on every later one.
lookups = {"rebind.test": 0}
attempts: list[tuple[str, int]] = []
#: Set while sync() makes its sentinel connections (not the vector's).
syncing = threading.Event()


def _write_hosts(rebind_answer: str) -> None:
    with open(HOSTS_FILE, "w") as f:  # the bind mount: the same inode stays /etc/hosts
        f.write(HOSTS_BASE + "127.0.0.2 elsewhere.test\n169.254.169.254 meta.test\n"
                f"{rebind_answer} rebind.test\n")


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.getaddrinfo" and args and args[0] in ("rebind.test", b"rebind.test"):
        lookups["rebind.test"] += 1
        _write_hosts("10.0.0.1" if lookups["rebind.test"] == 1 else "127.0.0.2")
    elif event == "socket.connect" and isinstance(args[1], tuple) and not syncing.is_set():
        host, port = str(args[1][0]), int(args[1][1])
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if (str(ip), port) not in ALLOWED:
            attempts.append((str(ip), port))
        if not NETNS and not (ip.is_loopback or ip.is_unspecified):
            raise PermissionError("ssrf probe: no connect off loopback in plain mode")


if NETNS:
    _write_hosts("10.0.0.1")
sys.addaudithook(_audit)


def sync() -> list[int]:
    """Every listener's count once all earlier connections were accepted."""
    syncing.set()
    for lst in listeners:
        before = lst.sentinels
        with socket.socket() as s:
            s.bind((SENTINEL, 0))
            s.connect(lst.addr)
        wait_for(lambda lst=lst, before=before: lst.sentinels > before,
                 what="the sentinel connection")
    syncing.clear()
    return [lst.hits for lst in listeners]


# -- clients -----------------------------------------------------------------------------------
#: Valid entries only (entries that could reach elsewhere stop start-up: tests/test_alerts.py).
ALLOWLIST = [f"http://127.0.0.1:{A}/hooks", "http://meta.test/", f"http://elsewhere.test:{A}/",
             f"http://rebind.test:{A}/hooks"]


def webhook(url: str) -> str:
    with override_settings(HMS_TASKS_WEBHOOK_ALLOWLIST=ALLOWLIST):
        try:
            return f"delivered {alerts.deliver(url, {'probe': 1}, timeout=3)}"
        except HmsTasksError as exc:
            return f"refused ({type(exc).__name__}: {exc})"


def health(instance: str, *, check: dict[str, Any] | None = None) -> str:
    entry = {"instances": [instance], "timeout": 2, "retries": 0,
             "check": check or {"type": "http", "path": "/healthz"}}
    with override_settings(HMS_TASKS_SERVICES={"probe": entry}):
        try:
            services = list(registry.services().values())
        except ConfigurationError as exc:
            return f"refused by the settings ({str(exc).split(': ', 1)[1]})"
        results, _ = checks.run(services)
        inst = results[0].instances[0]
        return inst.status if inst.error is None else f"{inst.status} ({inst.error})"


def naive(url: str) -> str:
    """What a client without the guards does: urllib, resolving on its own, no allowlist."""
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return f"status {resp.status}"
    except Exception as exc:  # any outcome: the count is the figure
        return type(exc).__name__


def naive_rebind() -> str:
    """A check of the name's addresses (netguard's rule, its own lookup) then a client doing
    its own lookup: the check sees 10.0.0.1, the connection goes to 127.0.0.2."""
    from hms_tasks import netguard

    lookups["rebind.test"] = 0
    asyncio.run(netguard.resolve("rebind.test", A))
    return naive(f"http://rebind.test:{A}/hooks")


def rebind_twice(client: Callable[[], str]) -> str:
    lookups["rebind.test"] = 0
    first = client()
    second = client()
    return f"{first}; then {second}; lookups {lookups['rebind.test']}"


T = f"127.0.0.1:{F}"
VECTORS: list[tuple[str, str, Callable[[], str], bool]] = [
    # (vector, client, call, needs netns)
    ("metadata 169.254.169.254", "webhook",
     lambda: webhook("http://169.254.169.254/latest/meta-data/"), False),
    ("metadata 169.254.169.254", "health", lambda: health("http://169.254.169.254"), False),
    ("private 10.0.0.1", "webhook", lambda: webhook(f"http://10.0.0.1:{F}/"), False),
    ("0.0.0.0 (Linux: this host)", "webhook", lambda: webhook(f"http://0.0.0.0:{F}/"), False),
    ("0.0.0.0 (Linux: this host)", "health",
     lambda: health(f"tcp://0.0.0.0:{F}", check={"type": "tcp"}), False),
    ("hex 0x7f.1", "webhook", lambda: webhook(f"http://0x7f.1:{F}/"), False),
    ("hex 0x7f.1", "health", lambda: health(f"tcp://0x7f.1:{F}", check={"type": "tcp"}),
     False),
    ("decimal 2130706433", "webhook", lambda: webhook(f"http://2130706433:{F}/hooks"), False),
    ("decimal 2130706433", "health", lambda: health(f"redis://2130706433:{F}",
                                                    check={"type": "redis"}), False),
    ("octal 0177.0.0.1", "webhook", lambda: webhook(f"http://0177.0.0.1:{F}/hooks"), False),
    ("short 127.1", "webhook", lambda: webhook(f"http://127.1:{F}/hooks"), False),
    ("mapped [::ffff:127.0.0.1]", "webhook",
     lambda: webhook(f"http://[::ffff:127.0.0.1]:{F}/hooks"), False),
    ("credentials allowed@forbidden", "webhook",
     lambda: webhook(f"http://127.0.0.1:{A}@127.0.0.1:{F}/hooks"), False),
    ("backslash allowed\\@forbidden", "webhook",
     lambda: webhook(f"http://127.0.0.1:{A}\\@127.0.0.1:{F}/hooks"), False),
    ("localhost variants", "webhook",
     lambda: "; ".join(webhook(f"http://{h}:{F}/hooks")
                       for h in ("localhost", "LOCALHOST.", "LocalHost")), False),
    ("redirect to the forbidden listener", "webhook",
     lambda: webhook(f"http://127.0.0.1:{A}/hooks/redirect"), False),
    ("redirect to the forbidden listener", "health",
     lambda: health(f"http://127.0.0.1:{A}", check={"type": "http", "path": "/redirect"}),
     False),
    ("'..' out of the allowed path", "webhook",
     lambda: "; ".join(webhook(f"http://127.0.0.1:{A}/hooks/{d}/admin")
                       for d in ("..", "%2e%2e", "%2E.", ".%2E", "..;")), False),
    ("'..' out of the allowed path", "health",
     lambda: health(f"http://127.0.0.1:{A}", check={"type": "http",
                                                     "path": "/healthz/%2e%2e/admin"}), False),
    ("name resolving to loopback", "webhook",
     lambda: webhook(f"http://elsewhere.test:{A}/hooks"), True),
    ("name resolving to loopback", "health", lambda: health(f"http://elsewhere.test:{A}"), True),
    ("name resolving to loopback", "health tcp",
     lambda: health(f"tcp://elsewhere.test:{A}", check={"type": "tcp"}), True),
    ("name resolving to loopback", "health redis",
     lambda: health(f"redis://elsewhere.test:{A}", check={"type": "redis"}), True),
    ("name resolving to metadata", "webhook", lambda: webhook("http://meta.test/x"), True),
    ("DNS rebinding (10.0.0.1, then 127.0.0.2)", "webhook",
     lambda: rebind_twice(lambda: webhook(f"http://rebind.test:{A}/hooks/x")), True),
    ("DNS rebinding (10.0.0.1, then 127.0.0.2)", "health",
     lambda: rebind_twice(lambda: health(f"http://rebind.test:{A}")), True),
]

#: The same vectors without the guards: each must reach a forbidden listener.
CONTROLS: list[tuple[str, Callable[[], str], bool]] = [
    ("metadata 169.254.169.254", lambda: naive("http://169.254.169.254/latest/meta-data/"),
     True),
    ("private 10.0.0.1", lambda: naive(f"http://10.0.0.1:{F}/"), True),
    ("0.0.0.0 (Linux: this host)", lambda: naive(f"http://0.0.0.0:{F}/"), False),
    ("hex 0x7f.1", lambda: naive(f"http://0x7f.1:{F}/"), False),
    ("decimal 2130706433", lambda: naive(f"http://2130706433:{F}/"), False),
    ("octal 0177.0.0.1", lambda: naive(f"http://0177.0.0.1:{F}/"), False),
    ("short 127.1", lambda: naive(f"http://127.1:{F}/"), False),
    ("mapped [::ffff:127.0.0.1]", lambda: naive(f"http://[::ffff:127.0.0.1]:{F}/"), False),
    ("name resolving to loopback", lambda: naive(f"http://elsewhere.test:{A}/"), True),
    ("name resolving to metadata", lambda: naive("http://meta.test/"), True),
    ("DNS rebinding (10.0.0.1, then 127.0.0.2)", naive_rebind, True),
]


def main() -> None:
    # The settings the vectors use must be valid apart from the entries under attack.
    metrics_settings.get()
    health_settings.get()
    for vector, client, call, needs_netns in VECTORS:
        if needs_netns and not NETNS:
            continue
        before = sync()
        attempts.clear()
        paths_before = len(Allowed.paths)
        outcome = call()
        hits = sum(after - b for after, b in zip(sync(), before, strict=True))
        outside = [p for p in Allowed.paths[paths_before:]
                   if not (p.startswith("/hooks/") or p in ("/hooks", "/healthz", "/redirect"))]
        print(json.dumps({"kind": "vector", "vector": vector, "client": client,
                          "outcome": outcome[:300], "forbidden_connections": hits,
                          "forbidden_connects_attempted": len(attempts),
                          "requests_outside_allowed_paths": len(outside)}), flush=True)
    for vector, call, needs_netns in CONTROLS:
        if needs_netns and not NETNS:
            continue
        before = sync()
        outcome = call()
        hits = sum(after - b for after, b in zip(sync(), before, strict=True))
        print(json.dumps({"kind": "control", "vector": vector, "outcome": outcome[:300],
                          "forbidden_connections": hits}), flush=True)


if __name__ == "__main__":
    main()
