"""HTTP responses of cached payloads: ETags from generations, 304s without a build.

A view that serves one payload of a registered kind answers through :func:`cached_response`::

    from hms_tasks.cache import cached_response

    def patient(request, patient_id):
        response = cached_response(request, "patient", patient_id)
        return response if response is not None else JsonResponse({...}, status=404)

It answers ``200`` with the payload as JSON, an ``ETag``, ``Cache-Control`` (per kind, from
``HMS_TASKS_CACHE_CONTROL``) and ``Vary: Accept-Encoding``; or ``304`` with the same headers and
no body when ``If-None-Match`` holds the current ETag; or None when there is no such row.

The ETag is a hash of the payload's cache key (which carries the kind's version and, for a
kind keyed by date, the date) and the current generation of each of its tags. Every committed
write that invalidates the payload gives one of those tags a new generation, so it changes the
ETag; so does a new day, or invalidating ``all``. Nothing in it is patient data: the key's id
and the random generation tokens go into a hash.

What a 304 costs: one Redis round trip (an ``MGET`` of the generation keys), no database
query, no payload read or build, no JSON. What a 200 costs: what :func:`get_or_build` does
(one round trip on a hit), whose read also returns the generations the payload was stored
under (on a miss: those read before the build), so the ETag sent with a body is never newer
than the body (a write in between only costs the client one more 200).

The response must be a function of the payload alone: the ETag does not cover query
parameters or the user. A view whose output depends on them must not use this (or must
vary the key).

:class:`NotModifiedMiddleware` answers the same 304s before URL resolution and the view, for
routes listed in ``HMS_TASKS_CACHE_NOT_MODIFIED_ROUTES`` whose views are marked
:func:`etag_view`, and only for requests ``HMS_TASKS_CACHE_NOT_MODIFIED_ALLOW`` allows (by
default, an authenticated ``request.user``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import redis
from django.core.exceptions import MiddlewareNotUsed
from django.http import HttpRequest, HttpResponse, HttpResponseNotModified, JsonResponse
from django.http.response import HttpResponseBase
from django.urls import Resolver404, resolve
from django.utils.http import parse_etags
from django.utils.module_loading import import_string

from hms_tasks.cache import settings
from hms_tasks.cache.backend import TaggedRedisCache
from hms_tasks.cache.core import backend, check_ids, read_through
from hms_tasks.cache.registry import get_kind
from hms_tasks.cache.tags import ALL
from hms_tasks.errors import ConfigurationError, InvalidArguments

__all__ = [
    "NotModifiedMiddleware",
    "authenticated",
    "cached_response",
    "current_etag",
    "etag_of",
    "etag_view",
    "set_cache_control",
]

R = TypeVar("R", bound=HttpResponseBase)
V = TypeVar("V", bound=Callable[..., Any])
# Longer If-None-Match headers are not parsed (no client keeps that many versions).
_MAX_IF_NONE_MATCH = 4096
# Largest id a BigAutoField holds; a larger one in a path goes the full way (to its 404).
_MAX_ID = 2**63 - 1


def etag_of(made_key: str, tags: Sequence[str], generations: Sequence[str]) -> str:
    """The (weak) ETag of the payload stored at ``made_key`` under ``tags`` at
    ``generations``. Weak: it names the payload, which goes out in several encodings."""
    h = hashlib.blake2b(made_key.encode(), digest_size=16)
    for tag, gen in zip(tags, generations, strict=True):
        h.update(f"\0{tag}={gen}".encode())
    return f'W/"{h.hexdigest()}"'


def _target(kind: str, id_: int) -> tuple[TaggedRedisCache, str, list[str]]:
    """The backend (looked up once per request), the payload's made key and its tags."""
    k = get_kind(kind)
    if type(id_) is not int or id_ <= 0:
        check_ids([id_], argument="id")  # raises, naming the argument
    be = backend()
    return be, be.make_key(k.key(id_)), [ALL, *k.tags(id_)]


def _read_generations(be: TaggedRedisCache, tags: Sequence[str],
                      meanwhile: Callable[[], object] | None = None) -> list[str] | None:
    """The tags' current generations in one ``MGET``; None if one is missing (nothing was
    ever cached under it, or it expired) or Redis is unreachable. Always the primary: a
    lagging replica's generations would answer 304 for a changed payload. ``meanwhile``: see
    ``TaggedRedisCache.current_generations``."""
    try:
        gens = be.current_generations(tags, meanwhile=meanwhile)
    except redis.RedisError:
        return None
    return None if None in gens else cast(list[str], gens)


