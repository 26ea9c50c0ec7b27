"""Distributed load tests: Locust shards dispatched as Celery tasks, merged exactly, judged
against SLOs.

This package never imports Locust or gevent: importing Locust monkey-patches the process with
gevent, which must never happen inside a Celery worker or a test process. Locust only runs in
a subprocess (:mod:`hms_tasks.loadtest.runner`, started by each shard). Modules:

- :mod:`~hms_tasks.loadtest.names`: the task names (import-light);
- :mod:`~hms_tasks.loadtest.settings`: the ``HMS_TASKS_LOADTEST_*`` settings;
- :mod:`~hms_tasks.loadtest.spec`: test definitions (pydantic models) and their checks;
- :mod:`~hms_tasks.loadtest.stats`: response-time histograms and the exact merge;
- :mod:`~hms_tasks.loadtest.keys`: the Redis layout of runs, shards and reports;
- :mod:`~hms_tasks.loadtest.capacity`: live worker processes consuming ``hms.loadtest``;
- :mod:`~hms_tasks.loadtest.orchestrate`: start, abort, status and merge of a run;
- :mod:`~hms_tasks.loadtest.shard`: one shard: the runner subprocess and its supervision;
- :mod:`~hms_tasks.loadtest.report`: verdicts, regressions and the HTML report;
- :mod:`~hms_tasks.loadtest.text`: what the ``hms-tasks loadtest`` commands print and read;
- :mod:`~hms_tasks.loadtest.runner`: the load generator, run as a subprocess (it imports
  Locust inside its ``main`` only);
- :mod:`~hms_tasks.loadtest.tasks`: the Celery tasks;
- :mod:`~hms_tasks.loadtest.cli`: ``hms-tasks loadtest``.

The public names below load their modules on first use, so that the runner subprocess (which
imports this package) stays free of Celery, Django and pydantic. The manual is
``docs/loadtest.md``.

``locustfiles/demo_api.py`` is the shipped scenario of the demo HMS API: package data, not a
module (its directory has no ``__init__.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hms_tasks.capabilities import lazy_exports as _lazy_exports

if TYPE_CHECKING:
    from hms_tasks.loadtest.orchestrate import abort_run, merge_run, start_run, status
    from hms_tasks.loadtest.spec import LoadTestSpec, Thresholds, configured, parse

__all__ = ["LoadTestSpec", "Thresholds", "abort_run", "configured", "merge_run", "parse",
           "start_run", "status"]

_HOME = {"LoadTestSpec": "spec", "Thresholds": "spec", "configured": "spec", "parse": "spec",
         "abort_run": "orchestrate", "merge_run": "orchestrate", "start_run": "orchestrate",
         "status": "orchestrate"}


__getattr__ = _lazy_exports(__name__, _HOME)
