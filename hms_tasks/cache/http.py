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
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar, cast

import redis
from django.http import HttpRequest, HttpResponse, HttpResponseNotModified, JsonResponse
from django.http.response import HttpResponseBase
from django.utils.cache import patch_vary_headers
from django.utils.http import parse_etags

from hms_tasks.cache import settings
from hms_tasks.cache.core import backend, check_ids, read_through
from hms_tasks.cache.registry import get_kind
from hms_tasks.cache.tags import ALL

__all__ = ["cached_response", "current_etag", "etag_of", "set_cache_control"]

R = TypeVar("R", bound=HttpResponseBase)
# Longer If-None-Match headers are not parsed (no client keeps that many versions).
_MAX_IF_NONE_MATCH = 4096


def etag_of(made_key: str, tags: Sequence[str], generations: Sequence[str]) -> str:
    """The (weak) ETag of the payload stored at ``made_key`` under ``tags`` at
    ``generations``. Weak: it names the payload, which goes out in several encodings."""
    h = hashlib.blake2b(made_key.encode(), digest_size=16)
    for tag, gen in zip(tags, generations, strict=True):
        h.update(f"\0{tag}={gen}".encode())
    return f'W/"{h.hexdigest()}"'


def _target(kind: str, id_: int) -> tuple[str, list[str]]:
    k = get_kind(kind)
    (id_,) = check_ids([id_], argument="id")
    return backend().make_key(k.key(id_)), [ALL, *k.tags(id_)]


def _read_generations(tags: Sequence[str]) -> list[str] | None:
    """The tags' current generations in one ``MGET``; None if one is missing (nothing was
    ever cached under it, or it expired) or Redis is unreachable. Always the primary: a
    lagging replica's generations would answer 304 for a changed payload."""
    try:
        gens = backend().current_generations(tags)
    except redis.RedisError:
        return None
    return None if None in gens else cast(list[str], gens)


def current_etag(kind: str, id_: int) -> str | None:
    """The ETag a response of ``kind`` ``id_`` would carry now (one Redis round trip), or
    None if there is none yet (see :func:`_read_generations`)."""
    made, tags = _target(kind, id_)
    gens = _read_generations(tags)
    return None if gens is None else etag_of(made, tags, gens)


def set_cache_control(response: R, kind: str) -> R:
    """Set ``Cache-Control`` of a response carrying data of ``kind`` (from
    ``HMS_TASKS_CACHE_CONTROL``), replacing any the view set."""
    response["Cache-Control"] = settings.get().control(kind)
    return response


def _matches(if_none_match: str, etag: str) -> bool:
    # Weak comparison (RFC 9110 13.1.2): W/ does not matter.
    opaque = etag.removeprefix("W/")
    return any(t.removeprefix("W/") == opaque for t in parse_etags(if_none_match))


def _headers(response: R, kind: str, etag: str | None) -> R:
    if etag is not None:
        response["ETag"] = etag
    set_cache_control(response, kind)
    # A 304 carries the Vary its 200 would (RFC 9110 15.4.5); the 200 is usually compressed.
    patch_vary_headers(response, ("Accept-Encoding",))
    return response


def cached_response(request: HttpRequest, kind: str, id_: int) -> HttpResponse | None:
    """The payload of ``kind`` ``id_`` as a JSON response with its ETag, or ``304 Not
    Modified`` when ``If-None-Match`` holds that ETag; None when the row does not exist.

    With a current ``If-None-Match``: one Redis round trip (``MGET`` of the generations),
    nothing else. Otherwise the payload through :func:`~hms_tasks.cache.core.read_through`
    (one round trip on a hit), whose generations make the ETag. If Redis is down the payload
    comes from the database, without an ETag.
    """
    made, tags = _target(kind, id_)
    wanted = request.headers.get("If-None-Match")
    if wanted is not None and len(wanted) > _MAX_IF_NONE_MATCH:
        wanted = None
    if wanted:
        gens = _read_generations(tags)
        if gens is not None:
            current = etag_of(made, tags, gens)
            if _matches(wanted, current):
                return _headers(HttpResponseNotModified(), kind, current)
    # One round trip on a hit: the read returns the generations the payload was stored under.
    payload, stored = read_through(kind, id_)
    if payload is None:
        return None
    etag = None if stored is None else etag_of(made, tags, stored)
    if wanted is not None and etag is not None and parse_etags(wanted) == ["*"]:
        return _headers(HttpResponseNotModified(), kind, etag)
    return _headers(JsonResponse(payload), kind, etag)
