"""CDN purges: a deploy's changed and removed URLs, batched per provider, retried, reported.

:func:`manifest_diff` turns two ``staticfiles.json`` manifests into the URL paths to purge: the
unhashed URL of every asset whose content changed (it now names other bytes), and both URLs of
every removed asset. Hashed URLs of changed assets need no purge: their bytes never change.

:func:`purge` sends the paths to every provider of ``HMS_TASKS_ASSETS_CDN``, in batches of the
provider's ``batch_size`` (its documented per-call limit by default):

- Cloudflare: ``POST {api_base}/zones/{zone_id}/purge_cache`` with ``{"files": [url, ...]}``;
- CloudFront: ``POST {api_base}/2020-05-31/distribution/{id}/invalidation``, one invalidation per
  batch (an ``InvalidationBatch`` document whose ``CallerReference`` is derived from the batch,
  so a retried call cannot create a second invalidation), signed with botocore's SigV4;
- Fastly: ``POST {api_base}/service/{service_id}/purge`` with ``{"surrogate_keys": [...]}``
  (``mode="surrogate_key"``) or ``POST {api_base}/purge/<host><path>`` per URL (``mode="url"``).

Each request goes to the canonical form of an URL the ``HMS_TASKS_ASSETS_CDN_ALLOWLIST`` allows
(checked before every call), through aiohttp with :class:`hms_tasks.netguard.PinnedResolver`,
without proxies from the environment and without following redirects. 429, 5xx, timeouts and
connection errors are retried up to ``HMS_TASKS_ASSETS_PURGE_ATTEMPTS`` times, waiting what the
answer's ``Retry-After`` says (seconds or an HTTP date), else 0.5 s doubling; a ``Retry-After``
longer than ``HMS_TASKS_ASSETS_PURGE_MAX_WAIT`` ends that provider's purge at once. Other 4xx are
permanent. A provider stops at its first failed batch; the others go on.

Credentials come from the settings or the environment (:meth:`settings._Provider.secret`) and
go only into request headers: reports, logs and task results carry counts, statuses and the
providers' purge ids, never a header, a token or a URL.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict, cast
from urllib.parse import quote, urlsplit

import aiohttp
from botocore.auth import SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.credentials import Credentials  # type: ignore[import-untyped]

from hms_tasks import netguard, store
from hms_tasks.allowlist import allowed
from hms_tasks.assets import keys, settings
from hms_tasks.errors import ConfigurationError

__all__ = [
    "VERSION",
    "ProviderReport",
    "PurgeReport",
    "last_reports",
    "manifest_diff",
    "purge",
    "valid_path",
]

logger = logging.getLogger(__name__)

VERSION = 1
#: Paths one purge takes at most.
MAX_PATHS = 100_000
_PATH_RE = re.compile(r"^/[\x21-\x7e]{0,2047}$")
_CF_NS = "http://cloudfront.amazonaws.com/doc/2020-05-31/"


class ProviderReport(TypedDict):
    provider: str
    status: Literal["ok", "failed", "skipped"]
    urls: int
    purged: int
    calls: int
    retries: int
    batches: int
    #: Purge or invalidation ids the provider returned (not secrets).
    ids: list[str]
    error: str | None
    duration_s: float


class PurgeReport(TypedDict):
    version: int
    at: float
    urls: int
    providers: dict[str, ProviderReport]


def valid_path(value: object) -> bool:
    """An absolute URL path of printable ASCII without a query or fragment."""
    return (isinstance(value, str) and bool(_PATH_RE.match(value)) and "?" not in value
            and "#" not in value)


def manifest_diff(old: Mapping[str, str], new: Mapping[str, str], *,
                  static_url: str = "/static/") -> dict[str, list[str]]:
    """The URL paths a deploy from manifest ``old`` to ``new`` (asset name -> hashed name)
    makes stale: ``changed`` (unhashed URLs of assets whose hash changed) and ``removed``
    (unhashed and hashed URLs of assets that are gone)."""
    base = static_url if static_url.endswith("/") else static_url + "/"
    changed = sorted(base + quote(n) for n in new if n in old and old[n] != new[n])
    removed = sorted({base + quote(n) for n in old if n not in new}
                     | {base + quote(old[n]) for n in old if n not in new})
    return {"changed": changed, "removed": removed}


# -- one provider's calls ----------------------------------------------------------------------


@dataclass
class _Call:
    method: str
    url: str
    body: bytes
    headers: dict[str, str]
    #: Re-signs the call before each attempt (CloudFront's signature carries a time).
    sign: Any = None
    size: int = 0


class _Stop(Exception):
    """A batch that failed for good: ends the provider's purge."""


@dataclass
class _Run:
    s: settings.AssetsSettings
    session: aiohttp.ClientSession
    report: ProviderReport
    ids: list[str] = field(default_factory=list)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


