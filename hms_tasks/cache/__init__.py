"""The tag-aware cache: a Redis cache the HMS reads from, kept warm and correct by hms-tasks.

The HMS registers what it caches, once, from its ``AppConfig.ready``::

    from hms_tasks.cache import register_kind, register_model

    register_kind("patient", build_many=build_patients, tags=lambda i: [f"patient:{i}"])
    register_model(Patient, tags=lambda p: [f"patient:{p.pk}"])

and reads through it in its views::

    from hms_tasks.cache import cached_response, get_or_build

    summary = get_or_build("patient", 42)     # from Redis, or built, stored and returned
    response = cached_response(request, "patient", 42)   # the same as JSON, with an ETag:
                                                         # 304 after one Redis round trip

and compresses responses with ``CompressionMiddleware`` (brotli or gzip by q-value).

Saves and deletes of registered models invalidate the payloads they touch after the commit;
bulk changes go through :class:`InvalidatingQuerySet` or :func:`changed`; data changed behind
the ORM's back is invalidated with :func:`invalidate_tags`. The manual is ``docs/cache.md``.

The names below are the public API (``__all__``); the modules behind them are not. They are
imported on first use, so that ``hms_tasks.cache.names`` (task names, for clients and beat)
stays free of Django, Redis and Celery. The cache backend itself is
``django.core.cache.caches[HMS_TASKS_CACHE_ALIAS]``, a :class:`TaggedRedisCache`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hms_tasks.capabilities import lazy_exports as _lazy_exports

if TYPE_CHECKING:
    from hms_tasks.cache.backend import TaggedRedisCache
    from hms_tasks.cache.changes import InvalidatingQuerySet, changed, changed_everything, flush
    from hms_tasks.cache.compression import CompressionMiddleware, negotiate
    from hms_tasks.cache.core import WarmSummary, get_or_build, get_or_build_many, warm
    from hms_tasks.cache.http import (
        NotModifiedMiddleware,
        cached_response,
        current_etag,
        etag_view,
        set_cache_control,
    )
    from hms_tasks.cache.registry import Kind, TrackedModel, kinds, register_kind
    from hms_tasks.cache.settings import CacheSettings
    from hms_tasks.cache.tags import ALL
    from hms_tasks.cache.tracking import register_model
    from hms_tasks.cache.warming import Invalidated, invalidate_tags

__all__ = [
    "ALL",
    "CacheSettings",
    "CompressionMiddleware",
    "Invalidated",
    "InvalidatingQuerySet",
    "Kind",
    "NotModifiedMiddleware",
    "TaggedRedisCache",
    "TrackedModel",
    "WarmSummary",
    "cached_response",
    "changed",
    "changed_everything",
    "current_etag",
    "etag_view",
    "flush",
    "get_or_build",
    "get_or_build_many",
    "invalidate_tags",
    "kinds",
    "negotiate",
    "register_kind",
    "register_model",
    "set_cache_control",
    "warm",
]

#: The module each public name lives in.
_HOME = {
    "ALL": "tags",
    "CacheSettings": "settings",
    "CompressionMiddleware": "compression",
    "Invalidated": "warming",
    "InvalidatingQuerySet": "changes",
    "Kind": "registry",
    "NotModifiedMiddleware": "http",
    "TaggedRedisCache": "backend",
    "TrackedModel": "registry",
    "WarmSummary": "core",
    "cached_response": "http",
    "changed": "changes",
    "changed_everything": "changes",
    "current_etag": "http",
    "etag_view": "http",
    "flush": "changes",
    "get_or_build": "core",
    "get_or_build_many": "core",
    "invalidate_tags": "warming",
    "kinds": "registry",
    "negotiate": "compression",
    "register_kind": "registry",
    "register_model": "tracking",
    "set_cache_control": "http",
    "warm": "core",
}


__getattr__ = _lazy_exports(__name__, _HOME)
