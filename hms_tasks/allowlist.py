"""URL allowlists: outbound requests (alert webhooks) go only to URLs a setting lists.

An allowlist entry is an ``http://`` or ``https://`` URL. A URL is allowed when its scheme, host
and port equal the entry's (hosts compared case-insensitively, IP addresses in their canonical
form via :mod:`ipaddress`, default ports filled in) and its path is the entry's path or lies
under it at a ``/`` boundary (``https://h/alerts`` allows ``https://h/alerts`` and
``https://h/alerts/ops``, never ``https://h/alerts-evil``). An entry with a query string allows
exactly that URL. URLs with credentials or fragments are refused outright.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["ParsedUrl", "parse_url", "url_allowed"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class ParsedUrl:
    scheme: str
    host: str
    port: int
    path: str
    query: str


def parse_url(url: str) -> ParsedUrl:
    """Parse and normalize an http(s) URL; raises ValueError (without quoting the URL, which
    can carry a token) when it is not one we would ever call."""
    if not isinstance(url, str) or len(url) > 2000 or any(c in url for c in " \t\r\n"):
        raise ValueError("not a URL string")
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError("scheme must be http or https")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials")
    if parts.fragment:
        raise ValueError("must have no fragment")
    host = parts.hostname or ""
    if not host:
        raise ValueError("has no host")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        host = host.lower().rstrip(".")
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise ValueError("has a bad port") from None
    return ParsedUrl(parts.scheme, host, port, parts.path or "/", parts.query)


def _under(path: str, prefix: str) -> bool:
    if path == prefix:
        return True
    base = prefix if prefix.endswith("/") else prefix + "/"
    return path.startswith(base)


def url_allowed(url: str, allowlist: Iterable[str]) -> bool:
    """Whether ``url`` is allowed by one of the ``allowlist`` entries (see the module doc)."""
    try:
        target = parse_url(url)
    except ValueError:
        return False
    for entry in allowlist:
        try:
            allowed = parse_url(entry)
        except ValueError:
            continue
        if (target.scheme, target.host, target.port) != (allowed.scheme, allowed.host,
                                                         allowed.port):
            continue
        if allowed.query:
            if (target.path, target.query) == (allowed.path, allowed.query):
                return True
        elif _under(target.path, allowed.path):
            return True
    return False
