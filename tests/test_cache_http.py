"""HTTP responses of the cache: compression negotiated by q-value, ETags from generations with
304s that touch neither the database nor the builder, and Cache-Control per kind.

Real parts: Django's test client and WSGI stack over a seeded database, the session's Redis,
and (at the end) a real gunicorn serving the demo, spoken to with ``http.client`` (which does
not decode, so the bytes on the wire are checked as they are).
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import brotli
import pytest
import redis
from django.core.exceptions import MiddlewareNotUsed
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.test import Client, RequestFactory, override_settings
from django.test.utils import CaptureQueriesContext
from django.urls import path
from django.utils import timezone

from hms_tasks.cache import (
    NotModifiedMiddleware,
    cached_response,
    current_etag,
    etag_view,
    negotiate,
    register_kind,
)
from hms_tasks.cache.compression import CompressionMiddleware
from hms_tasks.cache.core import backend
from hms_tasks.cache.registry import get_kind
from hms_tasks.demo import api
from hms_tasks.demo.models import Appointment, Patient
from hms_tasks.demo.seed import seed
from hms_tasks.errors import ConfigurationError
from tests.helpers import RedisServer, free_port, stop, wait_for

REPO = Path(__file__).resolve().parent.parent
SECRET = "Jane-Doe-1970"

# -- negotiation: pure ---------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "coding"), [
    (None, "identity"),
    ("", "identity"),
    ("identity", "identity"),
    ("deflate", "identity"),
    ("gzip", "gzip"),
    ("x-gzip", "gzip"),
    ("br", "br"),
    ("BR", "br"),
    ("gzip, deflate, br", "br"),                 # a browser: a tie goes to brotli
    ("gzip;q=0.8, br;q=0.8", "br"),
    ("br;q=0.5, gzip", "gzip"),                  # q decides before preference
    ("  gzip ; q=0.5 ,br;q=0.4", "gzip"),
    ("br;q=0, gzip", "gzip"),                    # q=0 refuses
    ("br;q=0, gzip;q=0", "identity"),
    ("br;q=0.000, gzip;q=0.001", "gzip"),
    ("*", "br"),                                 # * stands for every coding not named
    ("*;q=0", "identity"),
    ("br;q=0, *", "gzip"),
    ("gzip;q=0, *;q=0.1", "br"),
    ("gzip, *;q=0", "gzip"),
    ("identity;q=0, *;q=0", "identity"),         # nothing acceptable: sent unencoded
    ("br;q=1.5, gzip;q=0.1", "gzip"),            # malformed q: the entry is ignored
    ("br;q=abc", "identity"),
    ("br;level=3", "identity"),
    ("gzip;q=1.000", "gzip"),
    ("br, " + "x" * 2000, "identity"),           # too long to parse
])
def test_negotiation(header: str | None, coding: str) -> None:
    assert negotiate(header) == coding


# -- the middleware on its own: Django's RequestFactory and plain responses ----------------------

BIG = json.dumps({"rows": [{"id": i, "name": f"row {i}"} for i in range(200)]}).encode()


def _through(response: HttpResponse | StreamingHttpResponse, accept: str | None = "br"
             ) -> Any:
    request = RequestFactory().get("/", headers={"Accept-Encoding": accept} if accept else {})
    return CompressionMiddleware(lambda r: response)(request)


def test_json_over_the_minimum_is_compressed_and_decodes_to_the_same_bytes() -> None:
    out = _through(HttpResponse(BIG, content_type="application/json"), "br")
    assert out["Content-Encoding"] == "br"
    assert out["Vary"] == "Accept-Encoding"
    assert int(out["Content-Length"]) == len(out.content) < len(BIG) / 3
    assert brotli.decompress(out.content) == BIG
    out = _through(HttpResponse(BIG, content_type="application/json"), "gzip")
    assert out["Content-Encoding"] == "gzip"
    assert gzip.decompress(out.content) == BIG


def test_identity_still_says_vary() -> None:
    out = _through(HttpResponse(BIG, content_type="application/json"), None)
    assert not out.has_header("Content-Encoding")
    assert out["Vary"] == "Accept-Encoding"
    assert out.content == BIG


@pytest.mark.parametrize("response", [
    pytest.param(lambda: HttpResponse(b"{}" * 100, content_type="application/json"),
                 id="under the minimum"),
    pytest.param(lambda: HttpResponse(BIG, content_type="image/png"), id="image"),
    pytest.param(lambda: HttpResponse(BIG, content_type="application/zip"), id="archive"),
    pytest.param(lambda: HttpResponse(BIG, content_type="font/woff2"), id="woff2"),
    pytest.param(lambda: HttpResponse(BIG, content_type="application/octet-stream"), id="bytes"),
    pytest.param(lambda: HttpResponse(BIG, status=204, content_type="application/json"),
                 id="204"),
])
def test_left_alone(response: Any) -> None:
    original = response()
    body = original.content
    out = _through(original, "br, gzip")
    assert not out.has_header("Content-Encoding")
    assert not out.has_header("Vary")
    assert out.content == body


def test_an_encoded_response_is_not_encoded_twice() -> None:
    packed = gzip.compress(BIG)
    response = HttpResponse(packed, content_type="application/json")
    response["Content-Encoding"] = "gzip"
    out = _through(response, "br")
    assert out["Content-Encoding"] == "gzip"
    assert out.content == packed


def test_minimum_size_comes_from_the_settings() -> None:
    small = b'{"a": "' + b"x" * 300 + b'"}'
    assert not _through(HttpResponse(small, content_type="application/json")).has_header(
        "Content-Encoding")
    with override_settings(HMS_TASKS_CACHE_COMPRESS_MIN_BYTES=100):
        out = _through(HttpResponse(small, content_type="application/json"))
        assert out["Content-Encoding"] == "br"


def test_a_strong_etag_becomes_weak_when_compressed() -> None:
    response = HttpResponse(BIG, content_type="application/json")
    response["ETag"] = '"abc"'
    assert _through(response)["ETag"] == 'W/"abc"'


def test_streaming_is_compressed_chunk_by_chunk() -> None:
    chunks = [BIG[i:i + 1000] for i in range(0, len(BIG), 1000)]
    out = _through(StreamingHttpResponse(iter(chunks), content_type="text/plain"), "gzip")
    assert out["Content-Encoding"] == "gzip"
    assert not out.has_header("Content-Length")
    parts = list(out.streaming_content)
    assert len(parts) > 1  # flushed per chunk, not held back to the end
    assert gzip.decompress(b"".join(parts)) == BIG


def test_async_streaming_is_compressed() -> None:
    chunks = [BIG[i:i + 1000] for i in range(0, len(BIG), 1000)]

    async def produce() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    async def main() -> bytes:
        out = _through(StreamingHttpResponse(produce(), content_type="application/json"), "br")
        assert out["Content-Encoding"] == "br"
        return b"".join([part async for part in out.streaming_content])

    assert brotli.decompress(asyncio.run(main())) == BIG


# -- settings ----------------------------------------------------------------------------------


def test_cache_control_defaults_and_per_kind() -> None:
    from hms_tasks.cache import settings

    assert settings.get().control("patient") == "private, no-cache"
    with override_settings(HMS_TASKS_CACHE_CONTROL={"patient": "no-store"}):
        assert settings.get().control("patient") == "no-store"
        assert settings.get().control("census") == "private, no-cache"


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("HMS_TASKS_CACHE_CONTROL", {"patient": "public, max-age=60"},
     "HMS_TASKS_CACHE_CONTROL['patient']: must be directives"),
    ("HMS_TASKS_CACHE_CONTROL", {"patient": "private, s-maxage=60"},
     "HMS_TASKS_CACHE_CONTROL['patient']: must be directives"),
    ("HMS_TASKS_CACHE_CONTROL", {"default": "max-age=60"},
     "HMS_TASKS_CACHE_CONTROL['default']: must include private or no-store"),
    ("HMS_TASKS_CACHE_CONTROL", {"patient": SECRET}, "HMS_TASKS_CACHE_CONTROL['patient']: "),
    ("HMS_TASKS_CACHE_COMPRESS_MIN_BYTES", -1, "HMS_TASKS_CACHE_COMPRESS_MIN_BYTES: "),
    ("HMS_TASKS_CACHE_BROTLI_QUALITY", 12, "HMS_TASKS_CACHE_BROTLI_QUALITY: "),
    ("HMS_TASKS_CACHE_GZIP_LEVEL", 0, "HMS_TASKS_CACHE_GZIP_LEVEL: "),
    ("HMS_TASKS_CACHE_NOT_MODIFIED_ROUTES", {"/api/patients/": "patient"},
     "HMS_TASKS_CACHE_NOT_MODIFIED_ROUTES"),
    ("HMS_TASKS_CACHE_NOT_MODIFIED_ROUTES", {"/a/<id>/<id>/": "patient"},
     "HMS_TASKS_CACHE_NOT_MODIFIED_ROUTES"),
    ("HMS_TASKS_CACHE_NOT_MODIFIED_ROUTES", {"/a/(.*)/<id>/": "patient"},
     "HMS_TASKS_CACHE_NOT_MODIFIED_ROUTES"),
    ("HMS_TASKS_CACHE_NOT_MODIFIED_ALLOW", SECRET, "HMS_TASKS_CACHE_NOT_MODIFIED_ALLOW: "),
])
def test_bad_settings_are_refused_naming_the_setting(setting: str, value: Any,
                                                      message: str) -> None:
    from hms_tasks.cache import settings

    with override_settings(**{setting: value}), pytest.raises(ConfigurationError) as err:
        settings.get()
    assert message in str(err.value)
    assert SECRET not in str(err.value)


# -- the demo API: ETags, 304s, compression ----------------------------------------------------


@pytest.fixture
def hospital(transactional_db: None) -> Patient:
    """A seeded demo database (committed: saves invalidate at commit) and one of its
    patients."""
    seed(patients=30, seed=5, force=True)
    patient = Patient.objects.order_by("id").first()
    assert patient is not None
    return patient


@pytest.fixture
def builds() -> Iterator[list[list[int]]]:
    """Every call of the ``patient`` kind's builder, through the public registration API."""
    original = get_kind("patient")
    calls: list[list[int]] = []

    def build_many(ids: Any) -> Any:
        calls.append(list(ids))
        return original.build_many(ids)

    register_kind("patient", build_many=build_many, tags=original.tags,
                  hot_ids=original.hot_ids, key_of=original.key_of)
    yield calls
    register_kind("patient", build_many=original.build_many, tags=original.tags,
                  hot_ids=original.hot_ids, key_of=original.key_of)


