"""How hms tasks are declared: a capability carries the defaults of all its tasks, and every task
runs through :class:`HmsTask`, which checks arguments and writes the run report.

A capability declares its defaults once::

    metrics = Capability("metrics", soft_time_limit=20, time_limit=30)

    @metrics.task(names.METRICS_COLLECT_HOST)
    def collect_host() -> dict[str, Any]:
        ...

Tasks are idempotent by default, so they get ``acks_late`` and ``reject_on_worker_lost``: a worker
that dies mid-task leaves the message to be redelivered, not lost. A message whose worker died
``HMS_TASKS_MAX_REDELIVERIES`` times is dropped as ``poisoned`` (the OOM killer will strike
again): its result is a FAILURE with :class:`~hms_tasks.errors.Poisoned`. The queue comes
from the task name (``hms.<capability>.*`` → ``hms.<capability>``).
"""

from __future__ import annotations

import gc
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NoReturn

from celery import Task
from celery.exceptions import Ignore, Retry
from celery.signals import worker_init, worker_process_init, worker_ready

from hms_tasks import conf, reports, store
from hms_tasks.errors import HmsTasksError, InvalidArguments, Poisoned, TaskFailed
from hms_tasks.params import Signature, signature_of

__all__ = ["Capability", "HmsTask"]

logger = logging.getLogger(__name__)

_worker_node: str | None = None

#: Run reports this process could not write (Redis unreachable), oldest first: each later
#: report writes them first. A task that failed because Redis died, and whose message was
#: acked once Redis was back, so keeps its report. Bounded: a long outage keeps the newest.
_unwritten: deque[reports.RunReport] = deque(maxlen=1000)


@worker_init.connect
def _remember_node(sender: Any = None, **_: Any) -> None:
    # The node name (worker@host) is what Flower and `celery inspect` show. Tasks only see it
    # in request.hostname under the prefork pool, so keep it from the worker's start (pool
    # children inherit it through fork).
    global _worker_node
    _worker_node = getattr(sender, "hostname", None)


@worker_ready.connect
def _freeze_main_heap(**_: Any) -> None:
    # What the worker built to start (Django, Celery, the app's modules: a few hundred
    # thousand objects) lives as long as it does; left to the garbage collector, each full
    # collection walks it all and stops the process for ~100 ms. Measured (2026-12-01,
    # `BENCH_PARTS=latency python -m bench cache`, a solo-pool worker): commit -> keys gone
    # p99 45-78 ms with one such pause in the 5 s window, 6.0 ms with the heap frozen. The
    # prefork pool's children freeze theirs after the fork (below): it also spares the
    # copy-on-write pages a collection would touch (the gc module's documentation).
    gc.collect()
    gc.freeze()


@worker_process_init.connect
def _freeze_child_heap(**_: Any) -> None:
    gc.freeze()


