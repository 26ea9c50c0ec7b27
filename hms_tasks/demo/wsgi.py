"""WSGI entry point of the demo HMS (``gunicorn hms_tasks.demo.wsgi``)."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

# setdefault: a deployment that points DJANGO_SETTINGS_MODULE elsewhere keeps its choice.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hms_tasks.demo.settings")

application = get_wsgi_application()