def _url(patient: Patient) -> str:
    return f"/api/patients/{patient.pk}/"


def _stored(patient: Patient) -> None:
    key = get_kind("patient").key(patient.pk)
    wait_for(lambda: backend().has_key(key), what="the summary to be stored")


def test_patient_carries_an_etag_and_a_304_needs_neither_database_nor_builder(
        hospital: Patient, builds: list[list[int]], redis_server: RedisServer) -> None:
    client = Client()
    first = client.get(_url(hospital))
    assert first.status_code == 200
    etag = first["ETag"]
    assert re.fullmatch(r'W/"[0-9a-f]{32}"', etag)  # a hash: no id, name or key in clear
    assert first["Cache-Control"] == "private, no-cache"
    assert "Accept-Encoding" in first["Vary"]
    assert builds == [[hospital.pk]]
    _stored(hospital)

    before = _command_calls(redis_server)
    with CaptureQueriesContext(connection) as queries:
        again = client.get(_url(hospital), headers={"If-None-Match": etag})
    after = _command_calls(redis_server)
    assert again.status_code == 304
    assert again.content == b""
    assert again["ETag"] == etag
    assert again["Cache-Control"] == "private, no-cache"
    assert "Accept-Encoding" in again["Vary"]
    assert len(queries) == 0
    assert builds == [[hospital.pk]]  # not called again
    # One round trip: one script running a single MGET (a script, so that a master refusing
    # writes answers no 304 either), no GET of the payload.
    assert after["mget"] - before["mget"] == 1
    assert after["evalsha"] - before.get("evalsha", 0) == 1
    for command in ("eval", "get"):
        assert after.get(command, 0) == before.get(command, 0), command


