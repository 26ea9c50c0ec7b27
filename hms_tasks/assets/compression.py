"""Precompression: ``.br`` (quality 11) and ``.gz`` (level 9) beside each hashed asset.

The work is split into chunks of ``HMS_TASKS_ASSETS_PRECOMPRESS_CHUNK`` files
(:func:`chunks`), one task each, so every assets worker takes some (brotli at quality 11 runs
at about 1 MB/s per core: one process would take minutes for a large bundle set).

Per file and encoding (:func:`precompress_file`):

- **one writer per file**: a Redis lock per file (``<p>:lock:assets.precompress:<sha1>``,
  :func:`hms_tasks.store.lock`) taken without waiting; a file whose lock another worker holds is
  left to it (``busy``);
- **atomic**: the output goes to a temporary file in the same directory, then ``os.replace``
  puts it in place, so a reader never sees half a file, even when the lock expired;
- **idempotent**: a ``.br``/``.gz`` not older than its source is kept (``fresh``); hashed names
  change with their content, so a fresh sidecar is the right one;
- **only what shrinks**: when the compressed form is not smaller than the file (images,
  fonts, tiny files) nothing is written and a stale sidecar is removed (``no_gain``), so the
  server never sends a compressed file larger than the original.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import TypedDict

import brotli
import redis

from hms_tasks import store
from hms_tasks.assets import analysis

__all__ = ["LOCK_TTL", "SUFFIXES", "ChunkSummary", "chunks", "hashed_files",
           "precompress_file", "precompress_files"]

#: Seconds the lock of one file lives: far above brotli 11 on a 10 MB file (about 10 s).
LOCK_TTL = 120.0
SUFFIXES = (".br", ".gz")
#: Files that are compressed already: precompressing them only costs CPU.
_SKIP = (".br", ".gz", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".avif", ".woff", ".woff2",
         ".zip", ".mp4", ".webm")


class ChunkSummary(TypedDict):
    files: int
    written: int
    fresh: int
    no_gain: int
    busy: int
    missing: int
    bytes_in: int
    bytes_out: int


def hashed_files(root: str | Path | None = None) -> list[str]:
    """The hashed files of the manifest, relative to STATIC_ROOT, without precompressed ones."""
    base = analysis.static_root(root)
    manifest = analysis.load_manifest(base / analysis.MANIFEST_NAME)
    return sorted({h for h in manifest.values() if not h.lower().endswith(_SKIP)})


def chunks(files: Sequence[str], size: int) -> list[list[str]]:
    """``files`` in chunks of at most ``size``."""
    return [list(files[i:i + size]) for i in range(0, len(files), size)]


def _compress(data: bytes, suffix: str) -> bytes:
    if suffix == ".br":
        return bytes(brotli.compress(data, quality=11))
    return gzip.compress(data, compresslevel=9, mtime=0)


def _write_atomic(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def precompress_file(path: Path) -> Counter[str]:
    """Write ``path.br`` and ``path.gz`` (see the module doc); counts of what happened."""
    counts: Counter[str] = Counter()
    lock = store.lock("assets.precompress:" + hashlib.sha1(
        str(path.resolve()).encode(), usedforsecurity=False).hexdigest(), ttl=LOCK_TTL)
    if not lock.acquire(blocking=False):
        counts["busy"] += 1
        return counts
    try:
        try:
            stat = path.stat()
        except FileNotFoundError:
            counts["missing"] += 1
            return counts
        data: bytes | None = None
        for suffix in SUFFIXES:
            target = path.with_name(path.name + suffix)
            try:
                if target.stat().st_mtime >= stat.st_mtime:
                    counts["fresh"] += 1
                    continue
            except FileNotFoundError:
                pass
            if data is None:
                data = path.read_bytes()
                counts["bytes_in"] += len(data)
            out = _compress(data, suffix)
            if len(out) >= len(data):
                target.unlink(missing_ok=True)
                counts["no_gain"] += 1
                continue
            _write_atomic(target, out)
            counts["written"] += 1
            counts["bytes_out"] += len(out)
    finally:
        # Expired and maybe taken over: then it is not ours to free any more.
        with suppress(redis.exceptions.LockError):
            lock.release()
    return counts


def precompress_files(files: Iterable[str], *, root: str | Path | None = None) -> ChunkSummary:
    """Precompress ``files`` (names relative to STATIC_ROOT; names that leave it are refused
    with ValueError); the counts of one chunk."""
    base = analysis.static_root(root).resolve()
    total: Counter[str] = Counter()
    for name in files:
        path = (base / name).resolve()
        if not path.is_relative_to(base):
            raise ValueError("files: every name must lie inside STATIC_ROOT")
        total["files"] += 1
        total.update(precompress_file(path))
    return ChunkSummary(files=total["files"], written=total["written"], fresh=total["fresh"],
                        no_gain=total["no_gain"], busy=total["busy"], missing=total["missing"],
                        bytes_in=total["bytes_in"], bytes_out=total["bytes_out"])
