"""hms-tasks: Celery workers that keep a Django hospital management system fast.

``celery -A hms_tasks worker`` finds :data:`app` here.
"""

from __future__ import annotations

from hms_tasks.celery import app

celery_app = app

__all__ = ["__version__", "app", "celery_app"]
__version__ = "0.1.0"
