"""The cache's settings, ``HMS_TASKS_CACHE_*``: defaults and validation in one place.

Read them with :func:`get` (validated once, cached, reset on Django's ``setting_changed``). A
wrong value raises :class:`~hms_tasks.errors.ConfigurationError` naming the setting and what it
allows, never the value (an encryption key is a secret).
"""

from __future__ import annotations

import re
from typing import Annotated

from cryptography.fernet import Fernet
from pydantic import AfterValidator, BeforeValidator, Field

from hms_tasks import conf

__all__ = ["DEFAULT_CACHE_CONTROL", "DEFAULT_TTL", "CacheSettings", "get"]

#: Cache TTLs of the product brief, in seconds; HMS_TASKS_CACHE_TTL overrides kinds one by one.
DEFAULT_TTL: dict[str, int] = {
    "patient": 3600, "encounter": 1800, "schedule": 900, "census": 300, "default": 600,
}

Seconds = Annotated[int, Field(ge=1, le=30 * 86400)]

#: ``Cache-Control`` of cache-backed responses, per kind (kinds not listed: ``default``):
#: browsers may keep a copy but must revalidate it every time (a 304 is cheap, see
#: ``docs/cache.md``), and shared caches must not keep it at all.
DEFAULT_CACHE_CONTROL: dict[str, str] = {"default": "private, no-cache"}

_DIRECTIVE_RE = re.compile(r"^(private|no-cache|no-store|must-revalidate|max-age=[0-9]{1,8})$")


def _cache_control(value: str) -> str:
    directives = [d.strip().lower() for d in value.split(",")]
    if not all(_DIRECTIVE_RE.match(d) for d in directives):
        # Never "public" or "s-maxage": payloads are patient data, no shared cache may keep
        # them. Hashed static assets set their own headers.
        raise ValueError("must be directives among private, no-cache, no-store,"
                         " must-revalidate, max-age=<seconds> (never public or s-maxage)")
    if "private" not in directives and "no-store" not in directives:
        raise ValueError("must include private or no-store (no shared cache may keep"
                         " patient data)")
    return ", ".join(dict.fromkeys(directives))


#: What a route of ``HMS_TASKS_CACHE_NOT_MODIFIED_ROUTES`` may hold besides its one ``<id>``.
_ROUTE_RE = re.compile(r"^/[A-Za-z0-9_.~/-]*<id>[A-Za-z0-9_.~/-]*$")


def _route(value: str) -> str:
    if not _ROUTE_RE.match(value) or value.count("<id>") != 1:
        raise ValueError("a route is a path from / with one <id> where the payload's id is"
                         " (letters, digits, _ . ~ - / besides it), such as /api/patients/<id>/")
    return value


def _fernet_key(key: str) -> str:
    try:
        Fernet(key)
    except (ValueError, TypeError):
        # Never quote the key: it is a secret.
        raise ValueError("is not a Fernet key (32 url-safe base64-encoded bytes; make one with"
                         " Fernet.generate_key())") from None
    return key


def _key_list(value: object) -> object:
    # Settings modules write lists. One string is the likely slip (a key, not a list of keys).
    if isinstance(value, (str, bytes)):
        raise ValueError("must be a list of Fernet keys, not one string")
    return tuple(value) if isinstance(value, list) else value


class CacheSettings(conf.Settings):
    """The ``HMS_TASKS_CACHE_*`` settings: field ``cache_foo`` is ``HMS_TASKS_CACHE_FOO``."""

    merged = ("cache_ttl", "cache_control")

    #: Alias in ``CACHES`` of the tag-aware cache (a ``TaggedRedisCache``).
    cache_alias: Annotated[str, Field(min_length=1)] = "hms"
    #: Seconds a cached payload lives, per kind (kinds not listed: ``default``), from 1 to
    #: 30 days; merged over :data:`DEFAULT_TTL` kind by kind.
    cache_ttl: dict[str, Seconds] = Field(default_factory=lambda: dict(DEFAULT_TTL))
    #: Fernet keys (url-safe base64, 32 bytes) encrypting cached values; the first encrypts,
    #: all decrypt (rotation). Empty: values are stored in the clear.
    cache_encryption_keys: Annotated[
        tuple[Annotated[str, AfterValidator(_fernet_key)], ...],
        BeforeValidator(_key_list),
    ] = ()
    #: How long a read that missed waits for another process already building the same key
    #: before it reads the database itself (milliseconds).
    cache_wait_ms: Annotated[int, Field(ge=0, le=10_000)] = 100
    #: Lease of a key's builder (milliseconds); a fill after it expired is refused.
    cache_lease_ms: Annotated[int, Field(ge=100, le=600_000)] = 5000
    #: A key read this often recently (reads decay by half at every ``warm_hot``) is hot:
    #: re-warmed right after an invalidation.
    cache_hot_score: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 3.0
    #: Distinct tags a process buffers while Redis or the broker is down; beyond this it
    #: invalidates the whole cache once they are back, rather than grow without bound.
    cache_max_pending_tags: Annotated[int, Field(ge=100, le=10_000_000)] = 100_000

    #: ``Cache-Control`` of cache-backed responses per kind (kinds not listed: ``default``),
    #: merged over :data:`DEFAULT_CACHE_CONTROL`: ``private``, ``no-cache``, ``no-store``,
    #: ``must-revalidate``, ``max-age=N``; ``private`` or ``no-store`` required, ``public``
    #: refused.
    cache_control: dict[str, Annotated[str, AfterValidator(_cache_control)]] = Field(
        default_factory=lambda: dict(DEFAULT_CACHE_CONTROL))
    #: Responses smaller than this (bytes) go out uncompressed: under one TCP segment the
    #: saving buys no round trip and costs a compression.
    cache_compress_min_bytes: Annotated[int, Field(ge=0, le=10_000_000)] = 1024
    #: Brotli quality of compressed responses (0-11). 5: each level up to it saves at least
    #: 10 bytes per extra CPU microsecond on the demo's pages, the next ones far less
    #: (``python -m bench responses``; the table is in bench/RESULTS.md).
    cache_brotli_quality: Annotated[int, Field(ge=0, le=11)] = 5
    #: gzip level of compressed responses (1-9); 6 by the same rule.
    cache_gzip_level: Annotated[int, Field(ge=1, le=9)] = 6

    #: Routes whose conditional GETs :class:`~hms_tasks.cache.http.NotModifiedMiddleware`
    #: answers before URL resolution and the view: path, ``<id>`` standing for the id, to the
    #: kind of payload its view serves (checked against the URLconf when the middleware loads).
    cache_not_modified_routes: dict[Annotated[str, AfterValidator(_route)],
                                    Annotated[str, Field(min_length=1, max_length=100)]] = \
        Field(default_factory=dict)
    #: Dotted path of ``allow(request, kind, id) -> bool``: whether the middleware may answer
    #: this request's 304 early (False: the request goes the full way, through the view). The
    #: default wants ``request.user.is_authenticated`` from the HMS's authentication
    #: middleware, placed above it.
    cache_not_modified_allow: Annotated[str, Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$", max_length=200)] = \
        "hms_tasks.cache.http.authenticated"

    def ttl(self, kind: str) -> int:
        """Seconds a payload of ``kind`` lives."""
        return self.cache_ttl.get(kind, self.cache_ttl.get("default", DEFAULT_TTL["default"]))

    def control(self, kind: str) -> str:
        """``Cache-Control`` of responses carrying a payload of ``kind``."""
        return self.cache_control.get(
            kind, self.cache_control.get("default", DEFAULT_CACHE_CONTROL["default"]))


get = conf.section(CacheSettings)
