"""Assets tasks, on the ``hms.assets`` queue. The work is in plain functions
(:mod:`~hms_tasks.assets.analyze`, :mod:`~hms_tasks.assets.precompress`,
:mod:`~hms_tasks.assets.purge`); these only adapt them to Celery.

How the capability splits its work: ``analyze`` measures every collected asset in one task
(daily from beat, and after a deploy). ``precompress`` lists the hashed assets and publishes a
group of ``precompress_chunk`` tasks of ``HMS_TASKS_ASSETS_PRECOMPRESS_CHUNK`` files each, then
returns without waiting: any assets worker takes a chunk, and a lock per file keeps two writers
off one file. ``purge`` calls every configured CDN provider at once, in batches, in one task.
"""

from __future__ import annotations

from typing import Annotated, Any

import redis
from celery import group
from pydantic import Field

from hms_tasks.assets import analysis, compression, names, settings
from hms_tasks.assets import cdn as purging
from hms_tasks.base import Capability
from hms_tasks.params import satisfies

__all__ = ["analyze", "assets", "precompress_all", "precompress_chunk", "purge"]

# Below the 150 s visibility timeout: a purge waits at most HMS_TASKS_ASSETS_PURGE_MAX_WAIT
# per retry, a chunk of 20 files at brotli 11 takes some seconds per MB.
assets = Capability(name="assets", soft_time_limit=100, time_limit=120,
                    autoretry_for=(redis.ConnectionError, redis.TimeoutError))

_FILE = satisfies(lambda v: isinstance(v, str) and 0 < len(v) <= 1024 and not v.startswith("/")
                  and ".." not in v.split("/"), "a file name relative to STATIC_ROOT")
_PATH = satisfies(purging.valid_path, "an absolute URL path like /static/app.js")


@assets.task(names.ASSETS_ANALYZE)
def analyze() -> dict[str, Any]:
    """Measure every hashed asset of the staticfiles manifest (raw, gzip 9, brotli 11), read
    the bundler's metafile (HMS_TASKS_ASSETS_METAFILE), check HMS_TASKS_ASSETS_BUDGETS against
    the sizes and the previous analysis.

    When: daily from beat (``assets-analyze``) and after a deploy. Takes about a second per MB
    of assets not precompressed yet (brotli 11), milliseconds otherwise. Idempotent (a re-run
    adds one more history entry). Retries Redis connection errors. Writes ``<p>:assets:latest``,
    ``<p>:assets:history`` and the series ``assets.over_budget`` / ``assets.bytes`` (alert rule
    ``assets_over_budget``). Returns totals, the budgets and the regression count.
    """
    result = analysis.analyze()
    return {"assets": len(result["assets"]), "totals": result["totals"],
            "budgets": result["budgets"], "regressions": result["regressions"]}


@assets.task(names.ASSETS_PRECOMPRESS)
def precompress_all() -> dict[str, Any]:
    """Publish one ``precompress_chunk`` per HMS_TASKS_ASSETS_PRECOMPRESS_CHUNK hashed assets.

    When: after ``collectstatic`` (a deploy). Takes milliseconds; the chunks run on any assets
    worker. Idempotent (chunks skip fresh files). Writes nothing itself. Returns the counts of
    files and chunks and the group id.
    """
    files = compression.hashed_files()
    parts = compression.chunks(files, settings.get().assets_precompress_chunk)
    result = group(precompress_chunk.s(part) for part in parts).apply_async() if parts else None
    return {"files": len(files), "chunks": len(parts),
            "group": None if result is None else result.id}


@assets.task(names.ASSETS_PRECOMPRESS_CHUNK)
def precompress_chunk(
    files: Annotated[list[Annotated[str, _FILE]], Field(max_length=10_000)],
) -> dict[str, Any]:
    """Write ``.br`` (quality 11) and ``.gz`` (level 9) beside each of ``files`` (names
    relative to STATIC_ROOT) by temporary file and rename, under a lock per file.

    When: published by ``precompress``. Takes about a second per MB (brotli 11). Idempotent:
    a sidecar not older than its file is kept; a file locked by another worker is left to it.
    Skips files whose compressed form is not smaller. Writes only files in STATIC_ROOT and the
    per-file locks. Returns counts (written, fresh, no_gain, busy, missing, bytes in and out).
    """
    return dict(compression.precompress_files(files))


@assets.task(names.ASSETS_PURGE, autoretry_for=())
def purge(
    changed: Annotated[list[Annotated[str, _PATH]], Field(max_length=purging.MAX_PATHS)],
    removed: Annotated[list[Annotated[str, _PATH]], Field(max_length=purging.MAX_PATHS)]
    | None = None,
) -> dict[str, Any]:
    """Purge a deploy's ``changed`` and ``removed`` URL paths (see ``manifest_diff``) at every
    provider of HMS_TASKS_ASSETS_CDN, batched per provider, 429/5xx retried per call honouring
    Retry-After (bounded by HMS_TASKS_ASSETS_PURGE_MAX_WAIT).

    When: after a deploy. Takes one round trip per batch (plus retries). Idempotent (purging
    twice is harmless). Not retried as a whole: each call retries itself. Writes
    ``<p>:assets:purge:<provider>`` and ``<p>:assets:purges``. Returns the report: per provider
    its status, counts of URLs, calls, retries and batches, purge ids and error. Never a
    credential or a URL.
    """
    return dict(purging.purge([*changed, *(removed or [])]))
