"""Django signals of the health capability."""

from __future__ import annotations

from django.dispatch import Signal

__all__ = ["breaker_state_changed"]

#: Sent when a breaker changes state, in the process whose call, trial admission or sweep
#: changed it (every process can read all changes from the ``<p>:health:events`` stream).
#: Keyword arguments: ``service`` (str), ``instance`` (str or None), ``old`` and ``new``
#: (``closed``, ``open`` or ``half_open``), ``source`` (``call`` or ``sweep``), ``epoch`` (int).
#: Sent with ``send_robust``: a failing receiver is logged, never raised into the caller.
breaker_state_changed = Signal()
