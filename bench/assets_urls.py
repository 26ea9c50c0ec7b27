"""URLs of the baseline site of ``bench/assets.py``: the demo's, with /static/ served by
Django's ``static.serve`` (no precompressed bodies) and ``Cache-Control: no-cache``."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.urls import URLPattern, URLResolver, path
from django.views.static import serve

from hms_tasks.demo import urls as demo


def _static(request: HttpRequest, path: str, **_: Any) -> HttpResponseBase:
    response = serve(request, path, document_root=settings.STATIC_ROOT)
    response["Cache-Control"] = "no-cache"
    return response


urlpatterns: list[URLPattern | URLResolver] = [
    path("static/<path:path>", _static),
    *(p for p in demo.urlpatterns if getattr(p, "name", None) != "hms-static"),
]