def _command_calls(server: RedisServer) -> dict[str, int]:
    # Commands a Lua script runs are counted too (READ's GET, MGET, HINCRBY...). Calls that
    # failed (an EVALSHA of a script not loaded yet, before redis-py loads it) are not.
    info = redis.Redis.from_url(server.url).info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) - int(v.get("failed_calls", 0))
            for k, v in info.items()}


def test_a_200_from_the_cache_is_one_round_trip_and_carries_the_same_etag(
        hospital: Patient, builds: list[list[int]], redis_server: RedisServer) -> None:
    etag = Client().get(_url(hospital))["ETag"]  # a miss: the ETag of the read's generations
    _stored(hospital)
    before = _command_calls(redis_server)
    with CaptureQueriesContext(connection) as queries:
        hit = cached_response(RequestFactory().get(_url(hospital)), "patient", hospital.pk)
    after = _command_calls(redis_server)
    changed = {c: after[c] - before.get(c, 0) for c in after
               if after[c] != before.get(c, 0) and c != "info"}
    assert hit is not None
    assert hit.status_code == 200
    assert hit["ETag"] == etag  # the stored value's generations are the ones read at the miss
    assert len(queries) == 0
    assert builds == [[hospital.pk]]
    # One script call (READ), and only what it runs inside: no second round trip.
    assert changed.get("evalsha", 0) + changed.get("eval", 0) == 1
    assert changed.get("mget") == 1  # the script's own check of the generations
    # (hello, client: the pool may open a connection, the filler thread holding the other.)
    assert set(changed) <= {"evalsha", "eval", "get", "mget", "zincrby", "hincrby", "expire",
                            "hello", "client"}


