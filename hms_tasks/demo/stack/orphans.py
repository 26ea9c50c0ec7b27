"""Children that die with the supervisor, even when it is SIGKILLed.

Each child runs in its own session (so a Ctrl-C reaches only the supervisor, which stops them in
order), which also means nothing stops them if the supervisor dies without cleaning up: they
would keep the API and Flower ports, and the next ``make run`` would fail. Linux's parent-death
signal (``prctl(PR_SET_PDEATHSIG)``) closes that: the kernel signals the child when the thread
that started it exits, however it exits. The setting survives ``exec`` but not ``fork``; the
grandchildren are covered by their parents: Celery's prefork pool sets SIGKILL on its processes
itself, and gunicorn's master, on the SIGQUIT it gets, stops its workers (quick shutdown).

Elsewhere than Linux this is a no-op (the supervisor's own stop path still works).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

__all__ = ["SUPPORTED", "preexec_die_with"]

#: Whether the platform has a parent-death signal.
SUPPORTED = sys.platform.startswith("linux")

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[[int, int], int] | None:
    if not SUPPORTED:
        return None
    prctl: Callable[[int, int], int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


# Resolved once, in the parent: a forked child must not load a library (dlopen takes locks that
# another thread of the parent may have held at fork time). billiard's set_pdeathsig, which
# Celery uses in its pool processes, loads libc on each call: fine there, not in a preexec_fn.
_PRCTL = _load_prctl()


def preexec_die_with(parent: int, signum: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets ``signum`` when ``parent``
    (the process starting it, from its main thread) exits. ``None`` where unsupported.

    It only makes one system call through a function resolved beforehand, which is what a
    ``preexec_fn`` may safely do in a process with threads.
    """
    prctl = _PRCTL
    if prctl is None:
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signum)
        # The parent died between fork and prctl: the signal would never come.
        if os.getppid() != parent:
            os.kill(os.getpid(), signum)

    return preexec
