"""hms-tasks: Celery workers that keep a Django hospital management system fast.

``celery -A hms_tasks worker`` finds :data:`app` here. The app is created on first access, so
``import hms_tasks.names`` (task names for clients) stays free of Celery and Django.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

    app: Celery
    celery_app: Celery

__all__ = ["__version__", "app", "celery_app"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("app", "celery_app"):
        from hms_tasks.celery import app

        return app
    raise AttributeError(f"module 'hms_tasks' has no attribute {name!r}")