async def _send(run: _Run, call: _Call) -> tuple[int, bytes]:
    """One call with its retries; returns (status, body) of a 2xx answer or raises _Stop."""
    s = run.s
    target = allowed(call.url, s.assets_cdn_allowlist)
    if target is None:
        raise _Stop("the API URL is not allowed by HMS_TASKS_ASSETS_CDN_ALLOWLIST")
    delay = 0.5
    for attempt in range(1, s.assets_purge_attempts + 1):
        headers = call.sign(target.url) if call.sign else call.headers
        run.report["calls"] += 1
        wait: float | None = None
        try:
            async with run.session.request(call.method, target.url, data=call.body,
                                           headers=headers, allow_redirects=False) as resp:
                status = resp.status
                body = await resp.read()
                wait = _retry_after(resp.headers.get("Retry-After"))
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, netguard.ForbiddenAddress):
                raise _Stop("the API host resolves only to addresses it may not lead to"
                            ) from None
            status, body, problem = 0, b"", f"unreachable ({type(exc).__name__})"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            status, body, problem = 0, b"", f"unreachable ({type(exc).__name__})"
        if 200 <= status < 300:
            return status, body
        if status:
            problem = f"HTTP {status}"
        if status and status != 429 and status < 500:
            raise _Stop(problem if not 300 <= status < 400 else
                        f"{problem}: a redirect (never followed)")
        if attempt == s.assets_purge_attempts:
            raise _Stop(f"{problem} after {attempt} attempts")
        if wait is None:
            wait, delay = delay, delay * 2
        if wait > s.assets_purge_max_wait:
            raise _Stop(f"{problem} with a Retry-After beyond HMS_TASKS_ASSETS_PURGE_MAX_WAIT")
        run.report["retries"] += 1
        logger.info("purge at %s: %s, retrying in %.1f s", run.report["provider"], problem, wait)
        await asyncio.sleep(wait)
    raise AssertionError("unreachable")


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _cloudflare(p: settings.Cloudflare, batch: Sequence[str]) -> _Call:
    token = p.secret("token")
    if not token:
        raise _Stop("no API token (HMS_TASKS_ASSETS_CDN['cloudflare']['token'] or"
                    f" ${p.token_env})")
    site = p.site_url.rstrip("/")
    return _Call("POST", f"{p.api_base}/zones/{p.zone_id}/purge_cache",
                 json.dumps({"files": [site + path for path in batch]}).encode(),
                 {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                 size=len(batch))


def _cloudfront(p: settings.CloudFront, batch: Sequence[str]) -> _Call:
    key_id, secret = p.secret("access_key_id"), p.secret("secret_access_key")
    if not key_id or not secret:
        raise _Stop("no AWS credentials (HMS_TASKS_ASSETS_CDN['cloudfront'] access_key_id and"
                    f" secret_access_key, or ${p.access_key_id_env} and"
                    f" ${p.secret_access_key_env})")
    root = ET.Element("InvalidationBatch", xmlns=_CF_NS)
    paths = ET.SubElement(root, "Paths")
    ET.SubElement(paths, "Quantity").text = str(len(batch))
    items = ET.SubElement(paths, "Items")
    for path in batch:
        ET.SubElement(items, "Path").text = path
    # The same batch gives the same reference: CloudFront answers a repeated call with the
    # invalidation it already made instead of a second one.
    ET.SubElement(root, "CallerReference").text = "hms-" + hashlib.sha256(
        "\n".join(batch).encode()).hexdigest()[:40]
    body = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    credentials = Credentials(key_id, secret)

    def sign(url: str) -> dict[str, str]:
        request = AWSRequest(method="POST", url=url, data=body,
                             headers={"Content-Type": "text/xml"})
        SigV4Auth(credentials, "cloudfront", "us-east-1").add_auth(request)
        return dict(request.headers.items())

    return _Call("POST", f"{p.api_base}/2020-05-31/distribution/{p.distribution_id}/invalidation",
                 body, {}, sign=sign, size=len(batch))


def _fastly(p: settings.Fastly, batch: Sequence[str]) -> _Call:
    token = p.secret("token")
    if not token:
        raise _Stop(f"no API token (HMS_TASKS_ASSETS_CDN['fastly']['token'] or ${p.token_env})")
    headers = {"Fastly-Key": token, "Accept": "application/json"}
    if p.mode == "url":
        site = urlsplit(p.site_url or "")
        return _Call("POST", f"{p.api_base}/purge/{site.netloc}{batch[0]}", b"", headers,
                     size=1)
    return _Call("POST", f"{p.api_base}/service/{p.service_id}/purge",
                 json.dumps({"surrogate_keys": list(batch)}).encode(),
                 {**headers, "Content-Type": "application/json"}, size=len(batch))


def _ids(provider: str, body: bytes) -> list[str]:
    """The purge ids an answer carries (and whether it says success), per provider."""
    if provider == "cloudfront":
        try:
            # An allowlisted API's answer; expat expands no external entities and caps
            # entity amplification (Python 3.11 ships expat >= 2.4).
            node = ET.fromstring(body).find(f"{{{_CF_NS}}}Id")  # noqa: S314
        except ET.ParseError:
            raise _Stop("CloudFront answered something that is not an Invalidation") from None
        return [node.text] if node is not None and node.text else []
    doc = _json(body)
    if provider == "cloudflare":
        if not isinstance(doc, dict) or doc.get("success") is not True:
            raise _Stop("Cloudflare answered success=false")
        result = doc.get("result") or {}
        return [str(result["id"])] if isinstance(result, dict) and "id" in result else []
    if isinstance(doc, dict):
        # surrogate keys: {key: purge_id}; a URL purge: {"status": "ok", "id": ...}
        if "id" in doc:
            return [str(doc["id"])]
        return [str(v) for v in doc.values() if isinstance(v, str)]
    return []


async def _provider(name: str, p: settings.Provider, paths: Sequence[str],
                    s: settings.AssetsSettings) -> ProviderReport:
    report = ProviderReport(provider=name, status="ok", urls=len(paths), purged=0, calls=0,
                            retries=0, batches=0, ids=[], error=None, duration_s=0.0)
    t0 = time.perf_counter()
    size = 1 if isinstance(p, settings.Fastly) and p.mode == "url" else p.batch_size
    connector = aiohttp.TCPConnector(resolver=netguard.PinnedResolver(), limit=4)
    try:
        async with aiohttp.ClientSession(
            connector=connector, trust_env=False,
            timeout=aiohttp.ClientTimeout(total=s.assets_purge_timeout),
            headers={"User-Agent": "hms-tasks-assets/1"},
        ) as session:
            run = _Run(s, session, report)
            for i in range(0, len(paths), size):
                batch = paths[i:i + size]
                if isinstance(p, settings.Cloudflare):
                    call = _cloudflare(p, batch)
                elif isinstance(p, settings.CloudFront):
                    call = _cloudfront(p, batch)
                else:
                    call = _fastly(p, batch)
                _, body = await _send(run, call)
                report["ids"].extend(_ids(name, body)[:10])
                report["batches"] += 1
                report["purged"] += call.size
    except _Stop as stop:
        report["status"], report["error"] = "failed", str(stop)
    report["ids"] = report["ids"][:100]
    report["duration_s"] = round(time.perf_counter() - t0, 3)
    return report


# -- the purge ---------------------------------------------------------------------------------


def purge(paths: Iterable[str], *, providers: Sequence[str] | None = None,
          now: float | None = None) -> PurgeReport:
    """Purge ``paths`` (absolute URL paths, deduplicated) at every configured provider, or at
    the named ``providers`` (ConfigurationError for one not configured); all providers at once.

    Writes each provider's report to ``<p>:assets:purge:<provider>`` and the summary to
    ``<p>:assets:purges`` (capped). Idempotent: a purge purges again, and CloudFront answers a
    repeated batch with the invalidation it made before."""
    s = settings.get()
    configured = s.providers()
    chosen = list(configured) if providers is None else list(providers)
    for name in chosen:
        if name not in configured:
            raise ConfigurationError(
                f"HMS_TASKS_ASSETS_CDN has no provider {name!r} configured; configured:"
                f" {', '.join(configured) or 'none'} (known: {', '.join(settings.PROVIDERS)})")
    unique = sorted(set(paths))
    if not all(valid_path(p) for p in unique):
        raise ValueError("paths: every path must be an absolute URL path like /static/app.js")
    if len(unique) > MAX_PATHS:
        raise ValueError(f"paths: at most {MAX_PATHS} per purge")

    async def everyone() -> list[ProviderReport]:
        return list(await asyncio.gather(*(_provider(n, configured[n], unique, s)
                                           for n in chosen)))

    reports = asyncio.run(everyone()) if unique else []
    doc = PurgeReport(version=VERSION, at=time.time() if now is None else now, urls=len(unique),
                      providers={r["provider"]: r for r in reports})
    pipe = store.client().pipeline(transaction=True)
    for r in reports:
        pipe.set(keys.purge(r["provider"]), json.dumps(r, separators=(",", ":")))
    pipe.lpush(keys.purges(), json.dumps(doc, separators=(",", ":")))
    pipe.ltrim(keys.purges(), 0, keys.PURGES_KEPT - 1)
    pipe.execute()
    for r in reports:
        log = logger.info if r["status"] == "ok" else logger.warning
        log("purge at %s: %s, %d of %d URLs in %d calls (%d retries)%s", r["provider"],
            r["status"], r["purged"], r["urls"], r["calls"], r["retries"],
            f": {r['error']}" if r["error"] else "")
    return doc


def last_reports() -> dict[str, ProviderReport]:
    """The last purge report of each provider."""
    client = store.client()
    out: dict[str, ProviderReport] = {}
    for name in settings.PROVIDERS:
        doc = cast("str | None", client.get(keys.purge(name)))
        if doc:
            out[name] = cast(ProviderReport, json.loads(doc))
    return out
