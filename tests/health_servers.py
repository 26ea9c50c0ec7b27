"""Real HTTP servers on 127.0.0.1 for the health tests, told how to answer at run time.

Modes: ``fast`` (200 with ``{"status": "ok"}``), ``slow`` (the same after ``delay`` seconds),
``error`` (500), ``bad_json`` (200 with ``{"status": "down"}``), ``hang`` (accept, read the
request and never reply), ``redirect`` (302 to ``redirect_to``). ``stop()`` makes it down
(nothing listens on its port); ``start()`` brings it back on the same port. ``connections``
counts accepted TCP connections, ``requests`` the requests answered or held.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.helpers import free_port


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None,
              ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        owner = self.server.owner
        with owner.lock:
            owner.requests += 1
        mode = owner.mode
        if mode == "hang":
            owner.release.wait(30)
            self.close_connection = True
            return
        if mode == "slow":
            owner.release.wait(owner.delay)
        if mode == "error":
            self._send(500, {"status": "error"})
        elif mode == "bad_json":
            self._send(200, {"status": "down"})
        elif mode == "redirect":
            self._send(302, {}, {"Location": owner.redirect_to})
        else:
            self._send(200, {"status": "ok"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: ServiceServer

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self.owner.lock:
            self.owner.connections += 1
        return True


class ServiceServer:
    """One controllable HTTP server on a free loopback port."""

    def __init__(self, mode: str = "fast", *, delay: float = 0.0, host: str = "127.0.0.1",
                 ) -> None:
        self.host = host
        self.port = free_port()
        self.mode = mode
        self.delay = delay
        self.redirect_to = ""
        self.connections = 0
        self.requests = 0
        self.lock = threading.Lock()
        self.release = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self.release = threading.Event()
        server = _Server((self.host, self.port), _Handler)
        server.owner = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> ServiceServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def only(**entries: Any) -> dict[str, Any]:
    """A HMS_TASKS_SERVICES value of exactly these entries (the demo settings' services are
    replaced)."""
    return dict(entries)
