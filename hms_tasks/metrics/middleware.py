"""Django middleware that times the HMS's own requests for the p95 and error-rate alerts.

Add it near the top of ``MIDDLEWARE`` (so it times the rest of the stack)::

    MIDDLEWARE = ["hms_tasks.metrics.middleware.TimingMiddleware", ...]

It costs a ``perf_counter`` pair and a dict update per request, plus one pipelined Redis round
trip per process every few seconds (:mod:`hms_tasks.metrics.timings`). It records durations
and status codes only: never paths, parameters or bodies. Requests to ``/metrics`` and
``/healthz`` (scrapes and probes) are not counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from django.http import HttpRequest, HttpResponseBase

from hms_tasks.metrics.timings import recorder

__all__ = ["TimingMiddleware"]


class TimingMiddleware:
    #: Path prefixes that are not counted.
    exclude: tuple[str, ...] = ("/metrics", "/healthz")

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        if request.path.startswith(self.exclude):
            return self.get_response(request)
        t0 = time.perf_counter()
        status = 500
        try:
            response = self.get_response(request)
            status = response.status_code
            return response
        finally:
            recorder().record((time.perf_counter() - t0) * 1000, status)
