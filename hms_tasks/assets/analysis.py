"""Bundle analysis: sizes of every collected asset, a bundler's metafile, budgets with history.

:func:`analyze` reads the manifest ``collectstatic`` wrote with Django's
``ManifestStaticFilesStorage`` (``STATIC_ROOT/staticfiles.json``: asset name -> hashed name),
measures each hashed file raw, gzip (level 9) and brotli (quality 11; a ``.gz``/``.br`` that
precompression wrote beside a file and that is not older than it is read instead of compressing
again), reads the bundler's metafile when ``HMS_TASKS_ASSETS_METAFILE`` names one, checks
``HMS_TASKS_ASSETS_BUDGETS`` and compares with the previous analysis. It stores the analysis and
a summary in Redis and writes ``assets.over_budget{asset=...}`` (1 over budget or grown past the
tolerance, else 0) and ``assets.bytes{asset=...}`` into the metrics store, where the
``assets_over_budget`` alert rule fires on it.

Metafiles (each read with the shapes its bundler writes; a shape it does not know is a
:class:`~hms_tasks.errors.ConfigurationError` naming the setting):

- esbuild ``--metafile``: ``outputs[file].inputs[module].bytesInOutput``; a module in more than
  one entry's output is duplicated (esbuild without ``--splitting`` copies shared modules);
- webpack ``--json`` stats: ``chunks`` and ``modules[].chunks``; a module in more than one chunk
  is duplicated (webpack's own runtime helpers are left out);
- Vite ``build.manifest``: entries and the chunks they import; Vite splits shared modules into
  chunks, so it reports the shared chunks and no duplicates (the manifest has no module sizes).
"""

from __future__ import annotations

import gzip
import json
import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypedDict, cast

import brotli

from hms_tasks import store
from hms_tasks.assets import keys, settings
from hms_tasks.errors import ConfigurationError

__all__ = [
    "VERSION",
    "Analysis",
    "AssetSizes",
    "Budget",
    "Bundle",
    "analyze",
    "compressed_sizes",
    "history",
    "latest",
    "load_manifest",
    "manifest_path",
    "read_metafile",
    "static_root",
]

logger = logging.getLogger(__name__)

VERSION = 1
MANIFEST_NAME = "staticfiles.json"
#: Largest inputs listed per bundle.
TOP_INPUTS = 10
Encoding = Literal["raw", "gzip", "br"]


class AssetSizes(TypedDict):
    name: str
    file: str
    raw: int
    gzip: int
    br: int


class Budget(TypedDict):
    asset: str
    encoding: str
    limit: int
    size: int | None
    over: bool
    previous: int | None
    growth: float | None
    regressed: bool


class Input(TypedDict):
    module: str
    bytes: int | None


class Bundle(TypedDict):
    name: str
    files: list[str]
    bytes: int | None
    inputs: int
    largest_inputs: list[Input]
    imports: list[str]


class Duplicate(TypedDict):
    module: str
    bundles: list[str]
    bytes: int | None


class MetafileReport(TypedDict):
    kind: str
    bundles: list[Bundle]
    duplicates: list[Duplicate]
    shared: list[str]


class Analysis(TypedDict):
    version: int
    at: float
    assets: list[AssetSizes]
    totals: dict[str, int]
    budgets: list[Budget]
    metafile: MetafileReport | None
    regressions: int


# -- the manifest and sizes --------------------------------------------------------------------


def static_root(root: str | Path | None = None) -> Path:
    """``root``, else Django's ``STATIC_ROOT``; ConfigurationError if neither is set."""
    if root is not None:
        return Path(root)
    from django.conf import settings as django_settings

    configured = getattr(django_settings, "STATIC_ROOT", None)
    if not configured:
        raise ConfigurationError("STATIC_ROOT is not set: the assets capability reads what"
                                 " collectstatic wrote there")
    return Path(configured)


def manifest_path(root: str | Path | None = None) -> Path:
    return static_root(root) / MANIFEST_NAME


