"""The exceptions hms-tasks raises, in one place.

::

    HmsTasksError
    ├── ConfigurationError      a setting or beat entry is wrong (start-up); names the setting
    ├── TaskFailed              what the result backend and Flower see when a task raised
    │                           something else: the exception class only (messages can quote
    │                           data); the worker log has the traceback
    ├── InvalidArguments        a task was called with arguments that do not fit its signature
    │                           (permanent: never retried); names the field and the expected type
    └── TransientError          a dependency is briefly unavailable; tasks retry these only

Messages name settings, fields and types. They never carry argument *values*: a value might be
patient data, and errors end up in logs, Flower and run reports.
"""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured

__all__ = [
    "ConfigurationError",
    "HmsTasksError",
    "InvalidArguments",
    "TaskFailed",
    "TransientError",
]


class HmsTasksError(Exception):
    """Base class of every error hms-tasks raises on purpose."""


class ConfigurationError(HmsTasksError, ImproperlyConfigured):
    """A setting, environment variable or beat entry is invalid; the message names it."""


class InvalidArguments(HmsTasksError, ValueError):
    """Task arguments do not match the task's declared, typed parameters.

    ``problems`` lists one line per offending field, for example
    ``"limit: expected int, got str"``. Values are never included.
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


class TaskFailed(HmsTasksError):
    """A task raised an unexpected exception; carries its class name, not its message."""
