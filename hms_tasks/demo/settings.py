"""Django settings of the demo HMS, the embedded default of hms-tasks.

Environment variables feed them: ``REDIS_URL`` (broker, results, cache), ``DATABASE_URL``
(default: SQLite under ``$HMS_TASKS_HOME``), ``HMS_DB_POOL`` (``0``: no connection pool on
PostgreSQL) with ``HMS_DB_POOL_MIN_SIZE``, ``HMS_DB_POOL_MAX_SIZE`` and ``HMS_DB_POOL_TIMEOUT``,
``HMS_TASKS_HOME``, ``DJANGO_SECRET_KEY``,
``DJANGO_DEBUG``. A real HMS keeps its own settings and adds ``"hms_tasks"`` to INSTALLED_APPS.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import dj_database_url

from hms_tasks.conf import DEFAULT_REDIS_URL, home

# The core falls back to these settings when DJANGO_SETTINGS_MODULE is unset, and then marks it
# in HMS_TASKS_SETTINGS_DEFAULTED (inherited by child processes, which fall back alike). A real
# HMS that forgot the variable would otherwise run silently on a demo SQLite file: every
# process that loads these settings by default says so, once (this module loads once).
_defaulted = os.environ.get("HMS_TASKS_SETTINGS_DEFAULTED")
if _defaulted and _defaulted == os.environ.get("DJANGO_SETTINGS_MODULE"):
    logging.getLogger(__name__).warning(
        "DJANGO_SETTINGS_MODULE is not set: running on the demo HMS settings (%s); set "
        "DJANGO_SETTINGS_MODULE to your HMS's settings module",
        __name__,
    )

HOME = home()


def _env_number(name: str, default: int, low: int, high: int) -> int:
    """Whole number from the environment; the error names the variable, never its value."""
    text = os.environ.get(name, "")
    if not text:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured(f"{name} must be a whole number from {low} to {high}")
    return int(text)

REDIS_URL = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
# Redis behind Sentinel: REDIS_SENTINELS (host:port,host:port,...) and REDIS_SENTINEL_MASTER
# (default mymaster) take precedence over REDIS_URL's host and port: every client asks the
# sentinels for the master, and REDIS_URL gives only TLS, credentials and the database.
# REDIS_SENTINEL_PASSWORD is the sentinels' own requirepass, if any; REDIS_SENTINEL_TLS=1 talks
# to the sentinels over TLS too, verified with REDIS_URL's ssl_* query (docs/configuration.md).
REDIS_SENTINELS = [s.strip() for s in os.environ.get("REDIS_SENTINELS", "").split(",")
                   if s.strip()]
if REDIS_SENTINELS:
    HMS_TASKS_REDIS_SENTINELS = REDIS_SENTINELS
    HMS_TASKS_REDIS_SENTINEL_MASTER = os.environ.get("REDIS_SENTINEL_MASTER") or "mymaster"
    HMS_TASKS_REDIS_SENTINEL_PASSWORD = os.environ.get("REDIS_SENTINEL_PASSWORD") or None
    HMS_TASKS_REDIS_SENTINEL_TLS = os.environ.get("REDIS_SENTINEL_TLS", "") == "1"

# The demo never serves real patients; a deployment sets DJANGO_SECRET_KEY.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or "hms-tasks-demo-insecure-key"
DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]", *filter(None, os.environ.get(
    "DJANGO_ALLOWED_HOSTS", "").split(","))]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.staticfiles",
    "hms_tasks",
    "hms_tasks.demo.apps.DemoHmsConfig",
]
MIDDLEWARE = [
    # First, so it times the whole stack: feeds the API p95 and error-rate alert rules.
    "hms_tasks.metrics.middleware.TimingMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # 304s of the cache-backed routes below (HMS_TASKS_CACHE_NOT_MODIFIED_ROUTES) before URL
    # resolution and the rest of the stack. A real HMS puts it right after its authentication
    # middleware; the demo API has none.
    "hms_tasks.cache.NotModifiedMiddleware",
    # brotli or gzip by Accept-Encoding; above everything that writes the body.
    "hms_tasks.cache.CompressionMiddleware",
    "django.middleware.common.CommonMiddleware",
    # Live N+1 sampling (docs/queries.md): 1 % of requests, below the 3 % overhead budget.
    "hms_tasks.queries.middleware.QuerySamplingMiddleware",
]
ROOT_URLCONF = "hms_tasks.demo.urls"
# The routes NotModifiedMiddleware answers 304s for (their views are marked etag_view), and
# who may have them: anyone, as anyone may GET the demo's API (docs/cache.md).
HMS_TASKS_CACHE_NOT_MODIFIED_ROUTES = {
    "/api/patients/<id>/": "patient",
    "/api/practitioners/<id>/appointments/today/": "schedule",
    "/api/departments/<id>/census/": "census",
}
HMS_TASKS_CACHE_NOT_MODIFIED_ALLOW = "hms_tasks.demo.api.may_revalidate"
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True,
              "OPTIONS": {}}]

# The status page's assets: `collectstatic` writes them with content hashes in their names
# (ManifestStaticFilesStorage) under STATIC_ROOT; /static/ serves them with immutable caching
# (hms_tasks.assets.static_view), and hms.assets.precompress writes their .br and .gz.
STATIC_URL = "/static/"
STATIC_ROOT = os.environ.get("HMS_TASKS_STATIC_ROOT") or str(HOME / "static")
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.ManifestStaticFilesStorage"},
}
# Budgets of the status page's assets (bytes after brotli): hms.assets.analyze checks them.
HMS_TASKS_ASSETS_BUDGETS = {"demo/status.js": 4096, "demo/status.css": 2048}
WSGI_APPLICATION = "hms_tasks.demo.wsgi.application"

_sqlite_path = HOME / "hms.sqlite3"
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{_sqlite_path}",
        conn_max_age=60,
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the API read while a worker or the seeder writes; IMMEDIATE avoids the
    # "database is locked" upgrade deadlock between two writers.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
    # One test database per test run (a file, so worker threads share it): two runs in one
    # checkout must not delete each other's database.
    DATABASES["default"]["TEST"] = {"NAME": str(HOME / f"test-hms-{os.getpid()}.sqlite3")}

if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Likewise one test database per run: two runs against one server must not drop each
    # other's.
    DATABASES["default"]["TEST"] = {"NAME": f"test_{DATABASES['default']['NAME']}_{os.getpid()}"}
    # Django's own psycopg pool, one per process (HMS_DB_POOL=0 turns it off: persistent
    # connections then, as on SQLite before). A gunicorn sync worker or a prefork child runs
    # one request or task at a time, so a few connections per process suffice; threaded
    # workers need up to one per thread (a Django thread keeps its connection until it closes
    # it): 10 covers the demo's threaded processes (the test suite runs 8 database threads in
    # one process; at 4 they waited out the pool's timeout). ``timeout``: seconds a request
    # waits for a connection before PoolTimeout. Watched by hms-tasks (`hms-tasks db`,
    # docs/queries.md).
    if os.environ.get("HMS_DB_POOL", "1") != "0":
        DATABASES["default"]["CONN_MAX_AGE"] = 0  # the pool keeps the connections instead
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            "min_size": _env_number("HMS_DB_POOL_MIN_SIZE", 1, 0, 100),
            "max_size": _env_number("HMS_DB_POOL_MAX_SIZE", 10, 1, 100),
            "timeout": float(_env_number("HMS_DB_POOL_TIMEOUT", 10, 1, 300)),
        }

CACHES: dict[str, dict[str, Any]] = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "demo",
    },
    # The tag-aware cache hms-tasks keeps warm and correct (HMS_TASKS_CACHE_ALIAS).
    "hms": {
        "BACKEND": "hms_tasks.cache.TaggedRedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "hms-cache",
    },
}
if REDIS_SENTINELS:
    # Behind sentinels, the master they name (the tag cache sets this itself).
    CACHES["default"]["OPTIONS"] = {"pool_class": "hms_tasks.store.SentinelPool"}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = os.environ.get("TZ_NAME", "UTC")
LANGUAGE_CODE = "en-us"

# The API `hms-tasks run` serves (it sets HMS_DEMO_API_URL for every process it starts).
DEMO_API_URL = os.environ.get("HMS_DEMO_API_URL") or "http://127.0.0.1:8000"

# Health: what the demo runs on, so a fresh demo is green and stopping a part of it opens its
# breaker (docs/health.md walks through it). A real HMS lists its own services.
HMS_TASKS_SERVICES = {
    "api": {"instances": [DEMO_API_URL],
            "check": {"type": "http", "path": "/healthz", "json_field": "status",
                      "json_value": "ok"}},
    "database": {"instances": ["default"], "check": {"type": "database"}},
}
if REDIS_URL.startswith(("redis://", "rediss://")) and not REDIS_SENTINELS:
    # A redis check takes no unix:// socket; behind sentinels REDIS_URL names no server.
    HMS_TASKS_SERVICES["redis"] = {"instances": [REDIS_URL], "check": {"type": "redis"}}

# Load tests: the demo API is the one target, and the nightly smoke test of it is on.
HMS_TASKS_LOADTEST_TARGETS = {"demo": DEMO_API_URL}
HMS_TASKS_LOADTEST_TESTS = {
    "smoke": {
        "target": "demo", "scenario": "demo", "users": 10, "ramp_up": 5, "duration": 60,
        "shards": 1,
        "thresholds": {"p95_ms": 1000, "error_rate": 0.01, "min_rps": 2},
    },
}
HMS_TASKS_LOADTEST_NIGHTLY = "smoke"

# Queries: the share of API requests the live N+1 sampling middleware records.
HMS_TASKS_QUERIES_SAMPLE_RATE = 0.01

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "INFO"}},
}
