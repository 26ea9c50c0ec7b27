"""Health: sweeps of the HMS's services and circuit breakers every process shares via Redis.

The public API for HMS code::

    from hms_tasks import health

    with health.guard("ehr"):                    # or @health.guard("ehr"), async with ...
        ...                                      # ServiceUnavailable at once while open
    url = health.pick("patient", strategy="least_connections")
    with health.lease("patient") as inst:        # least connections, in-flight counted
        ...

Manual: ``docs/health.md``. Modules: :mod:`.settings` (HMS_TASKS_SERVICES and
HMS_TASKS_BREAKER_FAIL_OPEN, validated), :mod:`.registry` (the services, the allowlist),
:mod:`.checks` (async checks), :mod:`.breaker` (the Redis breakers and the guard),
:mod:`.select` (``pick`` and ``lease``), :mod:`.history` (samples and windows),
:mod:`.sweep` (the sweep and its lock), :mod:`.report` (what ``hms-tasks health`` shows),
:mod:`.cli` (the command), :mod:`.tasks` (Celery), :mod:`.names` (task names),
:mod:`.keys` (the Redis key layout), :mod:`.signals` (``breaker_state_changed``).
"""

from __future__ import annotations

from hms_tasks.errors import ServiceUnavailable, UnknownService
from hms_tasks.health.breaker import Guard, guard
from hms_tasks.health.select import Lease, lease, pick
from hms_tasks.health.signals import breaker_state_changed

__all__ = [
    "Guard",
    "Lease",
    "ServiceUnavailable",
    "UnknownService",
    "breaker_state_changed",
    "guard",
    "lease",
    "pick",
]
