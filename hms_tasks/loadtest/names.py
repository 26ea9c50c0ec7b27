"""Celery task names of load tests (import-light: clients and beat import it)."""

from __future__ import annotations

__all__ = ["MERGE", "RUN", "SHARD"]

RUN = "hms.loadtest.run"
SHARD = "hms.loadtest.shard"
MERGE = "hms.loadtest.merge"
