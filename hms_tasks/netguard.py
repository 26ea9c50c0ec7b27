"""Connect only to checked addresses: a name is resolved once, and the connection goes there.

Every outbound connection hms-tasks makes on a setting's say-so (alert webhooks, health checks)
first passes its allowlist, which compares canonical URLs (:mod:`hms_tasks.allowlist`). An
allowlist names hosts, though, and a name can resolve to anything. This module decides which
addresses a name may lead to, and makes the client connect to exactly the addresses it checked,
so a second DNS answer (DNS rebinding: a short TTL and a different answer on the next query)
never reaches a socket:

- IP literals: everything but the addresses of :func:`never_contacted` (unspecified,
  ``0.0.0.0/8``, which Linux connects to the local host, link-local with the cloud metadata
  address ``169.254.169.254``, multicast, reserved, the metadata endpoints of
  :data:`METADATA`, and 6to4 or NAT64 addresses that embed one of those). A listed loopback or
  private address is allowed: the setting named it.
- Names: resolved with one ``getaddrinfo`` per connection (aiohttp keeps the checked answer in
  its DNS cache for at most 10 s within one session). Addresses that are never contacted are
  dropped, and so are loopback addresses unless the name is ``localhost`` or ends in
  ``.localhost`` (RFC 6761 keeps those on loopback, so no DNS answer moves them): any other name
  pointing at loopback is a rebinding or a mistake, and a loopback service is reached by listing
  its address. When nothing is left: :class:`ForbiddenAddress`, before any connect.
- The client then connects to exactly the kept addresses, and still sends the name in the
  ``Host`` header and as the TLS server name (certificates are checked against the name).

What this cannot do: a name an attacker's DNS answers may still point at a private address
(``10.x``) or a public one; the allowlist trusts the names it lists, so list addresses where
that matters. ``rediss://`` instances named by a host name are checked but then resolved again
by redis-py (it has no public way to connect to one address and verify the certificate against
a name): the check and the connect can see two DNS answers there.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit, urlunsplit

from aiohttp.abc import AbstractResolver, ResolveResult

from hms_tasks.allowlist import METADATA, IPAddress, never_contacted, plain_address
from hms_tasks.errors import HmsTasksError

__all__ = [
    "METADATA",
    "ForbiddenAddress",
    "PinnedResolver",
    "never_contacted",
    "open_connection",
    "pinned_redis_url",
    "resolve",
]

_NUMERIC = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV


class ForbiddenAddress(HmsTasksError, OSError):
    """A connection that is not made: the address is never contacted, or a name resolved only
    to addresses it may not lead to. Raised before any connect."""


def _local_name(host: str) -> bool:
    host = host.lower().rstrip(".")
    return host == "localhost" or host.endswith(".localhost")


def _literal(host: str) -> IPAddress | None:
    try:
        return plain_address(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


async def _getaddrinfo(host: str, port: int, family: int) -> list[tuple[IPAddress, int]]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    found: list[tuple[IPAddress, int]] = []
    for fam, _, _, _, sockaddr in infos:
        ip = plain_address(ipaddress.ip_address(sockaddr[0]))
        if (ip, fam) not in found:
            found.append((ip, fam))
    return found


async def resolve(host: str, port: int, *, family: int = socket.AF_UNSPEC) -> list[str]:
    """The addresses a connection to ``host`` may go to, resolved once (see the module doc);
    :class:`ForbiddenAddress` if there are none, ``socket.gaierror`` if the name is unknown."""
    return [str(ip) for ip, _ in await _checked(host, port, family)]


async def _checked(host: str, port: int, family: int) -> list[tuple[IPAddress, int]]:
    literal = _literal(host)
    if literal is not None:
        if never_contacted(literal):
            raise ForbiddenAddress("refused an address that is never contacted (unspecified,"
                                   " link-local or cloud metadata, multicast or reserved)")
        fam = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
        return [(literal, fam)]
    local = _local_name(host)
    kept = [(ip, fam) for ip, fam in await _getaddrinfo(host, port, family)
            if not never_contacted(ip) and (local or not ip.is_loopback)]
    if not kept:
        raise ForbiddenAddress("refused a host name that resolves only to addresses it may not"
                               " lead to (loopback, link-local or cloud metadata, unspecified,"
                               " multicast or reserved)")
    return kept


class PinnedResolver(AbstractResolver):
    """An aiohttp resolver that answers with the checked addresses only (see the module doc).

    aiohttp skips the resolver for IP literals: those are checked by the allowlist
    (:func:`hms_tasks.allowlist.parse_url` refuses the addresses that are never contacted).
    """

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=str(ip), port=port, family=fam, proto=0,
                          flags=_NUMERIC)
            for ip, fam in await _checked(host, port, family)
        ]

    async def close(self) -> None:
        return None


async def open_connection(host: str, port: int) -> tuple[asyncio.StreamReader,
                                                         asyncio.StreamWriter]:
    """``asyncio.open_connection`` to a checked address of ``host`` (tried in order)."""
    error: OSError | None = None
    for address in await resolve(host, port):
        try:
            return await asyncio.open_connection(address, port)
        except OSError as exc:
            error = exc
    assert error is not None
    raise error


async def pinned_redis_url(url: str) -> str:
    """``url`` with its host replaced by a checked address (credentials, port and database
    kept), so redis-py connects exactly there. A ``rediss://`` URL naming a host keeps the name
    (its certificate is checked against it) after the check: see the module doc."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or 6379
    addresses = await resolve(host, port)
    if parts.scheme == "rediss" and _literal(host) is None:
        return url
    shown = f"[{addresses[0]}]" if ":" in addresses[0] else addresses[0]
    userinfo, at, _ = parts.netloc.rpartition("@")
    netloc = f"{userinfo}{at}{shown}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