def test_the_etag_is_a_hash_of_key_and_generations(hospital: Patient) -> None:
    first = Client().get(_url(hospital))
    assert first["ETag"] == current_etag("patient", hospital.pk)
    assert "patient" not in first["ETag"]
    assert hospital.family_name not in first["ETag"]


def test_a_list_of_etags_and_star_match(hospital: Patient) -> None:
    client = Client()
    etag = client.get(_url(hospital))["ETag"]
    assert client.get(_url(hospital), headers={
        "If-None-Match": f'"other", {etag.removeprefix("W/")}'}).status_code == 304
    assert client.get(_url(hospital), headers={"If-None-Match": "*"}).status_code == 304
    assert client.get(_url(hospital), headers={"If-None-Match": '"other"'}).status_code == 200
    missing = client.get("/api/patients/999999/", headers={"If-None-Match": "*"})
    assert missing.status_code == 404
    assert not missing.has_header("ETag")


def test_a_save_changes_the_etag(hospital: Patient) -> None:
    client = Client()
    etag = client.get(_url(hospital))["ETag"]
    _stored(hospital)
    hospital.family_name = "Renamed"
    hospital.save()  # committed: the commit bumps the patient's generation
    after = client.get(_url(hospital), headers={"If-None-Match": etag})
    assert after.status_code == 200
    assert after.json()["patient"]["family_name"] == "Renamed"
    assert after["ETag"] != etag


def test_a_change_to_anything_in_the_summary_changes_the_etag(hospital: Patient) -> None:
    client = Client()
    etag = client.get(_url(hospital))["ETag"]
    template = Appointment.objects.order_by("id").first()
    assert template is not None
    Appointment.objects.create(
        patient=hospital, practitioner_id=template.practitioner_id,
        department_id=template.department_id, scheduled_at=timezone.now() + timedelta(days=1),
        duration_minutes=15, status=Appointment.Status.BOOKED)
    after = client.get(_url(hospital), headers={"If-None-Match": etag})
    assert after.status_code == 200
    assert after["ETag"] != etag
    new = after["ETag"]
    assert client.get(_url(hospital), headers={"If-None-Match": new}).status_code == 304