def load_manifest(path: Path) -> dict[str, str]:
    """Asset name -> hashed name from a ``staticfiles.json``; ConfigurationError when it is
    missing or not one."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigurationError(f"no staticfiles manifest at {path}: run collectstatic with"
                                 " ManifestStaticFilesStorage first") from None
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"the staticfiles manifest at {path} is unreadable"
                                 f" ({type(exc).__name__})") from None
    paths = doc.get("paths") if isinstance(doc, dict) else None
    if not isinstance(paths, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in paths.items()):
        raise ConfigurationError(f"{path} is not a ManifestStaticFilesStorage manifest"
                                 " (no 'paths' object of names to hashed names)")
    return dict(paths)


def _fresh(sidecar: Path, source: Path) -> bool:
    try:
        return sidecar.stat().st_mtime >= source.stat().st_mtime
    except FileNotFoundError:
        return False


def compressed_sizes(path: Path) -> tuple[int, int, int]:
    """(raw, gzip, brotli) bytes of ``path``; a fresh ``.gz``/``.br`` beside it is measured
    instead of compressing again (precompression skips files that do not shrink: then the
    compressed size is what compressing gives, which is not smaller than raw)."""
    data = path.read_bytes()
    gz = path.with_name(path.name + ".gz")
    br = path.with_name(path.name + ".br")
    gz_size = gz.stat().st_size if _fresh(gz, path) else len(
        gzip.compress(data, compresslevel=9, mtime=0))
    br_size = br.stat().st_size if _fresh(br, path) else len(brotli.compress(data, quality=11))
    return len(data), gz_size, br_size


# -- metafiles ---------------------------------------------------------------------------------


def _shape_error(kind: str) -> ConfigurationError:
    return ConfigurationError(f"HMS_TASKS_ASSETS_METAFILE: the file is not an {kind} metafile"
                              " of a known shape")


def _esbuild(doc: Mapping[str, Any]) -> MetafileReport:
    outputs = doc.get("outputs")
    if not isinstance(outputs, dict):
        raise _shape_error("esbuild")
    bundles: list[Bundle] = []
    seen: dict[str, list[str]] = defaultdict(list)
    module_bytes: dict[str, int] = {}
    for out, meta in outputs.items():
        if not isinstance(meta, dict) or out.endswith(".map"):
            continue
        inputs = meta.get("inputs") or {}
        if not isinstance(inputs, dict):
            raise _shape_error("esbuild")
        name = str(meta.get("entryPoint") or out)
        sizes = {m: int(v.get("bytesInOutput", 0)) for m, v in inputs.items()
                 if isinstance(v, dict)}
        for module, size in sizes.items():
            if size > 0:
                seen[module].append(name)
                module_bytes[module] = max(size, module_bytes.get(module, 0))
        bundles.append(Bundle(
            name=name, files=[out], bytes=int(meta.get("bytes", 0)), inputs=len(sizes),
            largest_inputs=[Input(module=m, bytes=b) for m, b in sorted(
                sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_INPUTS]],
            imports=[str(i.get("path")) for i in meta.get("imports", []) if isinstance(i, dict)],
        ))
    dups = [Duplicate(module=m, bundles=sorted(b), bytes=module_bytes[m])
            for m, b in seen.items() if len(b) > 1]
    return MetafileReport(kind="esbuild", bundles=bundles, shared=[],
                          duplicates=sorted(dups, key=lambda d: (-(d["bytes"] or 0), d["module"])))


def _webpack(doc: Mapping[str, Any]) -> MetafileReport:
    chunks, modules = doc.get("chunks"), doc.get("modules")
    if not isinstance(chunks, list) or not isinstance(modules, list):
        raise _shape_error("webpack")
    by_chunk: dict[Any, list[tuple[str, int]]] = defaultdict(list)
    chunk_name: dict[Any, str] = {}
    for chunk in chunks:
        if isinstance(chunk, dict):
            names = chunk.get("names") or []
            chunk_name[chunk.get("id")] = str(names[0]) if names else str(chunk.get("id"))
    dups: list[Duplicate] = []
    for module in modules:
        if not isinstance(module, dict):
            continue
        name, size = str(module.get("name")), int(module.get("size") or 0)
        in_chunks = [c for c in module.get("chunks") or [] if c in chunk_name]
        for c in in_chunks:
            by_chunk[c].append((name, size))
        # webpack repeats its small runtime helpers in every chunk by design.
        if len(in_chunks) > 1 and not name.startswith("webpack/runtime/"):
            dups.append(Duplicate(module=name, bundles=sorted(chunk_name[c] for c in in_chunks),
                                  bytes=size))
    bundles = [
        Bundle(name=chunk_name[c.get("id")], files=[str(f) for f in c.get("files") or []],
               bytes=int(c.get("size") or 0), inputs=len(by_chunk[c.get("id")]),
               largest_inputs=[Input(module=m, bytes=b) for m, b in sorted(
                   by_chunk[c.get("id")], key=lambda kv: (-kv[1], kv[0]))[:TOP_INPUTS]],
               imports=[])
        for c in chunks if isinstance(c, dict)
    ]
    return MetafileReport(kind="webpack", bundles=bundles, shared=[],
                          duplicates=sorted(dups, key=lambda d: (-(d["bytes"] or 0), d["module"])))


def _vite(doc: Mapping[str, Any], base: Path) -> MetafileReport:
    if not isinstance(doc, dict) or not all(isinstance(v, dict) and "file" in v
                                            for v in doc.values()):
        raise _shape_error("vite")
    importers: dict[str, list[str]] = defaultdict(list)
    bundles: list[Bundle] = []
    for key, entry in doc.items():
        if not entry.get("isEntry"):
            continue
        name = str(entry.get("name") or key)
        imports = [str(i) for i in entry.get("imports") or []]
        for i in imports:
            importers[i].append(name)
        files = [str(entry["file"]), *(str(c) for c in entry.get("css") or [])]
        # The manifest has no sizes; the built files are read when they lie beside it
        # (outDir/.vite/manifest.json).
        sized = [(f, _size(base / f)) for f in files]
        known = [s for _, s in sized if s is not None]
        bundles.append(Bundle(
            name=name, files=files, bytes=sum(known) if known else None, inputs=len(imports),
            largest_inputs=[Input(module=str(doc[i]["file"]) if i in doc else i,
                                  bytes=_size(base / str(doc[i]["file"])) if i in doc else None)
                            for i in imports][:TOP_INPUTS],
            imports=imports,
        ))
    shared = sorted(i for i, users in importers.items() if len(users) > 1)
    return MetafileReport(kind="vite", bundles=bundles, duplicates=[], shared=shared)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def read_metafile(spec: settings.Metafile) -> MetafileReport:
    """The bundles, their largest inputs and the duplicated modules of a metafile."""
    path = Path(spec.path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigurationError("HMS_TASKS_ASSETS_METAFILE['path']: no such file") from None
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"HMS_TASKS_ASSETS_METAFILE['path']: unreadable JSON"
                                 f" ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise _shape_error(spec.kind)
    if spec.kind == "esbuild":
        return _esbuild(doc)
    if spec.kind == "webpack":
        return _webpack(doc)
    # outDir/.vite/manifest.json (Vite 5+) or outDir/manifest.json (Vite 4).
    base = path.parent.parent if path.parent.name == ".vite" else path.parent
    return _vite(doc, base)


# -- budgets, history, the metric --------------------------------------------------------------


def latest() -> Analysis | None:
    """The newest stored analysis, or None."""
    doc = cast("str | None", store.client().get(keys.latest()))
    return cast(Analysis, json.loads(doc)) if doc else None


def history(*, last: int = 30) -> list[dict[str, Any]]:
    """Summaries of the last analyses, newest first: ``at``, ``totals``, ``budgets`` (asset ->
    size in the budget's encoding)."""
    docs = cast("list[str]", store.client().lrange(keys.history(), 0, max(1, last) - 1))
    return [json.loads(d) for d in docs]


def _budgets(sizes: dict[str, AssetSizes], previous: Mapping[str, int],
             s: settings.AssetsSettings) -> list[Budget]:
    out: list[Budget] = []
    enc = s.assets_budget_encoding
    for asset, limit in sorted(s.assets_budgets.items()):
        entry = sizes.get(asset)
        size = None if entry is None else int(entry[enc])
        before = previous.get(asset)
        growth = None if size is None or not before else round(size / before - 1, 4)
        over = size is not None and size > limit
        out.append(Budget(asset=asset, encoding=enc, limit=limit, size=size, over=over,
                          previous=before, growth=growth,
                          regressed=over or (growth is not None
                                             and growth > s.assets_growth_tolerance)))
    return out


def analyze(*, root: str | Path | None = None, now: float | None = None,
            record: bool = True) -> Analysis:
    """Measure every hashed asset of the manifest, read the metafile, check the budgets.

    With ``record`` (the default) it stores the analysis (``<p>:assets:latest``), prepends its
    summary to ``<p>:assets:history`` (capped) and writes the budget series into the metrics
    store. An asset the manifest names but that is missing on disk is left out (logged)."""
    s = settings.get()
    now = time.time() if now is None else now
    base = static_root(root)
    manifest = load_manifest(base / MANIFEST_NAME)
    sizes: dict[str, AssetSizes] = {}
    for name, hashed in sorted(manifest.items()):
        try:
            raw, gz, br = compressed_sizes(base / hashed)
        except FileNotFoundError:
            logger.warning("asset %s is in the manifest but not in STATIC_ROOT", name)
            continue
        sizes[name] = AssetSizes(name=name, file=hashed, raw=raw, gzip=gz, br=br)
    previous_runs = history(last=1) if record else []
    previous = previous_runs[0]["budgets"] if previous_runs else {}
    budgets = _budgets(sizes, previous, s)
    analysis = Analysis(
        version=VERSION, at=now, assets=list(sizes.values()),
        totals={enc: sum(int(a[enc]) for a in sizes.values()) for enc in ("raw", "gzip", "br")},
        budgets=budgets,
        metafile=read_metafile(s.assets_metafile) if s.assets_metafile else None,
        regressions=sum(b["regressed"] for b in budgets),
    )
    if record:
        _record(analysis, sizes, s)
    return analysis


def _record(analysis: Analysis, sizes: dict[str, AssetSizes],
            s: settings.AssetsSettings) -> None:
    enc = s.assets_budget_encoding
    summary = {"version": VERSION, "at": analysis["at"], "totals": analysis["totals"],
               "budgets": {a: int(sizes[a][enc]) for a in s.assets_budgets if a in sizes}}
    pipe = store.client().pipeline(transaction=True)
    pipe.set(keys.latest(), json.dumps(analysis, separators=(",", ":")))
    pipe.lpush(keys.history(), json.dumps(summary, separators=(",", ":")))
    pipe.ltrim(keys.history(), 0, s.assets_history - 1)
    pipe.execute()
    _signal(analysis)


def _signal(analysis: Analysis) -> None:
    """Feed the alerting: ``assets.over_budget{asset=...}`` and ``assets.bytes{asset=...}``,
    then an alert evaluation, so ``assets_over_budget`` fires (or resolves) now."""
    if not analysis["budgets"]:
        return
    try:
        from hms_tasks.celery import app
        from hms_tasks.metrics import store as ts
        from hms_tasks.metrics.names import METRICS_EVALUATE_ALERTS

        points: list[tuple[str, float, float]] = []
        for b in analysis["budgets"]:
            labels = {"asset": b["asset"]}
            points.append((ts.series_id("assets.over_budget", labels), analysis["at"],
                           1.0 if b["regressed"] else 0.0))
            if b["size"] is not None:
                points.append((ts.series_id("assets.bytes", labels), analysis["at"],
                               float(b["size"])))
        ts.write(points, now=analysis["at"])
        app.send_task(METRICS_EVALUATE_ALERTS, ignore_result=True)
    except Exception:
        # The analysis is stored; a metrics store or broker hiccup must not fail it.
        logger.warning("could not feed the asset budgets into the metrics store", exc_info=True)
