"""kombu's Redis transport, guarded so that no message on a queue can crash a worker.

kombu turns each queue entry into a message inside the transport, before any Celery hook runs:
an entry that is not JSON, lacks the envelope fields, or has a body that is not valid base64
raises there, and the worker exits (the entry, already popped, is lost). This transport
subclass (``CELERY_BROKER_TRANSPORT = "hms_tasks.broker:Transport"``, set by default for
``redis://`` and ``rediss://`` broker URLs) changes only that:

- :class:`Message` checks the envelope first; a broken one becomes an empty stub message that
  carries the reason in ``hms_problem`` (never the body), so it is tracked in ``unacked`` like
  any other and the worker's guard (:mod:`hms_tasks.worker_guard`) dead-letters and acks it;
- base64 bodies are decoded strictly (kombu's decoder skips invalid characters);
- an entry that is not JSON at all is dead-lettered where kombu parses it.

Everything else (publishing, acks, restores, visibility timeout) is kombu's own.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from queue import Empty
from typing import Any
from urllib.parse import urlsplit

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from hms_tasks import deadletter

__all__ = ["TRANSPORT", "Channel", "Message", "Transport", "transport_for"]

#: The value of ``broker_transport`` that selects this transport.
TRANSPORT = "hms_tasks.broker:Transport"


def transport_for(broker_url: str) -> str | None:
    """This transport for a Redis broker URL; None (kombu's choice) for any other scheme."""
    return TRANSPORT if urlsplit(broker_url).scheme in ("redis", "rediss") else None


def _stub(payload: Any) -> dict[str, Any]:
    """An empty message with the original's delivery tag and routing, when those are usable."""
    props = payload.get("properties") if isinstance(payload, dict) else None
    props = props if isinstance(props, dict) else {}
    info = props.get("delivery_info")
    info = info if isinstance(info, dict) else {}
    tag = props.get("delivery_tag")
    return {
        "body": None, "headers": {}, "content-type": None, "content-encoding": None,
        "properties": {
            "delivery_tag": tag if isinstance(tag, str) else uuid.uuid4().hex,
            "delivery_info": {
                k: v if isinstance(v := info.get(k), str) else ""
                for k in ("exchange", "routing_key")
            },
        },
    }


class Message(virtual.Message):
    """kombu's message, built from a stub when the envelope or its body does not decode."""

    #: Why the message cannot be delivered to Celery, or None.
    hms_problem: str | None = None

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        reason = deadletter.envelope_problem(payload)
        if reason is None:
            try:
                super().__init__(payload, channel=channel, **kwargs)
                return
            except (ValueError, TypeError, binascii.Error):
                reason = "body does not decode with its body_encoding"
        super().__init__(_stub(payload), channel=channel, **kwargs)
        self.hms_problem = reason


class Channel(kombu_redis.Channel):
    """kombu's Redis channel with :class:`Message` and a strict base64 decoder."""

    Message = Message

    def decode_body(self, body: Any, encoding: str | None = None) -> Any:
        if encoding and encoding.lower() == "base64":
            return base64.b64decode(body, validate=True)
        return super().decode_body(body, encoding)

    # kombu parses the queue entry (JSON) inside these two methods, with no hook before the
    # message exists; a ValueError out of them is that parse (JSONDecodeError, or
    # UnicodeDecodeError for bytes that are not UTF-8): everything after the parse is guarded
    # by Message and the worker's guard, and Redis errors are not ValueErrors. The entry is
    # already popped, so it is dead-lettered here.
    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)  # type: ignore[misc]
        except ValueError:
            deadletter.record("envelope is not JSON")
            return True

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        try:
            return super()._get(queue)
        except ValueError:
            deadletter.record("envelope is not JSON", queue=queue)
            raise Empty() from None


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the guarded :class:`Channel`."""

    Channel = Channel
