"""Serving collected static files: precompressed bodies and immutable caching for hashed names.

:func:`static_view` serves ``STATIC_ROOT`` (what ``collectstatic`` wrote with
``ManifestStaticFilesStorage``), for a HMS that serves its assets from Django (behind a CDN)::

    path("static/<path:path>", hms_tasks.assets.static_view)

- a hashed name (a value of the manifest) gets ``Cache-Control: public, max-age=31536000,
  immutable``: its bytes never change, so browsers and CDNs keep it a year without asking;
- any other name (the unhashed alias) gets ``public, max-age=60, must-revalidate``;
- the ``.br`` or ``.gz`` precompression wrote beside the file is sent when the client accepts
  it (``Accept-Encoding`` q-values; br before gzip on a tie), with ``Vary: Accept-Encoding``;
- ``Surrogate-Key: <the URL path>`` lets Fastly purge by key (:mod:`~hms_tasks.assets.purge`);
- ``Last-Modified`` and ``If-Modified-Since`` (304) as Django's own ``static.serve``.
"""

from __future__ import annotations

import mimetypes
import posixpath
from functools import lru_cache
from pathlib import Path

from django.http import FileResponse, Http404, HttpRequest, HttpResponseNotModified
from django.http.response import HttpResponseBase
from django.utils.http import http_date
from django.views.static import was_modified_since

from hms_tasks.assets import analysis
from hms_tasks.errors import ConfigurationError

__all__ = ["IMMUTABLE", "REVALIDATE", "accepted_encodings", "static_view"]

IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "public, max-age=60, must-revalidate"


def accepted_encodings(header: str) -> list[str]:
    """``br`` and ``gzip`` in the client's order of preference (q > 0) from an
    ``Accept-Encoding`` header; ``*`` accepts both."""
    q: dict[str, float] = {}
    for part in header.split(","):
        token, _, params = part.strip().partition(";")
        token = token.strip().lower()
        weight = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        if token in ("br", "gzip", "*"):
            q[token] = weight
    star = q.get("*")
    ranked = [(q.get(enc, star if star is not None else 0.0), -i, enc)
              for i, enc in enumerate(("br", "gzip"))]
    return [enc for w, _, enc in sorted(ranked, reverse=True) if w > 0]


@lru_cache(maxsize=8)
def _hashed(manifest: Path, mtime: float) -> frozenset[str]:
    return frozenset(analysis.load_manifest(manifest).values())


def _hashed_names(root: Path) -> frozenset[str]:
    manifest = root / analysis.MANIFEST_NAME
    try:
        return _hashed(manifest, manifest.stat().st_mtime)
    except (OSError, ConfigurationError):
        return frozenset()


_SUFFIX = {"br": ".br", "gzip": ".gz"}


def static_view(request: HttpRequest, path: str) -> HttpResponseBase:
    """Serve ``path`` from STATIC_ROOT (see the module doc); 404 outside it or when missing."""
    root = analysis.static_root().resolve()
    name = posixpath.normpath(path).lstrip("/")
    full = (root / name).resolve()
    if not full.is_relative_to(root) or not full.is_file() or name == analysis.MANIFEST_NAME:
        raise Http404("no such static file")
    chosen, encoding = full, None
    for enc in accepted_encodings(request.headers.get("Accept-Encoding", "")):
        side = full.with_name(full.name + _SUFFIX[enc])
        if side.is_file():
            chosen, encoding = side, enc
            break
    stat = chosen.stat()
    if not was_modified_since(request.headers.get("If-Modified-Since"), int(stat.st_mtime)):
        response: HttpResponseBase = HttpResponseNotModified()
    else:
        content_type, _ = mimetypes.guess_type(full.name)
        response = FileResponse(chosen.open("rb"), filename=full.name,
                                content_type=content_type or "application/octet-stream")
        response["Content-Length"] = str(stat.st_size)
        if encoding:
            response["Content-Encoding"] = encoding
    response["Last-Modified"] = http_date(stat.st_mtime)
    response["Vary"] = "Accept-Encoding"
    response["Cache-Control"] = IMMUTABLE if name in _hashed_names(root) else REVALIDATE
    response["Surrogate-Key"] = request.path
    return response
