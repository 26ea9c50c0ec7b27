"""Settings of the assets capability (``HMS_TASKS_ASSETS_*``): budgets, metafile, CDN purges.

::

    HMS_TASKS_ASSETS_BUDGETS = {"demo/status.js": 20_000}      # bytes, brotli by default
    HMS_TASKS_ASSETS_METAFILE = {"kind": "esbuild", "path": "/srv/build/meta.json"}
    HMS_TASKS_ASSETS_CDN_ALLOWLIST = ["https://api.cloudflare.com/client/v4"]
    HMS_TASKS_ASSETS_CDN = {
        "cloudflare": {"zone_id": "023e105f4ecef8ad9ca31a8372d0c353",
                       "site_url": "https://hms.example.org"},       # token: $CLOUDFLARE_API_TOKEN
    }

Every problem names the setting and field (``HMS_TASKS_ASSETS_CDN['fastly']['mode']: ...``)
and never quotes a value: a token or a URL may be a secret. Credentials are ``SecretStr``:
their repr, str and JSON are ``**********``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    SecretStr,
    model_validator,
)

from hms_tasks import conf
from hms_tasks.allowlist import parse_url, url_allowed

__all__ = [
    "PROVIDERS",
    "AssetsSettings",
    "CdnProviders",
    "CloudFront",
    "Cloudflare",
    "Fastly",
    "Metafile",
    "Provider",
    "get",
]

#: The CDN providers purges know, and the batch limit of one call of each (their documents):
#: Cloudflare purges at most 100 files per call on Free, Pro and Business and 500 on
#: Enterprise; CloudFront keeps at most 3,000 paths in progress per distribution; Fastly purges
#: at most 256 surrogate keys per call.
PROVIDERS: tuple[str, ...] = ("cloudflare", "cloudfront", "fastly")

_ENV_RE = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}$")
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _plain_url(value: str) -> str:
    try:
        parse_url(value)
    except ValueError as exc:
        raise ValueError(f"must be an http(s) URL: {exc}") from None
    return value.rstrip("/")


class _Provider(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    kind: ClassVar[str] = ""

    #: The provider's API base URL: must be allowed by HMS_TASKS_ASSETS_CDN_ALLOWLIST.
    api_base: Annotated[str, AfterValidator(_plain_url)]
    #: URLs (or keys) per API call.
    batch_size: int

    def secret(self, name: str) -> str | None:
        """A credential: the setting's value, else the named environment variable's."""
        given: SecretStr | None = getattr(self, name)
        if given is not None:
            return given.get_secret_value()
        env: str = getattr(self, f"{name}_env")
        return os.environ.get(env) or None


def _env_name(value: str) -> str:
    if not _ENV_RE.match(value):
        raise ValueError("must be an environment variable name (A-Z, 0-9, _)")
    return value


def _ident(value: str) -> str:
    if not _ID_RE.match(value):
        raise ValueError("must be 1 to 64 letters, digits, '_' or '-'")
    return value


EnvName = Annotated[str, AfterValidator(_env_name)]
Ident = Annotated[str, AfterValidator(_ident)]
SiteUrl = Annotated[str, AfterValidator(_plain_url)]


class Cloudflare(_Provider):
    """Purge by files: ``POST {api_base}/zones/{zone_id}/purge_cache`` with ``{"files": [...]}``
    (full URLs: ``site_url`` + path), ``Authorization: Bearer <token>``."""

    kind: ClassVar[str] = "cloudflare"
    api_base: Annotated[str, AfterValidator(_plain_url)] = "https://api.cloudflare.com/client/v4"
    batch_size: Annotated[int, Field(ge=1, le=500)] = 100
    zone_id: Ident
    site_url: SiteUrl
    token: SecretStr | None = None
    token_env: EnvName = "CLOUDFLARE_API_TOKEN"  # noqa: S105 (a variable name)


class CloudFront(_Provider):
    """One invalidation per batch of paths: ``POST {api_base}/2020-05-31/distribution/{id}/
    invalidation`` (an ``InvalidationBatch`` XML document), signed with AWS Signature V4."""

    kind: ClassVar[str] = "cloudfront"
    api_base: Annotated[str, AfterValidator(_plain_url)] = "https://cloudfront.amazonaws.com"
    batch_size: Annotated[int, Field(ge=1, le=3000)] = 1000
    distribution_id: Ident
    access_key_id: SecretStr | None = None
    access_key_id_env: EnvName = "AWS_ACCESS_KEY_ID"
    secret_access_key: SecretStr | None = None
    secret_access_key_env: EnvName = "AWS_SECRET_ACCESS_KEY"  # noqa: S105 (a variable name)


class Fastly(_Provider):
    """``mode="surrogate_key"``: ``POST {api_base}/service/{service_id}/purge`` with
    ``{"surrogate_keys": [...]}`` (the asset paths: :mod:`~hms_tasks.assets.serve` tags every
    asset with its path as ``Surrogate-Key``); ``mode="url"``: ``POST {api_base}/purge/<host/
    path>``, one call per URL. ``Fastly-Key: <token>``."""

    kind: ClassVar[str] = "fastly"
    api_base: Annotated[str, AfterValidator(_plain_url)] = "https://api.fastly.com"
    batch_size: Annotated[int, Field(ge=1, le=256)] = 256
    service_id: Ident
    mode: Literal["surrogate_key", "url"] = "surrogate_key"
    #: Needed in ``url`` mode: the public site whose URLs are purged.
    site_url: SiteUrl | None = None
    token: SecretStr | None = None
    token_env: EnvName = "FASTLY_API_TOKEN"  # noqa: S105 (a variable name)

    @model_validator(mode="after")
    def _url_mode_needs_site(self) -> Fastly:
        if self.mode == "url" and self.site_url is None:
            raise ValueError("mode url needs site_url")
        return self


Provider = Cloudflare | CloudFront | Fastly


class CdnProviders(BaseModel):
    """``HMS_TASKS_ASSETS_CDN``: provider name to its entry."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    cloudflare: Cloudflare | None = None
    cloudfront: CloudFront | None = None
    fastly: Fastly | None = None

    @model_validator(mode="before")
    @classmethod
    def _known(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError("must be a dict of provider names to entries")
        if any(k not in PROVIDERS for k in value):
            raise ValueError(f"unknown provider; allowed: {', '.join(PROVIDERS)}")
        return value


class Metafile(BaseModel):
    """A bundler's metafile: esbuild ``meta.json``, webpack ``stats.json``, Vite
    ``manifest.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    kind: Literal["esbuild", "webpack", "vite"]
    path: Annotated[str, Field(min_length=1, max_length=4096)]


def _allowlist_entry(value: str) -> str:
    try:
        parse_url(value)
    except ValueError as exc:
        raise ValueError(f"every entry must be an http(s) URL: {exc}") from None
    return value


# What a metrics label value may hold: the budget's asset names label its series.
_BUDGET_NAME_RE = re.compile(r"^[A-Za-z0-9_.@:+-][A-Za-z0-9_.@:/+-]{0,127}$")
_MAX_BUDGET = 1 << 34


def _budget_name(value: str) -> str:
    if not _BUDGET_NAME_RE.match(value):
        raise ValueError("budget names are static asset names like demo/status.js (up to 128"
                         " of A-Z a-z 0-9 _ . @ : / + -)")
    return value


def _budget_bytes(value: Any) -> int:
    if type(value) is not int or not 1 <= value <= _MAX_BUDGET:
        raise ValueError(f"must be a whole number of bytes from 1 to {_MAX_BUDGET}")
    return value


class AssetsSettings(conf.Settings):
    """The ``HMS_TASKS_ASSETS_*`` settings."""

    #: Per-asset budgets: the asset's name in the manifest (unhashed, as in ``{% static %}``)
    #: to its maximum size in bytes, measured in ``assets_budget_encoding``.
    assets_budgets: dict[Annotated[str, AfterValidator(_budget_name)],
                         Annotated[int, PlainValidator(_budget_bytes)]] = Field(
        default_factory=dict)
    #: Which size a budget limits: what goes over the wire to most browsers (brotli) by default.
    assets_budget_encoding: Literal["raw", "gzip", "br"] = "br"
    #: Growth against the previous analysis that is reported as a regression (0.1: 10 %).
    assets_growth_tolerance: Annotated[float, Field(ge=0, le=10)] = 0.1
    #: The bundler's metafile to analyse, or None.
    assets_metafile: Metafile | None = None
    #: Analyses kept in Redis (a capped list).
    assets_history: Annotated[int, Field(ge=1, le=10_000)] = 90
    #: Files per precompression chunk (one task each).
    assets_precompress_chunk: Annotated[int, Field(ge=1, le=10_000)] = 20
    #: The API base URLs purges may call: exact URLs or prefixes at a path boundary.
    #: (Declared before the providers: their check reads it.)
    assets_cdn_allowlist: Annotated[
        Sequence[Annotated[str, AfterValidator(_allowlist_entry)]], AfterValidator(tuple),
    ] = ()
    #: The CDN providers purges go to (each provider at most once).
    assets_cdn: CdnProviders = Field(default_factory=lambda: CdnProviders())
    #: Attempts per API call (429 and 5xx and connection errors are retried).
    assets_purge_attempts: Annotated[int, Field(ge=1, le=10)] = 4
    #: The longest Retry-After honoured (seconds); a longer one ends the provider's purge.
    assets_purge_max_wait: Annotated[float, Field(ge=0, le=300)] = 30.0
    #: Seconds one API call may take.
    assets_purge_timeout: Annotated[float, Field(ge=0.1, le=120)] = 15.0

    @model_validator(mode="after")
    def _bases_allowed(self) -> AssetsSettings:
        for name, provider in self.providers().items():
            if not url_allowed(provider.api_base, self.assets_cdn_allowlist):
                raise ValueError(f"HMS_TASKS_ASSETS_CDN[{name!r}]['api_base'] is not allowed"
                                 " by HMS_TASKS_ASSETS_CDN_ALLOWLIST")
        return self

    def providers(self) -> dict[str, Provider]:
        """The configured providers by name, in PROVIDERS order."""
        return {name: entry for name in PROVIDERS
                if (entry := getattr(self.assets_cdn, name)) is not None}


get = conf.section(AssetsSettings)
