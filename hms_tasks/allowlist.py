"""URL allowlists: outbound requests (alert webhooks, health checks) go only where a setting says.

An allowlist entry is an ``http://`` or ``https://`` URL. A URL is allowed when its scheme, host
and port equal the entry's and its path is the entry's path or lies under it at a ``/`` boundary
(``https://h/alerts`` allows ``https://h/alerts`` and ``https://h/alerts/ops``, never
``https://h/alerts-evil``). An entry with a query string allows exactly that URL.

Both sides are compared in one canonical form (:func:`parse_url`), so that no spelling of a URL
reaches anything else than what it appears to name:

- host: IDN names become their ASCII (punycode) form with the ``idna`` codec (UTS 46 mapping:
  upper case, full-width characters), one trailing dot is dropped; IPv6 addresses take their
  compressed form, an IPv4-mapped one (``[::ffff:127.0.0.1]``) becomes the IPv4 address;
  IPv4 addresses in any other form than four decimal parts (``0x7f.1``, ``2130706433``,
  ``0177.0.0.1``, ``127.1``), which resolvers read as some address nobody wrote down, are
  refused, and so are IPv6 zone ids;
- addresses that are never a service (unspecified, ``0.0.0.0/8``, link-local with the cloud
  metadata address ``169.254.169.254``, multicast, reserved, and the other metadata endpoints
  of :data:`METADATA`) are refused even when listed;
- port: the default port is made explicit (80, 443), port 0 is refused;
- path: ``.`` and ``..`` segments are refused, raw or percent-encoded (``%2e%2e``, ``%2E.``)
  or followed by a ``;`` parameter (``..;``, which Java servers resolve), and so are encoded
  ``/`` and ``\\`` (``%2f``, ``%5c``), a raw ``\\``, and percent signs that start no escape;
  escapes of unreserved characters are decoded and the others upper-cased (RFC 3986 6.2.2);
  so the path compared is the path the server resolves;
- refused outright: user names and passwords (anything before an ``@``), fragments, any
  whitespace, control or non-ASCII character outside the host.

Messages never quote the URL: webhook URLs carry tokens.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import idna

__all__ = [
    "METADATA",
    "IPAddress",
    "ParsedUrl",
    "allowed",
    "never_contacted",
    "normalise_host",
    "normalise_path",
    "parse_url",
    "plain_address",
    "url_allowed",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Cloud metadata endpoints outside link-local: AWS over IPv6, Alibaba, Azure's wire server.
METADATA: frozenset[IPAddress] = frozenset({
    ipaddress.ip_address("fd00:ec2::254"), ipaddress.ip_address("100.100.100.200"),
    ipaddress.ip_address("168.63.129.16"),
})
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def plain_address(ip: IPAddress) -> IPAddress:
    """The IPv4 address of an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``), else ``ip``."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def never_contacted(ip: IPAddress) -> bool:
    """Whether ``ip`` is an address no check or webhook ever connects to, listed or not."""
    ip = plain_address(ip)
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.sixtofour or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if embedded is not None and never_contacted(embedded):
            return True
    elif ip in _THIS_NETWORK:
        return True
    # IPv6's reserved ranges include ::/8 and with it ::1, which is loopback.
    return (ip.is_unspecified or ip.is_link_local or ip.is_multicast
            or (ip.is_reserved and not ip.is_loopback) or ip in METADATA)


_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# WHATWG's "ends in a number": such a host is an IPv4 address to browsers and resolvers.
_NUMBER = re.compile(r"^(?:[0-9]+|0[xX][0-9A-Fa-f]*)$")