def current_etag(kind: str, id_: int) -> str | None:
    """The ETag a response of ``kind`` ``id_`` would carry now (one Redis round trip), or
    None if there is none yet (see :func:`_read_generations`)."""
    be, made, tags = _target(kind, id_)
    gens = _read_generations(be, tags)
    return None if gens is None else etag_of(made, tags, gens)


def set_cache_control(response: R, kind: str) -> R:
    """Set ``Cache-Control`` of a response carrying data of ``kind`` (from
    ``HMS_TASKS_CACHE_CONTROL``), replacing any the view set."""
    response["Cache-Control"] = settings.get().control(kind)
    return response


def _matches(if_none_match: str, etag: str) -> bool:
    # Weak comparison (RFC 9110 13.1.2): W/ does not matter.
    opaque = etag.removeprefix("W/")
    if if_none_match in (etag, opaque):
        return True  # what a client sends back, without parsing a list
    return any(t.removeprefix("W/") == opaque for t in parse_etags(if_none_match))


def _headers(response: R, kind: str, etag: str | None) -> R:
    """Headers of a response made here (it has no Vary yet)."""
    if etag is not None:
        response["ETag"] = etag
    set_cache_control(response, kind)
    # A 304 carries the Vary its 200 would (RFC 9110 15.4.5); the 200 is usually compressed.
    response["Vary"] = "Accept-Encoding"
    return response


def _not_modified(be: TaggedRedisCache, kind: str, made: str, tags: Sequence[str],
                  wanted: str) -> HttpResponseNotModified | None:
    """The 304 if ``wanted`` (If-None-Match) holds the payload's current ETag: one round trip
    reading the generations, which is also why no generation is ever kept in the process (a
    client's ETag must stop matching as soon as a write commits)."""
    # The response is made while the generations are on their way (it costs a few us; when
    # the ETag does not match, it is dropped).
    made_304: list[HttpResponseNotModified] = []
    gens = _read_generations(be, tags, lambda: made_304.append(
        _headers(HttpResponseNotModified(), kind, None)))
    if gens is None:
        return None
    current = etag_of(made, tags, gens)
    if not _matches(wanted, current):
        return None
    response = made_304[0]
    response["ETag"] = current
    return response


def cached_response(request: HttpRequest, kind: str, id_: int) -> HttpResponse | None:
    """The payload of ``kind`` ``id_`` as a JSON response with its ETag, or ``304 Not
    Modified`` when ``If-None-Match`` holds that ETag; None when the row does not exist.

    With a current ``If-None-Match``: one Redis round trip (``MGET`` of the generations),
    nothing else. Otherwise the payload through :func:`~hms_tasks.cache.core.read_through`
    (one round trip on a hit), whose generations make the ETag. If Redis is down the payload
    comes from the database, without an ETag.
    """
    be, made, tags = _target(kind, id_)
    wanted = request.headers.get("If-None-Match")
    if wanted is not None and len(wanted) > _MAX_IF_NONE_MATCH:
        wanted = None
    if wanted:
        not_modified = _not_modified(be, kind, made, tags, wanted)
        if not_modified is not None:
            return not_modified
    # One round trip on a hit: the read returns the generations the payload was stored under.
    payload, stored = read_through(kind, id_)
    if payload is None:
        return None
    etag = None if stored is None else etag_of(made, tags, stored)
    if wanted is not None and etag is not None and parse_etags(wanted) == ["*"]:
        return _headers(HttpResponseNotModified(), kind, etag)
    return _headers(JsonResponse(payload), kind, etag)


# -- 304s before the view ----------------------------------------------------------------------


def etag_view(kind: str) -> Callable[[V], V]:
    """Mark a view that answers a GET without a query string with
    ``cached_response(request, kind, id)``, ``id`` being its URL's one (integer) variable.
    :class:`NotModifiedMiddleware` answers a route's 304s early only if its view is so marked
    for that kind. Put the mark under decorators that use ``functools.wraps`` (which copies
    it)."""

    def mark(view: V) -> V:
        view.etag_kind = kind  # type: ignore[attr-defined]
        return view

    return mark


