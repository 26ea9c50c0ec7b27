"""Response compression: brotli or gzip, negotiated from ``Accept-Encoding`` by q-value.

Add the middleware near the top of ``MIDDLEWARE`` (below anything that must see the
uncompressed body, above what sets headers it should keep)::

    MIDDLEWARE = [..., "hms_tasks.cache.CompressionMiddleware", ...]

A response is compressed when all of these hold:

- its type is text-like (``text/*``, JSON, JavaScript, XML, SVG, ...): images, archives, fonts
  in WOFF2 and other already-compressed types are left alone;
- it carries no ``Content-Encoding`` yet;
- its body is at least ``HMS_TASKS_CACHE_COMPRESS_MIN_BYTES`` (streaming responses have no
  size up front and are always compressed, chunk by chunk, flushed per chunk);
- the client accepts ``br`` or ``gzip`` (see :func:`negotiate`), and the result is smaller.

Every response that could be compressed gets ``Vary: Accept-Encoding``, also when this client
got it uncompressed, so that no cache hands one client's encoding to another. A strong ETag of
a compressed response becomes weak (RFC 9110 8.8.1: the bytes differ from the uncompressed
representation's), which ``If-None-Match`` still matches (weak comparison).

Levels come from ``HMS_TASKS_CACHE_BROTLI_QUALITY`` and ``HMS_TASKS_CACHE_GZIP_LEVEL``, chosen
by measurement (``python -m bench responses``, the table is in ``bench/RESULTS.md``).

Why not Django's ``GZipMiddleware``: gzip only. Why not ``django-http-compression``: its
levels and minimum size are fixed in the module, it treats ``*`` as identity, and it sets
``Vary`` only on the responses it compresses.

BREACH: compressing a response that reflects request input next to a secret leaks the secret
to an attacker who can make requests and watch their sizes. The demo API's JSON reflects no
input; an HMS serving CSRF-protected HTML should rely on Django's CSRF token masking.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import lru_cache
from typing import Literal, cast

import brotli
from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.utils.cache import patch_vary_headers

from hms_tasks.cache import settings

__all__ = ["COMPRESSIBLE_TYPE_RE", "Coding", "CompressionMiddleware", "compress", "negotiate"]

Coding = Literal["br", "gzip", "identity"]

#: Types worth compressing; everything else (images, audio, video, archives, WOFF2, PDF,
#: ``application/octet-stream``) is left alone.
COMPRESSIBLE_TYPE_RE = re.compile(
    r"^(?:text/[a-z0-9.+-]+|application/(?:json|[a-z0-9.-]+\+json|javascript|x-javascript"
    r"|ecmascript|xml|[a-z0-9.-]+\+xml|wasm|manifest\+json|x-ndjson|graphql-response\+json)"
    r"|image/svg\+xml|image/x-icon|image/vnd\.microsoft\.icon|font/(?:ttf|otf)"
    r"|application/vnd\.ms-fontobject)$"
)
# What the server prefers when the client likes two codings equally: brotli is smaller.
_PREFERENCE: dict[Coding, int] = {"br": 0, "gzip": 1, "identity": 2}
_ALIASES: dict[str, Coding] = {"br": "br", "gzip": "gzip", "x-gzip": "gzip",
                               "identity": "identity"}
_Q_RE = re.compile(r"^q=(0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)$")
# Longer headers are not parsed (no browser sends one; a long one is an attack on the parser).
_MAX_HEADER = 1024


def negotiate(accept_encoding: str | None) -> Coding:
    """The coding to send for this ``Accept-Encoding`` (RFC 9110 12.5.3).

    ``br`` and ``gzip`` (``x-gzip``) by q-value, brotli on a tie; ``*`` stands for every
    coding not named; ``q=0`` refuses a coding. ``identity`` when the header is absent, names
    neither, or refuses both. A malformed entry is ignored.
    """
    if not accept_encoding or len(accept_encoding) > _MAX_HEADER:
        return "identity"
    return _negotiate(accept_encoding)


@lru_cache(maxsize=256)  # clients send few distinct headers
def _negotiate(accept_encoding: str) -> Coding:
    named: dict[Coding, float] = {}
    star: float | None = None
    for part in accept_encoding.split(","):
        name, _, params = part.partition(";")
        name = name.strip().lower()
        if not name:
            continue
        q = 1.0
        if params.strip():
            match = _Q_RE.match(params.strip().replace(" ", "").lower())
            if match is None:
                continue  # malformed: as if absent
            q = float(match.group(1))
        if name == "*":
            star = q
        elif name in _ALIASES:
            coding = _ALIASES[name]
            named[coding] = max(q, named.get(coding, 0.0))
    best: Coding = "identity"
    best_q = 0.0
    for coding in ("br", "gzip"):
        q = named.get(coding, star if star is not None else 0.0)
        if q > best_q:
            best, best_q = coding, q
    return best


def compress(data: bytes, coding: Coding, *, level: int | None = None) -> bytes:
    """``data`` in ``coding``, at ``level`` (default: the settings' level of that coding)."""
    if coding == "br":
        quality = settings.get().cache_brotli_quality if level is None else level
        return brotli.compress(data, quality=quality)
    if coding == "gzip":
        gz = settings.get().cache_gzip_level if level is None else level
        # wbits 31: a gzip container; zlib.compress has no mtime, so equal input gives
        # equal bytes (gzip.compress would stamp the time).
        c = zlib.compressobj(gz, zlib.DEFLATED, 31)
        return c.compress(data) + c.flush()
    return data


class _Streamer:
    """A streaming compressor that flushes after every chunk, so a slow stream's client sees
    each chunk as it is produced (a compressor left alone would sit on them)."""

    def __init__(self, coding: Coding) -> None:
        s = settings.get()
        self._br = brotli.Compressor(quality=s.cache_brotli_quality) if coding == "br" else None
        self._gz = (zlib.compressobj(s.cache_gzip_level, zlib.DEFLATED, 31)
                    if coding == "gzip" else None)

    def chunk(self, data: bytes) -> bytes:
        if self._br is not None:
            out = self._br.process(data)
            # flush() is in brotli's API but missing from brotli-stubs.
            flushed: bytes = self._br.flush()  # type: ignore[attr-defined]
            return out + flushed
        assert self._gz is not None
        return self._gz.compress(data) + self._gz.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        if self._br is not None:
            return self._br.finish()
        assert self._gz is not None
        return self._gz.flush()


def _stream(chunks: Iterator[bytes], coding: Coding) -> Iterator[bytes]:
    z = _Streamer(coding)
    for chunk in chunks:
        if out := z.chunk(chunk):
            yield out
    yield z.finish()


async def _astream(chunks: AsyncIterator[bytes], coding: Coding) -> AsyncIterator[bytes]:
    z = _Streamer(coding)
    async for chunk in chunks:
        if out := z.chunk(chunk):
            yield out
    yield z.finish()


class CompressionMiddleware:
    """Compress responses with brotli or gzip: see the module docstring. Sync and async."""

    sync_capable = True
    async_capable = True

    def __init__(
        self,
        get_response: Callable[[HttpRequest], HttpResponseBase]
        | Callable[[HttpRequest], Awaitable[HttpResponseBase]],
    ) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.async_mode:
            return self._acall(request)
        response = cast(Callable[[HttpRequest], HttpResponseBase], self.get_response)(request)
        return self.process_response(request, response)

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        get = cast(Callable[[HttpRequest], Awaitable[HttpResponseBase]], self.get_response)
        return self.process_response(request, await get(request))

    def process_response(self, request: HttpRequest, response: HttpResponseBase
                         ) -> HttpResponseBase:
        content_type = response.get("Content-Type", "").partition(";")[0].strip().lower()
        if (response.status_code in (204, 304) or response.has_header("Content-Encoding")
                or not COMPRESSIBLE_TYPE_RE.match(content_type)):
            return response
        streaming = isinstance(response, StreamingHttpResponse)
        if not streaming:
            body = cast(HttpResponse, response).content
            if len(body) < settings.get().cache_compress_min_bytes:
                return response
        # From here the representation depends on Accept-Encoding, whatever this client gets.
        patch_vary_headers(response, ("Accept-Encoding",))
        coding = negotiate(request.headers.get("Accept-Encoding"))
        if coding == "identity":
            return response
        if isinstance(response, StreamingHttpResponse):
            if response.is_async:
                response.streaming_content = _astream(
                    cast(AsyncIterator[bytes], response.streaming_content), coding)
            else:
                response.streaming_content = _stream(
                    cast(Iterator[bytes], response.streaming_content), coding)
            del response["Content-Length"]
        else:
            packed = compress(body, coding)
            if len(packed) >= len(body):
                return response
            cast(HttpResponse, response).content = packed
            response["Content-Length"] = str(len(packed))
        etag = response.get("ETag")
        if etag and etag.startswith('"'):
            response["ETag"] = "W/" + etag
        response["Content-Encoding"] = coding
        return response
