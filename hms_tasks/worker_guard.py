"""The worker's message guard: every task message is checked before Celery's strategy sees it.

Celery's strategy assumes a well-formed protocol 2 message: a body that is not a list raises
``TypeError`` in the worker's main process, the worker exits, the message goes back, and every
worker on the queue crash-loops on it. And Celery's handlers for unknown, invalid or
undecodable messages log the message body, which may quote patient data.

:class:`Consumer` (``CELERY_WORKER_CONSUMER = "hms_tasks.worker_guard:Consumer"``, the default)
is Celery's consumer with two changes. The handler it builds for task messages first checks the
envelope (see :mod:`hms_tasks.broker`), the content type, the headers, that the task is
registered, and the body's shape (``[args, kwargs, embed]``). A message that fails is recorded
in the dead-letter list (:mod:`hms_tasks.deadletter`: the reason, never the body) and acked off
the queue. Celery's own body-logging handlers are replaced the same way, and :class:`BodyFilter`
withholds the Celery and kombu log lines that quote bodies or arguments. And a warm shutdown
does not flush the closing prefork pool (:meth:`Consumer.on_close`): a task handed to a pool
process just before the SIGTERM is acked when it ends, not pushed back and run again elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from celery.worker.consumer import consumer as celery_consumer_module

from hms_tasks import deadletter
from hms_tasks.broker import Message as GuardedMessage

__all__ = ["BodyFilter", "Consumer", "install_log_filter", "message_problem"]

logger = logging.getLogger(__name__)

# The type stubs know the module's classes but not its log templates.
celery_consumer: Any = celery_consumer_module

#: Log templates of Celery and kombu that quote message bodies, headers or task arguments.
BODY_TEMPLATES = frozenset({
    celery_consumer.UNKNOWN_FORMAT,
    celery_consumer.UNKNOWN_TASK_ERROR,
    celery_consumer.INVALID_TASK_ERROR,
    celery_consumer.MESSAGE_DECODE_ERROR,
    "TaskPool: Apply %s (args:%s kwargs:%s)",  # celery.concurrency.base, DEBUG
    "Couldn't convert ETA %r to timestamp: %r. Task: %r",  # celery.worker.strategy
    "Could not restore message: %r",  # kombu.transport.redis
    "Can't decode message body: %r (type:%r encoding:%r raw:%r')",  # kombu.mixins
    "Cannot decode message: %r",  # kombu.pidbox
})


class BodyFilter(logging.Filter):
    """Rewrites a log record that would quote a message into one line that does not."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg in BODY_TEMPLATES:
            record.msg = "%s: a log line quoting message contents was withheld"
            record.args = (record.name,)
            record.exc_info = None
            record.exc_text = None
        return True


_FILTER = BodyFilter()


def install_log_filter() -> None:
    """Add :class:`BodyFilter` to every handler of the root logger (idempotent).

    Called when the worker's consumer is built, after Celery set up logging; pool children
    inherit the handlers, and so the filter, when they fork.
    """
    for handler in logging.getLogger().handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


def message_problem(message: Any, known_tasks: Mapping[str, Any]) -> str | None:
    """Why ``message`` cannot go to Celery's strategy, or None. Decodes (and so caches) the
    body: Celery's request reads the decoded payload from the same message later."""
    if isinstance(message, GuardedMessage) and message.hms_problem:
        return message.hms_problem
    problem = deadletter.header_problem(
        message.headers, content_type=message.content_type,
        content_encoding=message.content_encoding, known_tasks=known_tasks)
    if problem:
        return problem
    raw = message.body
    if not isinstance(raw, bytes | str) or not raw:
        return "body is missing"
    if len(raw) > deadletter.MAX_BODY_BYTES:
        return f"body is larger than {deadletter.MAX_BODY_BYTES} bytes"
    if isinstance(raw, bytes):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return "body is not UTF-8"
    try:
        body = message.decode()
    except Exception:
        return "body is not JSON"
    return deadletter.body_problem(body)


class Consumer(celery_consumer_module.Consumer):
    """Celery's worker consumer, with task messages checked first and refused ones
    dead-lettered instead of crashing the worker or being logged."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        install_log_filter()

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        handle = super().create_task_handler(*args, **kwargs)
        this: Any = self  # attributes the type stubs do not declare
        strategies, connection_errors = this.strategies, this.connection_errors

        def on_task_received(message: Any) -> Any:
            problem = message_problem(message, strategies)
            if problem is None:
                try:
                    return handle(message)
                except connection_errors:
                    raise
                except Exception as exc:
                    # A check above missed something Celery cannot handle: refuse the one
                    # message rather than lose the worker (and crash-loop every other).
                    problem = f"refused by Celery ({type(exc).__name__})"
            return self.dead_letter(message, problem)

        return on_task_received

    def on_close(self) -> None:
        """Celery's clean-up when the consumer closes, without flushing a pool that is
        already closing (a warm or cold shutdown).

        Celery's clean-up flushes the prefork pool: it drops every job that no child has
        confirmed taking yet, on the grounds that the broker redelivers their messages. At a
        shutdown that is wrong. The pool was closed before the consumer and drains what it
        holds, so a job already written to a child still runs to its end; but its result,
        arriving for a job the pool no longer knows, is ignored, its message is never acked,
        and kombu pushes it back onto its queue when the channel closes: the task runs
        again on another worker (a SIGTERM that lands within the millisecond between a
        job's hand-over and the child's confirmation, 6 of 11 runs of four rolling restarts
        under load). Unflushed, the draining pool reads that result and the task is acked;
        a job never written to a child does not run, and its message goes back as before.
        A consumer that closes while the pool still runs (a lost broker connection) flushes
        as Celery does.
        """
        this: Any = self  # attributes the type stubs do not declare
        pool = this.pool
        if pool is None or pool.active or not pool.flush:
            super().on_close()
            return
        # Celery's on_close flushes only a pool that has a ``flush`` (prefork's is set by
        # its start); hiding it is the one change, and the rest of the clean-up is Celery's.
        flush, pool.flush = pool.flush, None
        try:
            super().on_close()
        finally:
            pool.flush = flush

    def dead_letter(self, message: Any, reason: str) -> None:
        """Record ``message`` (never its body) in the dead-letter list and ack it."""
        info = message.delivery_info if isinstance(message.delivery_info, Mapping) else {}
        headers = message.headers if isinstance(message.headers, Mapping) else {}
        entry = deadletter.record(reason, queue=info.get("routing_key"),
                                  message_id=headers.get("id"), task=headers.get("task"))
        logger.warning("dead-lettered message %s from queue %s: %s",
                       entry["id"] or "(no plain id)", entry["queue"] or "?", reason)
        if not message.acknowledged:
            message.ack()

    # Celery's handlers for the cases the check above already refuses; they would log the body.
    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        self.dead_letter(message, f"body cannot be decoded ({type(exc).__name__})")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self.dead_letter(message, "not a task message")

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self.dead_letter(message, "unknown task")

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self.dead_letter(message, f"invalid task message ({type(exc).__name__})")
