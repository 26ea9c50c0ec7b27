"""Django middleware that samples requests for N+1 patterns (:mod:`hms_tasks.queries.live`).

Opt-in: add it to ``MIDDLEWARE`` and set ``HMS_TASKS_QUERIES_SAMPLE_RATE`` (0 to 1; 0, the
default, samples nothing)::

    MIDDLEWARE = [..., "hms_tasks.queries.middleware.QuerySamplingMiddleware", ...]
    HMS_TASKS_QUERIES_SAMPLE_RATE = 0.01

An unsampled request costs one random number. A sampled one wraps every database connection
with an ``execute_wrapper`` that counts statements by fingerprint and call site; nothing of
the request itself (path, parameters, body, user) is read. Redis is written at most every few
seconds per process; a Redis outage drops the sample, never the request.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import ExitStack

from django.db import connections
from django.http import HttpRequest, HttpResponseBase

from hms_tasks.queries import live, settings

__all__ = ["QuerySamplingMiddleware"]


class QuerySamplingMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        rate = settings.get().queries_sample_rate
        if rate <= 0.0 or (rate < 1.0 and random.random() >= rate):
            return self.get_response(request)
        sample = live.RequestSample()
        with ExitStack() as stack:
            for conn in connections.all():
                stack.enter_context(conn.execute_wrapper(sample))
            response = self.get_response(request)
        live.sampler().add(sample)
        return response
