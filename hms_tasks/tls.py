"""Redis over TLS (``rediss://``): certificate checks on everywhere, and one reading of the URL.

A ``rediss://`` URL configures every Redis client of hms-tasks alike, through its query:

``ssl_ca_certs=/path/ca.pem``  the CA bundle that signs the server's certificate (default: the
                               system's trust store)
``ssl_cert_reqs=required``     the default; ``none`` and ``optional`` turn verification off
``ssl_check_hostname=true``    the default; ``false`` accepts any name the CA signed
``ssl_certfile``/``ssl_keyfile``  a client certificate, when Redis asks for one

The clients read that query differently, so this module is the one place it is read:

- redis-py (:mod:`hms_tasks.store`, Django's and hms-tasks' cache backends) verifies by default,
  but takes only the spellings ``required``/``optional``/``none``: :func:`normalized_url`
  rewrites Celery's ``CERT_REQUIRED`` spellings to them.
- kombu, the broker, falls back to **no verification** (a warning only) for a ``rediss://`` URL
  without SSL options, and Celery's result backend refuses one without ``ssl_cert_reqs``: the
  Celery configuration gets ``broker_use_ssl`` and ``redis_backend_use_ssl`` built from the
  URL's query by :func:`celery_ssl` (unless the Django settings name them), and the URL without
  that query, so broker and backend verify alike.

Turning verification off (``none``, ``optional``, ``ssl_check_hostname=false``, or a
``rediss://`` broker left with kombu's insecure default) is refused at start-up
(:func:`problems`, run by the worker, beat, ``hms-tasks check`` and ``dispatch``) and by the
store's client factory, unless ``HMS_TASKS_REDIS_ALLOW_INSECURE_TLS = True``. Messages name the
setting, never the URL (it may carry a password).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from hms_tasks import conf
from hms_tasks.errors import ConfigurationError

__all__ = [
    "TlsSettings",
    "celery_ssl",
    "get",
    "normalized_url",
    "problems",
    "refuse_insecure",
]


class TlsSettings(conf.Settings):
    """The ``HMS_TASKS_*`` settings of Redis TLS."""

    #: Allow ``rediss://`` without certificate verification (``ssl_cert_reqs=none`` or
    #: ``optional``, ``ssl_check_hostname=false``). Off: such a URL stops start-up. Anyone on
    #: the path can then read and change every message, result and cached value.
    redis_allow_insecure_tls: bool = False


get = conf.section(TlsSettings)

_CERT_REQS: dict[str, ssl.VerifyMode] = {
    "required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE,
}
_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_UNKNOWN = "ssl_cert_reqs must be required, optional or none"


def _cert_reqs(value: object) -> ssl.VerifyMode | None:
    """``required``/``CERT_REQUIRED``/``ssl.CERT_REQUIRED`` -> the constant; None if unknown."""
    if isinstance(value, ssl.VerifyMode):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return ssl.VerifyMode(value)
        except ValueError:
            return None
    if isinstance(value, str):
        return _CERT_REQS.get(value.strip().lower().removeprefix("cert_"))
    return None


def _is_tls(url: str) -> bool:
    return urlsplit(url).scheme == "rediss"


def _ssl_query(url: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The URL's query split in (other parameters, ``ssl_*`` parameters)."""
    rest: list[tuple[str, str]] = []
    tls: dict[str, str] = {}
    for name, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if name.startswith("ssl_"):
            tls[name] = value
        else:
            rest.append((name, value))
    return rest, tls


def _with_query(url: str, query: list[tuple[str, str]]) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query=urlencode(query)))


def normalized_url(url: str) -> str:
    """``url`` with ``ssl_cert_reqs`` spelled as redis-py takes it (``CERT_NONE`` -> ``none``);
    every other URL unchanged."""
    if not _is_tls(url):
        return url
    rest, tls = _ssl_query(url)
    reqs = _cert_reqs(tls.get("ssl_cert_reqs")) if "ssl_cert_reqs" in tls else None
    if reqs is None:
        return url
    tls["ssl_cert_reqs"] = {v: k for k, v in _CERT_REQS.items()}[reqs]
    return _with_query(url, [*rest, *tls.items()])


def celery_ssl(url: str) -> tuple[str, dict[str, Any] | None]:
    """For a Celery broker or backend URL: (the URL without its ``ssl_*`` query, the SSL
    options for ``broker_use_ssl`` / ``redis_backend_use_ssl``); (url, None) for ``redis://``.

    Verification is on unless the query turns it off; an unknown ``ssl_cert_reqs`` spelling is
    passed on as it is, for :func:`problems` to name and Celery to refuse.
    """
    if not _is_tls(url):
        return url, None
    rest, tls = _ssl_query(url)
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if "ssl_cert_reqs" in tls:
        options["ssl_cert_reqs"] = _cert_reqs(tls["ssl_cert_reqs"]) or tls["ssl_cert_reqs"]
    for name in _FILES:
        if tls.get(name):
            options[name] = tls[name]
    if "ssl_check_hostname" in tls:
        options["ssl_check_hostname"] = tls["ssl_check_hostname"].strip().lower() not in (
            "false", "0", "no", "off")
    return _with_query(url, rest), options