def authenticated(request: HttpRequest, kind: str, id_: int) -> bool:
    """The default ``HMS_TASKS_CACHE_NOT_MODIFIED_ALLOW``: ``request.user.is_authenticated``,
    set by the HMS's authentication middleware above :class:`NotModifiedMiddleware`. Without
    a ``request.user`` (no such middleware ran) nothing is answered early."""
    return getattr(getattr(request, "user", None), "is_authenticated", False) is True


_SETTING = "HMS_TASKS_CACHE_NOT_MODIFIED_ROUTES"


def _route_regex(route: str) -> re.Pattern[str]:
    before, _, after = route.partition("<id>")
    return re.compile(re.escape(before) + "([1-9][0-9]{0,18})" + re.escape(after))


def _check_route(route: str, kind: str) -> None:
    """The route must resolve (id 1 standing for any id) to a view marked :func:`etag_view`
    of ``kind``, with the id as its only argument: otherwise the middleware would answer for
    a URL whose view serves something else (or checks something it does not)."""
    where = f"{_SETTING}[{route!r}]"
    try:
        get_kind(kind)
    except InvalidArguments:
        raise ConfigurationError(f"{where}: not a registered kind") from None
    try:
        match = resolve(route.replace("<id>", "1"))
    except Resolver404:
        raise ConfigurationError(f"{where}: ROOT_URLCONF resolves it to no view") from None
    if getattr(match.func, "etag_kind", None) != kind:
        raise ConfigurationError(
            f"{where}: its view is not marked etag_view({kind!r}) (hms_tasks.cache.http)")
    if [*match.args, *match.kwargs.values()] != [1]:
        raise ConfigurationError(f"{where}: <id> must be the route's one variable, an int")


class NotModifiedMiddleware:
    """Answers a conditional GET of a registered cache-backed route with ``304 Not Modified``
    before URL resolution, the middleware below it and the view: after one Redis round trip,
    as :func:`cached_response` does, with the same headers.

    Put it right after the HMS's authentication middleware (below anything that must see
    every request). It answers only a GET or HEAD that

    - has an ``If-None-Match`` and no query string (the view checks parameters: with any, the
      request goes the full way),
    - matches a route of ``HMS_TASKS_CACHE_NOT_MODIFIED_ROUTES`` (``"/api/patients/<id>/":
      "patient"``; ``request.urlconf`` unset, as the routes are checked against
      ``ROOT_URLCONF``),
    - is allowed by ``HMS_TASKS_CACHE_NOT_MODIFIED_ALLOW`` (default :func:`authenticated`),
    - and holds the payload's current ETag, read from Redis for this request.

    It validates the ``Host`` header as ``CommonMiddleware`` does (``ALLOWED_HOSTS``), so it
    may sit above that one. Anything else goes on down the stack unchanged (a header lookup
    and a regex per route cost it).
    Without routes Django leaves it out of the stack. When it loads it checks each route
    against the URLconf (see :func:`etag_view`) and raises
    :class:`~hms_tasks.errors.ConfigurationError` naming the one that does not fit.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response
        s = settings.get()
        if not s.cache_not_modified_routes:
            raise MiddlewareNotUsed
        for route, kind in s.cache_not_modified_routes.items():
            _check_route(route, kind)
        self.routes = [(_route_regex(route), kind)
                       for route, kind in s.cache_not_modified_routes.items()]
        try:
            self.allow: Callable[[HttpRequest, str, int], bool] = import_string(
                s.cache_not_modified_allow)
        except ImportError:
            raise ConfigurationError(
                "HMS_TASKS_CACHE_NOT_MODIFIED_ALLOW: no such function") from None

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        meta = request.META
        wanted = meta.get("HTTP_IF_NONE_MATCH")
        if (wanted and len(wanted) <= _MAX_IF_NONE_MATCH and request.method in ("GET", "HEAD")
                and not meta.get("QUERY_STRING") and not hasattr(request, "urlconf")):
            path = request.path_info
            for regex, kind in self.routes:
                found = regex.fullmatch(path)
                if found is None:
                    continue
                id_ = int(found[1])
                if id_ <= _MAX_ID and self.allow(request, kind, id_):
                    # The Host check CommonMiddleware makes (ALLOWED_HOSTS), in case this
                    # runs above it: DisallowedHost turns into the same 400.
                    request.get_host()
                    be, made, tags = _target(kind, id_)
                    response = _not_modified(be, kind, made, tags, wanted)
                    if response is not None:
                        return response
                break
        return self.get_response(request)
