"""The smallest Django settings a real HMS could run hms-tasks with: no demo app anywhere.

Library tests that need no demo run processes on these (tests/test_library_alone.py). Redis
comes from ``REDIS_URL``, which the test sets to the session's server.
"""

from __future__ import annotations

import os

SECRET_KEY = "minimal-settings-for-tests"
INSTALLED_APPS = ["django.contrib.contenttypes", "hms_tasks"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3",
                         "NAME": os.environ["MINIMAL_DB"]}}
USE_TZ = True
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