def test_a_new_day_changes_the_etag(hospital: Patient) -> None:
    # 12 hours behind and 14 ahead of UTC are always on different dates (see
    # test_cache_dates): the key, and so the ETag, carry the date.
    client = Client()
    with timezone.override("Etc/GMT+12"):
        yesterday = client.get(_url(hospital))["ETag"]
        assert client.get(_url(hospital), headers={"If-None-Match": yesterday}
                          ).status_code == 304
    with timezone.override("Pacific/Kiritimati"):
        today = client.get(_url(hospital), headers={"If-None-Match": yesterday})
    assert today.status_code == 200
    assert today["ETag"] != yesterday


def test_unknown_parameters_are_still_refused(hospital: Patient) -> None:
    client = Client()
    etag = client.get(_url(hospital))["ETag"]
    refused = client.get(_url(hospital), {"limt": "5"}, headers={"If-None-Match": etag})
    assert refused.status_code == 400
    assert refused.json()["parameter"] == "limt"


def test_without_redis_the_payload_is_served_without_an_etag(
        hospital: Patient, redis_server: RedisServer) -> None:
    request = RequestFactory().get(_url(hospital))
    redis_server.stop()
    try:
        response = cached_response(request, "patient", hospital.pk)
    finally:
        redis_server.start()
    assert response is not None
    assert response.status_code == 200
    assert not response.has_header("ETag")
    assert json.loads(response.content)["id"] == hospital.pk


def test_compressed_pages_decode_to_the_same_json(hospital: Patient) -> None:
    client = Client()
    url = "/api/patients/?limit=200"
    plain = client.get(url)
    assert not plain.has_header("Content-Encoding")
    assert "Accept-Encoding" in plain["Vary"]
    assert plain["Cache-Control"] == "private, no-cache"
    for coding, decode in (("br", brotli.decompress), ("gzip", gzip.decompress)):
        packed = client.get(url, headers={"Accept-Encoding": coding})
        assert packed["Content-Encoding"] == coding
        assert "Accept-Encoding" in packed["Vary"]
        assert len(packed.content) < len(plain.content) / 3
        assert json.loads(decode(packed.content)) == plain.json()


def test_patient_summary_over_the_minimum_is_compressed(hospital: Patient) -> None:
    client = Client()
    with override_settings(HMS_TASKS_CACHE_COMPRESS_MIN_BYTES=64):
        packed = client.get(_url(hospital), headers={"Accept-Encoding": "gzip, br"})
        plain = client.get(_url(hospital))
    assert packed["Content-Encoding"] == "br"
    assert packed["ETag"] == plain["ETag"]
    assert json.loads(brotli.decompress(packed.content)) == plain.json()


