"""Celery task names of the assets capability: contracts (beat entries and in-flight messages
name them). Import-light: clients and ``beat_schedule.py`` import this without Celery."""

from __future__ import annotations

__all__ = ["ASSETS_ANALYZE", "ASSETS_PRECOMPRESS", "ASSETS_PRECOMPRESS_CHUNK", "ASSETS_PURGE"]

#: Sizes (raw, gzip, brotli) of every collected asset, the bundler's metafile, the budgets
#: (beat ``assets-analyze``, daily; and after a deploy).
ASSETS_ANALYZE = "hms.assets.analyze"
#: Split the hashed assets into chunks and start one ``precompress_chunk`` per chunk.
ASSETS_PRECOMPRESS = "hms.assets.precompress"
#: Write ``.br`` and ``.gz`` beside each asset of one chunk.
ASSETS_PRECOMPRESS_CHUNK = "hms.assets.precompress_chunk"
#: Purge a deploy's changed and removed URLs at every configured CDN provider.
ASSETS_PURGE = "hms.assets.purge"
