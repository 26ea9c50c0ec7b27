"""Assets: the sizes, budgets, precompression, caching and CDN purges of a HMS's static files.

The public API::

    from hms_tasks import assets

    path("static/<path:path>", assets.static_view)     # immutable hashed assets, .br/.gz
    report = assets.analyze()                          # sizes, metafile, budgets (stored)
    assets.precompress_files(["app.3f2a.js"])          # .br and .gz beside each file
    diff = assets.manifest_diff(old_manifest, new_manifest)
    assets.purge(diff["changed"] + diff["removed"])    # every configured CDN provider

Manual: ``docs/assets.md``. Modules: :mod:`.settings` (HMS_TASKS_ASSETS_*), :mod:`.analysis`,
:mod:`.compression`, :mod:`.cdn`, :mod:`.serve` (the static view), :mod:`.keys` (the Redis
key layout), :mod:`.tasks` (Celery), :mod:`.names` (task names), :mod:`.cli`
(``hms-tasks assets``).
"""

from __future__ import annotations

from hms_tasks.assets.analysis import analyze, latest, load_manifest, read_metafile
from hms_tasks.assets.cdn import last_reports, manifest_diff, purge
from hms_tasks.assets.compression import precompress_files
from hms_tasks.assets.serve import IMMUTABLE, static_view

__all__ = [
    "IMMUTABLE",
    "analyze",
    "last_reports",
    "latest",
    "load_manifest",
    "manifest_diff",
    "precompress_files",
    "purge",
    "read_metafile",
    "static_view",
]
