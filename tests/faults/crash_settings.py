"""Settings of the Redis crash fault test's worker: the minimal ones, with a report history
long enough to hold a run report of every task the test publishes."""

from __future__ import annotations

from tests.minimal_settings import *  # noqa: F403

HMS_TASKS_REPORT_HISTORY = 5000