class HmsTask(Task[Any, Any]):
    """Base class of every hms task: argument check, redelivery cap, run report."""

    abstract = True
    #: The function the task wraps; set by :meth:`Capability.task`.
    hms_function: Callable[..., Any]

    @cached_property
    def hms_signature(self) -> Signature:
        return signature_of(self.name, self.hms_function)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._run_reported(args, kwargs)
        except InvalidArguments as exc:
            if self.request.called_directly or self.request.is_eager:
                raise
            # After the run report: whoever sees the result can read the report too.
            self._reject(exc)

    def _run_reported(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        started = time.time()
        t0 = time.perf_counter()
        outcome: reports.Outcome = "failure"
        summary: dict[str, Any] | None = None
        error: str | None = None
        try:
            self.hms_signature.check(args, kwargs)
            if self._poisoned():
                outcome = "poisoned"
                raise Poisoned(f"{self.name}: its worker died more than"
                               " HMS_TASKS_MAX_REDELIVERIES times; dropped without running")
            result = self.run(*args, **kwargs)
            outcome = "success"
            summary = result if isinstance(result, dict) else {"result": result}
            return result
        except InvalidArguments:
            outcome = "rejected"
            error = "InvalidArguments"
            raise
        except Retry:
            outcome = "retry"
            raise
        except HmsTasksError as exc:
            error = type(exc).__name__
            raise
        except Exception as exc:
            error = type(exc).__name__
            if type(exc).__module__.split(".")[0] in ("celery", "billiard"):
                raise  # time limits and the like: they carry no data
            # Results and Flower show the exception's message and traceback; a database error
            # can quote row values. They get the class name; the worker log gets the rest.
            logger.error("%s[%s] raised %s", self.name, self.request.id, error, exc_info=True)
            raise TaskFailed(f"{error} (traceback in the worker log)") from None
        except BaseException as exc:
            error = type(exc).__name__
            if isinstance(exc, SystemExit) and self._past_hard_limit(t0):
                # billiard ends a child past its hard time limit with SIGTERM, which Python
                # raises here as SystemExit; the result says TimeLimitExceeded, so must this.
                error = "TimeLimitExceeded"
            raise
        finally:
            self._report(started, t0, outcome, summary, error)

    def _reject(self, exc: InvalidArguments) -> NoReturn:
        """End a run whose arguments do not fit: the caller's mistake, not a task failure.

        One WARNING line naming the task and the fields (the problems never quote values), no
        traceback. The result backend gets the InvalidArguments without a traceback, so a
        client waiting on the result (``AsyncResult.get``, ``dispatch --wait``) still gets the
        problems. Monitors get a ``task-invalid`` event, so Flower shows the run as INVALID
        with the problems, not as a failure with a traceback (Celery's own ``task-rejected``
        would not do: its event state ranks REJECTED before STARTED and keeps the task
        STARTED). ``Ignore`` then acknowledges the message without Celery recording a failure
        of its own or sending ``task-failed``.
        """
        logger.warning("%s[%s] rejected: %s", self.name, self.request.id, "; ".join(exc.problems))
        if self.request.id and (not self.ignore_result or self.store_errors_even_if_ignored):
            self.backend.mark_as_failure(self.request.id, exc, traceback=None,
                                         request=self.request)
        try:
            self.send_event("task-invalid", exception=f"InvalidArguments: {exc}")
        except Exception:
            # Monitoring only: the rejection itself is recorded either way.
            logger.debug("could not send the task-invalid event of %s", self.name, exc_info=True)
        raise Ignore()

    def _past_hard_limit(self, t0: float) -> bool:
        limits = self.request.timelimit or (None, None)
        hard = limits[0] or self.time_limit or self.app.conf.task_time_limit
        # billiard counts from the moment the child took the job, a moment before t0.
        return bool(hard) and time.perf_counter() - t0 >= float(hard) - 0.5

    def _poisoned(self) -> bool:
        info = self.request.delivery_info or {}
        if not info.get("redelivered") or not self.request.id:
            return False
        # Only redeliveries pay for this round trip: the normal path stays free of it.
        counter = store.key("redeliveries", self.request.id)
        pipe = store.client().pipeline(transaction=True)
        pipe.incr(counter)
        pipe.expire(counter, 7 * 86400)
        count = int(pipe.execute()[0])
        if count > conf.get().max_redeliveries:
            logger.error(
                "%s[%s] was redelivered %d times (its worker died each time); dropping it",
                self.name, self.request.id, count,
            )
            return True
        return False

    def _report(
        self,
        started: float,
        t0: float,
        outcome: reports.Outcome,
        summary: dict[str, Any] | None,
        error: str | None,
    ) -> None:
        report: reports.RunReport = {
            "v": reports.REPORT_VERSION,
            "task": self.name,
            "id": self.request.id,
            "node": _worker_node or self.request.hostname or socket.gethostname(),
            "started_at": started,
            "finished_at": time.time(),
            "duration_ms": round((time.perf_counter() - t0) * 1000, 3),
            "outcome": outcome,
            "summary": summary,
            "error": error,
        }
        _unwritten.append(report)
        try:
            while _unwritten:
                reports.record(_unwritten[0])
                _unwritten.popleft()
        except Exception:
            # The task's work is done; a report delayed by a Redis blip must not fail (and so
            # re-run) it. It is written with the next one; the worker log has the run.
            logger.warning("could not record the run report of %s yet (%d waiting)",
                           self.name, len(_unwritten), exc_info=True)


@dataclass(frozen=True, kw_only=True)
class Capability:
    """Defaults shared by the tasks of one capability (``hms.<name>.*``)."""

    name: str
    soft_time_limit: float
    time_limit: float
    #: Exceptions that are worth a retry (transient); anything else fails at once.
    autoretry_for: tuple[type[BaseException], ...] = ()
    max_retries: int = 3
    retry_backoff: int = 2

    def __post_init__(self) -> None:
        if not 0 < self.soft_time_limit < self.time_limit:
            raise ValueError(f"capability {self.name}: need 0 < soft_time_limit < time_limit")

    def task(
        self,
        name: str,
        *,
        idempotent: bool = True,
        **options: Any,
    ) -> Callable[[Callable[..., Any]], HmsTask]:
        """Register the decorated function as the hms task ``name`` with this capability's
        defaults; ``options`` override them (any Celery task option). Returns the task."""
        if not name.startswith(f"hms.{self.name}."):
            raise ValueError(f"task {name!r} must be named hms.{self.name}.<verb>")

        def decorate(fn: Callable[..., Any]) -> HmsTask:
            from hms_tasks.celery import app

            signature_of(name, fn)  # refuse bad annotations at import time
            defaults: dict[str, Any] = {
                "name": name,
                "base": HmsTask,
                "hms_function": staticmethod(fn),
                "soft_time_limit": self.soft_time_limit,
                "time_limit": self.time_limit,
                "acks_late": idempotent,
                "reject_on_worker_lost": idempotent,
                "autoretry_for": self.autoretry_for,
                "max_retries": self.max_retries,
                "retry_backoff": self.retry_backoff,
                "retry_jitter": True,
            }
            task: HmsTask = app.task(**{**defaults, **options})(fn)
            return task

        return decorate
