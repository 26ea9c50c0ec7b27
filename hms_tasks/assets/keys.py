"""The Redis key layout of the assets capability (a contract: docs/assets.md lists it).

- ``<p>:assets:latest``: the newest analysis (JSON, :class:`~hms_tasks.assets.analysis.Analysis`);
- ``<p>:assets:history``: compact summaries of the analyses, newest first, capped at
  ``HMS_TASKS_ASSETS_HISTORY``;
- ``<p>:assets:purge:<provider>``: the last purge report of each provider (JSON);
- ``<p>:assets:purges``: the purges' summaries, newest first, capped at :data:`PURGES_KEPT`;
- ``<p>:lock:assets.precompress:<sha1 of the file's path>``: one writer per file.
"""

from __future__ import annotations

from hms_tasks import store

__all__ = ["PURGES_KEPT", "history", "latest", "purge", "purges"]

PURGES_KEPT = 100


def latest() -> str:
    return store.key("assets", "latest")


def history() -> str:
    return store.key("assets", "history")


def purge(provider: str) -> str:
    return store.key("assets", "purge", provider)


def purges() -> str:
    return store.key("assets", "purges")