@dataclass(frozen=True)
class ParsedUrl:
    scheme: str
    host: str
    port: int
    path: str
    query: str

    @property
    def url(self) -> str:
        """The canonical URL: what was checked, and so what is requested."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = f"?{self.query}" if self.query else ""
        return f"{self.scheme}://{host}:{self.port}{self.path}{query}"


def normalise_host(host: str) -> str:
    """The canonical form of a URL's host (see the module doc); ValueError (never quoting the
    host) for one we would never contact."""
    if not host:
        raise ValueError("has no host")
    if ":" in host:
        if "%" in host:
            raise ValueError("has an IPv6 zone id (not allowed)")
        try:
            v6 = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("has a malformed IPv6 address") from None
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = v6.ipv4_mapped or v6
    else:
        name = host[:-1] if host.endswith(".") else host
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            raise ValueError("has a host that is neither an IP address nor a DNS name"
                             ) from None
        if not _NUMBER.match(name.rsplit(".", 1)[-1]):
            return name
        try:
            ip = ipaddress.IPv4Address(name)
        except ValueError:
            raise ValueError("has an IPv4 address in a non-standard form (octal, hex, one"
                             " number or fewer than four parts): write it as a.b.c.d"
                             ) from None
    if never_contacted(ip):
        raise ValueError("names an address that is never contacted (unspecified, link-local"
                         " or cloud metadata, multicast or reserved)")
    return str(ip)


def _escape(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else match.group(0).upper()


def normalise_path(path: str) -> str:
    """The canonical form of a URL path (see the module doc); ValueError for a path with dot
    segments or encoded separators, whose meaning depends on the server."""
    if not path:
        return "/"
    if not path.isascii() or any(c <= " " or c == "\x7f" or c == "\\" for c in path):
        raise ValueError("has a path with a space, control, '\\' or non-ASCII character")
    if _BAD_ESCAPE.search(path):
        raise ValueError("has a path with a '%' that starts no escape")
    path = _ESCAPE.sub(_escape, path)
    for segment in path.split("/"):
        decoded = unquote(segment)
        if decoded.split(";", 1)[0] in (".", ".."):
            raise ValueError("has a '.' or '..' path segment (also percent-encoded): write"
                             " the resolved path")
        if "/" in decoded or "\\" in decoded:
            raise ValueError("has an encoded '/' or '\\' in its path")
    return path


def parse_url(url: str) -> ParsedUrl:
    """Parse and normalise an http(s) URL; raises ValueError (without quoting the URL, which
    can carry a token) when it is not one we would ever call."""
    if not isinstance(url, str) or len(url) > 2000:
        raise ValueError("not a URL string")
    if any(c <= " " or c == "\x7f" or c == "\\" for c in url):
        raise ValueError("has a space, control character or '\\'")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("is not a valid URL (bad host or port)") from None
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError("scheme must be http or https")
    if "@" in parts.netloc:
        raise ValueError("must not carry credentials")
    if parts.fragment or url.endswith("#"):
        raise ValueError("must have no fragment")
    if not parts.query.isascii():
        raise ValueError("has a non-ASCII query (percent-encode it)")
    host = normalise_host(parts.hostname or "")
    if port == 0:
        raise ValueError("has a bad port")
    return ParsedUrl(parts.scheme, host, port or _DEFAULT_PORTS[parts.scheme],
                     normalise_path(parts.path), parts.query)


def _under(path: str, prefix: str) -> bool:
    if path == prefix:
        return True
    base = prefix if prefix.endswith("/") else prefix + "/"
    return path.startswith(base)


def allowed(url: str, allowlist: Iterable[str]) -> ParsedUrl | None:
    """The canonical form of ``url`` if one of the ``allowlist`` entries allows it, else None."""
    try:
        target = parse_url(url)
    except ValueError:
        return None
    for entry in allowlist:
        try:
            permitted = parse_url(entry)
        except ValueError:
            continue
        if (target.scheme, target.host, target.port) != (permitted.scheme, permitted.host,
                                                         permitted.port):
            continue
        if permitted.query:
            if (target.path, target.query) == (permitted.path, permitted.query):
                return target
        elif _under(target.path, permitted.path):
            return target
    return None


def url_allowed(url: str, allowlist: Iterable[str]) -> bool:
    """Whether ``url`` is allowed by one of the ``allowlist`` entries (see the module doc)."""
    return allowed(url, allowlist) is not None