def _insecurity(options: Mapping[str, Any]) -> str | None:
    """Why these SSL options do not verify the server (None: they do)."""
    reqs = options.get("ssl_cert_reqs", ssl.CERT_REQUIRED)
    mode = _cert_reqs(reqs)
    if mode is None:
        return _UNKNOWN
    if mode != ssl.CERT_REQUIRED:
        return f"ssl_cert_reqs={'none' if mode == ssl.CERT_NONE else 'optional'} turns" \
               " certificate verification off"
    check = options.get("ssl_check_hostname", True)
    if isinstance(check, str):
        check = check.strip().lower() not in ("false", "0", "no", "off")
    if not check:
        return "ssl_check_hostname=false accepts a certificate for any name"
    return None


def _url_insecurity(url: str) -> str | None:
    if not _is_tls(url):
        return None
    return _insecurity(_ssl_query(url)[1])


_ALLOW = "set HMS_TASKS_REDIS_ALLOW_INSECURE_TLS = True to allow it"


def refuse_insecure(url: str) -> None:
    """Raise :class:`ConfigurationError` for a ``rediss://`` URL that does not verify the
    server, unless allowed (the store calls this before it builds a client)."""
    why = _url_insecurity(url)
    if why == _UNKNOWN:
        raise ConfigurationError(f"a Redis URL of hms-tasks: {why}")
    if why is not None and not get().redis_allow_insecure_tls:
        raise ConfigurationError(f"a Redis URL of hms-tasks: {why}; {_ALLOW}")


def _celery_insecurity(url: object, options: object, *, broker: bool) -> str | None:
    if not isinstance(url, str) or not _is_tls(url):
        return None
    in_url = _ssl_query(url)[1]
    if broker:
        # kombu takes the URL's ssl_* query instead of broker_use_ssl when there is one, and
        # with neither it connects without verification.
        if in_url:
            return _insecurity(in_url)
        if not isinstance(options, Mapping) or not options:
            return "a rediss:// URL without broker_use_ssl is not verified by kombu"
        return _insecurity(options)
    # Celery's backend lays the URL's query over redis_backend_use_ssl, key by key.
    merged = {**(options if isinstance(options, Mapping) else {}), **in_url}
    return _insecurity(merged)


def problems(celery_conf: Mapping[str, Any] | None = None) -> list[str]:
    """Start-up problems: every ``rediss://`` URL of hms-tasks that does not verify the server
    (unless allowed), one line each, naming the setting and never the URL."""
    from django.conf import settings

    found: list[tuple[str, str | None]] = []
    if celery_conf is not None:
        found.append(("CELERY_BROKER_URL (or REDIS_URL) with CELERY_BROKER_USE_SSL",
                      _celery_insecurity(celery_conf.get("broker_url"),
                                         celery_conf.get("broker_use_ssl"), broker=True)))
        found.append(("CELERY_RESULT_BACKEND (or REDIS_URL) with CELERY_REDIS_BACKEND_USE_SSL",
                      _celery_insecurity(celery_conf.get("result_backend"),
                                         celery_conf.get("redis_backend_use_ssl"),
                                         broker=False)))
    found.append(("HMS_TASKS_REDIS_URL (or REDIS_URL)", _url_insecurity(conf.get().redis_url)))
    for alias, cache in sorted(getattr(settings, "CACHES", {}).items()):
        location = cache.get("LOCATION")
        for url in [location] if isinstance(location, str) else list(location or ()):
            if isinstance(url, str) and _is_tls(url):
                opts = {**_ssl_query(url)[1]}
                # Django hands the URL to redis-py as it is: only its spellings work there.
                if opts.get("ssl_cert_reqs", "required") not in _CERT_REQS:
                    found.append((f"CACHES[{alias!r}]['LOCATION']", _UNKNOWN +
                                  " (in lower case: redis-py reads this URL)"))
                    continue
                for name in ("ssl_cert_reqs", "ssl_check_hostname"):
                    if name in (cache.get("OPTIONS") or {}):
                        opts.setdefault(name, cache["OPTIONS"][name])
                found.append((f"CACHES[{alias!r}]['LOCATION']", _insecurity(opts)))
    allowed = get().redis_allow_insecure_tls
    out = []
    for where, why in found:
        if why is None:
            continue
        if why.startswith(_UNKNOWN):
            out.append(f"{where}: {why}")
        elif not allowed:
            out.append(f"{where}: {why}; {_ALLOW}")
    return out
