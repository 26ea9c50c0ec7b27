"""gunicorn's sync worker, answering requests gunicorn itself refuses with the API's JSON errors.

gunicorn refuses some requests before Django sees them: a request line over
``--limit-request-line`` (4094 bytes: a long query string), too many or too large headers, a
malformed request line. Its answer is an HTML page (HTTP 414 for a long query string), and
both that page and its log line quote the offending request line, query string included,
which can carry a patient's name. This worker answers them as the API answers a bad query
parameter (JSON ``{"error", "parameter", "allowed"}``, status 400, or gunicorn's own status for
headers) and logs the error's kind only, never the request line.

Raising gunicorn's limit instead would not do: its largest finite limit is 8190 bytes (longer
lines get the HTML page again), and no limit at all lets one request line fill a worker's
memory. So the limit stays, and only the answer changes.

Used by ``hms-tasks run`` (``--worker-class hms_tasks.demo.stack.http_errors.JsonErrorWorker``).
"""

from __future__ import annotations

import json
from typing import Any

from gunicorn import util
from gunicorn.http import errors
from gunicorn.workers.sync import SyncWorker

__all__ = ["JsonErrorWorker", "error_for"]

_REASONS = {400: "Bad Request", 403: "Forbidden", 417: "Expectation Failed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            501: "Not Implemented"}


def error_for(exc: BaseException, *, limit_request_line: int) -> tuple[int, dict[str, Any]]:
    """The status and JSON body for an exception gunicorn raised while reading a request."""
    if isinstance(exc, errors.LimitRequestLine):
        return 400, {"error": "query string too long", "parameter": "?",
                     "allowed": f"a request line of at most {limit_request_line} bytes"}
    if isinstance(exc, errors.LimitRequestHeaders):
        return 431, {"error": "request headers too many or too large", "parameter": None,
                     "allowed": None}
    if isinstance(exc, errors.ForbiddenProxyRequest):
        return 403, {"error": "request forbidden", "parameter": None, "allowed": None}
    if isinstance(exc, errors.ExpectationFailed):
        return 417, {"error": "expectation failed", "parameter": None, "allowed": None}
    if isinstance(exc, errors.UnsupportedTransferCoding):
        return 501, {"error": "unsupported transfer coding", "parameter": None, "allowed": None}
    if isinstance(exc, errors.ParseException | errors.NoMoreData | OSError):
        return 400, {"error": "malformed request", "parameter": None, "allowed": None}
    return 500, {"error": "internal error", "parameter": None, "allowed": None}


class JsonErrorWorker(SyncWorker):  # type: ignore[misc]  # gunicorn is untyped
    """gunicorn's sync worker whose own error answers are JSON and never quote the request."""

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        status, body = error_for(exc, limit_request_line=self.cfg.limit_request_line)
        ip = (addr or ("",))[0]
        if status == 500:
            # An error outside Django's own handling (Django answers its errors itself). The
            # path only: the query string may hold patient data.
            self.log.exception("Error handling request %s", getattr(req, "path", "(none read)"))
        else:
            self.log.warning("Invalid request from ip=%s: %s", ip, type(exc).__name__)
        payload = json.dumps(body).encode()
        head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
        try:
            # gunicorn answers these the same way (util.write_error), with an HTML body.
            util.write_nonblock(client, head.encode("latin-1") + payload)
        except OSError:
            self.log.debug("Failed to send error message.")
