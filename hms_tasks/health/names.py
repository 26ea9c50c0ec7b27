"""Celery task names of the health capability: contracts (beat entries and in-flight messages
name them). Import-light: clients and ``beat_schedule.py`` import this without Celery."""

from __future__ import annotations

__all__ = ["HEALTH_CHECK_SERVICE", "HEALTH_SWEEP"]

#: Check every instance of every registered service (beat ``health-sweep``, every 30 s).
HEALTH_SWEEP = "hms.health.sweep"
#: Check one registered service now (on demand).
HEALTH_CHECK_SERVICE = "hms.health.check_service"
