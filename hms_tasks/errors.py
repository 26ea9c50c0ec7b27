"""The exceptions hms-tasks raises, in one place.

::

    HmsTasksError
    ├── ConfigurationError      a setting or beat entry is wrong (start-up); names the setting
    ├── TaskFailed              what the result backend and Flower see when a task raised
    │                           something else: the exception class only (messages can quote
    │                           data); the worker log has the traceback
    ├── InvalidArguments        a task was called with arguments that do not fit its signature
    │                           (permanent: never retried; the run is rejected: a WARNING line,
    │                           INVALID in Flower); names the field and what is allowed
    ├── UnknownService          a service name, or a URL's host, that is not in HMS_TASKS_SERVICES
    │                           (the allowlist of health checks and breakers); a ValueError too
    ├── LoadTestRefused         a load test that cannot start now (more shards than free
    │                           loadtest worker processes); nothing was started
    ├── Poisoned                a message whose worker died HMS_TASKS_MAX_REDELIVERIES times
    │                           was dropped without running (the task's result is a FAILURE)
    └── TransientError          a dependency is briefly unavailable; tasks retry these only
        └── ServiceUnavailable  a guarded service's circuit breaker is open (or its half-open
                                trials are taken): raised before any network call

Messages name settings, fields and types. They never carry argument *values*: a value might be
patient data, and errors end up in logs, Flower and run reports.
"""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured

__all__ = [
    "ConfigurationError",
    "HmsTasksError",
    "InvalidArguments",
    "LoadTestRefused",
    "Poisoned",
    "ServiceUnavailable",
    "TaskFailed",
    "TransientError",
    "UnknownService",
]


class HmsTasksError(Exception):
    """Base class of every error hms-tasks raises on purpose."""


class ConfigurationError(HmsTasksError, ImproperlyConfigured):
    """A setting, environment variable or beat entry is invalid; the message names it."""


class InvalidArguments(HmsTasksError, ValueError):
    """Task arguments do not match the task's declared, typed parameters.

    ``problems`` lists one line per offending field, for example
    ``"limit: expected int from 1 to 100000, got str"``. Values are never included.
    """

    def __init__(self, task: str, problems: list[str]) -> None:
        # args stay (task, problems): Celery's result backend rebuilds exceptions from them.
        super().__init__(task, problems)
        self.task = task
        self.problems = problems

    def __str__(self) -> str:
        return f"{self.task}: " + "; ".join(self.problems)


class TransientError(HmsTasksError):
    """A dependency (Redis, the database, a service) is briefly unavailable: worth a retry."""


class UnknownService(HmsTasksError, ValueError):
    """A service name, instance or URL host that HMS_TASKS_SERVICES does not list: refused."""


class LoadTestRefused(HmsTasksError):
    """A load test that will not start now (for example more shards than live loadtest
    worker processes); the message says how many there are. Nothing was started."""


class Poisoned(HmsTasksError):
    """A message redelivered more often than HMS_TASKS_MAX_REDELIVERIES (its worker died each
    time, as the OOM killer would kill it again) was dropped without running."""


class ServiceUnavailable(TransientError):
    """The circuit breaker of ``service`` (or of one of its instances) refuses calls.

    ``state`` is ``open``, ``half_open`` (its trial calls are all taken) or ``unknown`` (Redis
    is unreachable and HMS_TASKS_BREAKER_FAIL_OPEN is False); ``retry_after`` is the seconds
    until the breaker admits a trial call, when known.
    """

    def __init__(self, service: str, instance: str | None = None, state: str = "open",
                 retry_after: float | None = None) -> None:
        # args stay plain values: Celery's result backend rebuilds exceptions from them.
        super().__init__(service, instance, state, retry_after)
        self.service = service
        self.instance = instance
        self.state = state
        self.retry_after = retry_after

    def __str__(self) -> str:
        what = f"service {self.service!r}" + (
            f" instance {self.instance!r}" if self.instance else "")
        why = {"open": "its circuit breaker is open",
               "half_open": "its circuit breaker is half-open and its trial calls are taken",
               "unknown": "the breaker state is unknown (Redis unreachable; failing closed)"}.get(
            self.state, self.state)
        after = (f"; retry in {self.retry_after:.1f} s" if self.retry_after is not None
                 else "")
        return f"{what} is unavailable: {why}{after}"


class TaskFailed(HmsTasksError):
    """A task raised an unexpected exception; carries its class name, not its message."""