# -- a real gunicorn ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[int]:
    """The demo under gunicorn (2 workers) on a seeded SQLite file; yields its port."""
    tmp = tmp_path_factory.mktemp("responses")
    # Summaries are a few hundred bytes: a low minimum makes them compressible here.
    (tmp / "responses_settings.py").write_text(
        "from hms_tasks.demo.settings import *  # noqa: F403\n"
        "HMS_TASKS_CACHE_COMPRESS_MIN_BYTES = 200\n")
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(REDIS_URL=redis_server.url, HMS_TASKS_HOME=str(tmp), LOG_LEVEL="WARNING",
               DJANGO_SETTINGS_MODULE="responses_settings",
               PYTHONPATH=os.pathsep.join(filter(None, [str(tmp), str(REPO),
                                                        env.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-m", "hms_tasks", "seed", "--patients", "40"], env=env,
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    port = free_port()
    api = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "hms_tasks.demo.wsgi:application", "-b",
         f"127.0.0.1:{port}", "-w", "2", "--log-level", "warning"],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        assert api.poll() is None, "gunicorn exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    try:
        wait_for(up, timeout=60, what="gunicorn")
        yield port
    finally:
        stop(api)


def _fetch(port: int, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={k.replace("_", "-"): v for k, v in headers.items()})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_over_http_the_contract_holds(served: int) -> None:
    status, headers, plain = _fetch(served, "/api/patients/1/")
    assert status == 200
    etag = headers["etag"]
    assert headers["cache-control"] == "private, no-cache"
    for coding, decode in (("br", brotli.decompress), ("gzip", gzip.decompress)):
        status, headers, body = _fetch(served, "/api/patients/1/", Accept_Encoding=coding)
        assert status == 200
        assert headers["content-encoding"] == coding
        assert "Accept-Encoding" in headers["vary"]
        assert int(headers["content-length"]) == len(body)
        assert json.loads(decode(body)) == json.loads(plain)
        assert headers["etag"] == etag
    # Either worker answers 304 for it, with no body at all.
    for _ in range(4):
        status, headers, body = _fetch(served, "/api/patients/1/", If_None_Match=etag,
                                       Accept_Encoding="br")
        assert status == 304
        assert body == b""
        assert headers["etag"] == etag
        assert "content-encoding" not in headers


# -- NotModifiedMiddleware: 304s before the view, behind the HMS's authentication --------------

TOKEN = "not-a-real-token"


@dataclass(frozen=True)
class _User:
    is_authenticated: bool


class BearerAuth:
    """A small authentication middleware, as an HMS has one: ``request.user`` from a bearer
    token."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        request.user = _User(  # type: ignore[attr-defined]
            request.headers.get("Authorization") == f"Bearer {TOKEN}")
        return self.get_response(request)


#: Ids the guarded view was called with: a request answered early never reaches it.
seen_by_view: list[int] = []


@etag_view("patient")
def guarded_patient(request: HttpRequest, patient_id: int) -> HttpResponse:
    """The demo's patient endpoint behind a login, as an HMS would have it."""
    seen_by_view.append(patient_id)
    if not getattr(getattr(request, "user", None), "is_authenticated", False):
        return JsonResponse({"error": "authentication required"}, status=401)
    return api.patient(request, patient_id)


def unmarked_patient(request: HttpRequest, patient_id: int) -> HttpResponse:
    return api.patient(request, patient_id)


@etag_view("patient")
def two_ids(request: HttpRequest, patient_id: int, other: int) -> HttpResponse:
    return api.patient(request, patient_id)


urlpatterns = [
    path("guarded/patients/<int:patient_id>/", guarded_patient),
    path("unmarked/<int:patient_id>/", unmarked_patient),
    path("two/<int:patient_id>/<int:other>/", two_ids),
]

GUARDED = {
    "ROOT_URLCONF": __name__,
    "MIDDLEWARE": [f"{__name__}.BearerAuth", "hms_tasks.cache.NotModifiedMiddleware"],
    "HMS_TASKS_CACHE_NOT_MODIFIED_ROUTES": {"/guarded/patients/<id>/": "patient"},
    # The default, which the demo's settings replace (its API has no authentication).
    "HMS_TASKS_CACHE_NOT_MODIFIED_ALLOW": "hms_tasks.cache.http.authenticated",
}
SIGNED_IN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def guarded(hospital: Patient) -> Iterator[Client]:
    seen_by_view.clear()
    with override_settings(**GUARDED):
        yield Client()


def _guarded_url(patient: Patient) -> str:
    return f"/guarded/patients/{patient.pk}/"


def test_an_early_304_skips_the_view_and_the_database_in_one_round_trip(
        hospital: Patient, guarded: Client, builds: list[list[int]],
        redis_server: RedisServer) -> None:
    first = guarded.get(_guarded_url(hospital), headers=SIGNED_IN)
    assert first.status_code == 200
    etag = first["ETag"]
    assert seen_by_view == [hospital.pk]
    _stored(hospital)

    before = _command_calls(redis_server)
    with CaptureQueriesContext(connection) as queries:
        again = guarded.get(_guarded_url(hospital), headers={**SIGNED_IN, "If-None-Match": etag})
    after = _command_calls(redis_server)
    assert again.status_code == 304
    assert again.content == b""
    assert again["ETag"] == etag
    assert again["Cache-Control"] == "private, no-cache"
    assert again["Vary"] == "Accept-Encoding"
    assert seen_by_view == [hospital.pk]  # answered above the view
    assert len(queries) == 0
    assert builds == [[hospital.pk]]
    assert after["evalsha"] - before.get("evalsha", 0) == 1
    assert after["mget"] - before["mget"] == 1
    for command in ("eval", "get"):
        assert after.get(command, 0) == before.get(command, 0), command

    # Anything the view would judge goes to the view: a query string, another method, an
    # ETag that is not current.
    refused = guarded.get(_guarded_url(hospital), {"limt": "5"},
                          headers={**SIGNED_IN, "If-None-Match": etag})
    assert refused.status_code == 400
    assert guarded.post(_guarded_url(hospital), headers={**SIGNED_IN, "If-None-Match": etag}
                        ).status_code == 405
    assert guarded.get(_guarded_url(hospital), headers={**SIGNED_IN, "If-None-Match": '"x"'}
                       ).status_code == 200
    # A Host outside ALLOWED_HOSTS is refused as CommonMiddleware would, not answered.
    assert guarded.get(_guarded_url(hospital), headers={
        **SIGNED_IN, "If-None-Match": etag, "Host": "elsewhere.example"}).status_code == 400
    assert seen_by_view == [hospital.pk] * 4


def test_after_a_commit_the_old_etag_gets_a_200_at_once(hospital: Patient,
                                                          guarded: Client) -> None:
    url = _guarded_url(hospital)
    etag = guarded.get(url, headers=SIGNED_IN)["ETag"]
    _stored(hospital)
    assert guarded.get(url, headers={**SIGNED_IN, "If-None-Match": etag}).status_code == 304
    calls = len(seen_by_view)

    hospital.family_name = "Renamed"
    hospital.save()  # committed: the commit bumps the patient's generation, nothing in-process
    after = guarded.get(url, headers={**SIGNED_IN, "If-None-Match": etag})
    assert after.status_code == 200
    assert after.json()["patient"]["family_name"] == "Renamed"
    assert after["ETag"] != etag
    assert len(seen_by_view) == calls + 1

    # The new ETag is answered early again.
    assert guarded.get(url, headers={**SIGNED_IN, "If-None-Match": after["ETag"]}
                       ).status_code == 304
    assert len(seen_by_view) == calls + 1


def test_an_unauthenticated_request_is_never_answered_early(hospital: Patient,
                                                            guarded: Client) -> None:
    url = _guarded_url(hospital)
    etag = guarded.get(url, headers=SIGNED_IN)["ETag"]
    _stored(hospital)
    for headers in ({"If-None-Match": etag},
                    {"If-None-Match": etag, "Authorization": "Bearer wrong"}):
        calls = len(seen_by_view)
        answer = guarded.get(url, headers=headers)
        assert answer.status_code == 401  # the view's answer, not a 304
        assert len(seen_by_view) == calls + 1


def test_without_an_authentication_middleware_nothing_is_answered_early(
        hospital: Patient, guarded: Client) -> None:
    # The default check wants request.user: with no middleware setting it, no early 304s.
    etag = guarded.get(_guarded_url(hospital), headers=SIGNED_IN)["ETag"]
    _stored(hospital)
    with override_settings(MIDDLEWARE=["hms_tasks.cache.NotModifiedMiddleware"]):
        answer = Client().get(_guarded_url(hospital), headers={"If-None-Match": etag})
    assert answer.status_code == 401
    assert seen_by_view == [hospital.pk] * 2


@pytest.mark.parametrize(("routes", "message"), [
    ({"/nowhere/<id>/": "patient"}, "resolves it to no view"),
    ({"/unmarked/<id>/": "patient"}, "not marked etag_view('patient')"),
    ({"/guarded/patients/<id>/": "census"}, "not marked etag_view('census')"),
    ({"/guarded/patients/<id>/": "nosuchkind"}, "not a registered kind"),
    ({"/two/<id>/1/": "patient"}, "<id> must be the route's one variable"),
])
def test_routes_are_checked_against_the_urlconf(routes: dict[str, str], message: str) -> None:
    with override_settings(**{**GUARDED, "HMS_TASKS_CACHE_NOT_MODIFIED_ROUTES": routes}), \
            pytest.raises(ConfigurationError) as err:
        NotModifiedMiddleware(lambda request: HttpResponse())
    assert "HMS_TASKS_CACHE_NOT_MODIFIED_ROUTES" in str(err.value)
    assert message in str(err.value)


def test_without_routes_django_leaves_it_out() -> None:
    with override_settings(HMS_TASKS_CACHE_NOT_MODIFIED_ROUTES={}), \
            pytest.raises(MiddlewareNotUsed):
        NotModifiedMiddleware(lambda request: HttpResponse())
    with override_settings(**{**GUARDED, "HMS_TASKS_CACHE_NOT_MODIFIED_ALLOW": "no.such.fn"}), \
            pytest.raises(ConfigurationError, match="HMS_TASKS_CACHE_NOT_MODIFIED_ALLOW"):
        NotModifiedMiddleware(lambda request: HttpResponse())


def test_after_a_redis_restart_the_early_304_still_answers(
        hospital: Patient, guarded: Client, redis_server: RedisServer) -> None:
    # The pooled connection is broken and the script cache empty: the early path's own
    # EVALSHA gives way to redis-py's Script call, which reconnects and loads the script.
    url = _guarded_url(hospital)
    etag = guarded.get(url, headers=SIGNED_IN)["ETag"]
    _stored(hospital)
    assert guarded.get(url, headers={**SIGNED_IN, "If-None-Match": etag}).status_code == 304
    redis_server.stop()
    redis_server.start()
    calls = len(seen_by_view)
    again = guarded.get(url, headers={**SIGNED_IN, "If-None-Match": etag})
    assert again.status_code == 304
    assert len(seen_by_view) == calls


def test_a_master_refusing_writes_answers_no_304(
        hospital: Patient, guarded: Client, redis_server: RedisServer) -> None:
    # A master that lost its replicas (min-replicas-to-write) may be the old side of a
    # failover: it must not confirm a client's copy, early or in the view.
    url = _guarded_url(hospital)
    etag = guarded.get(url, headers=SIGNED_IN)["ETag"]
    _stored(hospital)
    admin = redis.Redis.from_url(redis_server.url)
    admin.config_set("min-replicas-to-write", 1)
    try:
        answer = guarded.get(url, headers={**SIGNED_IN, "If-None-Match": etag})
    finally:
        admin.config_set("min-replicas-to-write", 0)
        admin.close()
    assert answer.status_code == 200
    assert answer.json()["id"] == hospital.pk


def test_the_generations_read_runs_meanwhile_once_on_either_path(
        hospital: Patient, redis_server: RedisServer) -> None:
    # The early 304 builds its response while the generations are on their way.
    be = backend()
    tags = ["all", f"patient:{hospital.pk}"]
    be.generations([f"patient:{hospital.pk}"])
    calls: list[int] = []
    first = be.current_generations(tags, meanwhile=lambda: calls.append(1))
    assert None not in first
    assert calls == [1]
    # The script cache emptied: the EVALSHA is refused (NOSCRIPT), the Script call loads it.
    admin = redis.Redis.from_url(redis_server.url)
    try:
        admin.script_flush()
    finally:
        admin.close()
    assert be.current_generations(tags, meanwhile=lambda: calls.append(2)) == first
    assert calls == [1, 2]
    # A failure in it propagates, and the connection whose reply was never read is not
    # handed out again: the next read gets its own reply.
    with pytest.raises(ZeroDivisionError):
        be.current_generations(tags, meanwhile=lambda: 1 / 0)
    be.invalidate_tags([f"patient:{hospital.pk}"])  # a new generation: the old reply is stale
    admin = redis.Redis.from_url(redis_server.url)
    try:
        now = [g.decode() for g in admin.mget([be.gen_prefix + t for t in tags])]
    finally:
        admin.close()
    assert now != first
    assert be.current_generations(tags) == now
