"""``hms-tasks assets analyze|precompress|purge|report``: sizes and budgets, precompression, CDN
purges, and what the last runs stored.

Mounted on the ``hms-tasks`` command line by :func:`hms_tasks.cli.mount`. Exit codes: 0 ok,
1 a budget regressed (``analyze``, ``report``) or a provider's purge failed (``purge``),
2 bad input: a setting out of its type or range (a budget that is not a whole number of bytes,
an API base URL not in HMS_TASKS_ASSETS_CDN_ALLOWLIST), an unknown or unconfigured provider,
a path that is not an URL path, a missing manifest. Nothing is written or contacted then.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from hms_tasks.console import fail, fmt_time, setup, table

__all__ = ["assets", "commands"]

T = TypeVar("T")


def _checked(fn: Callable[[], T]) -> T:
    """Run ``fn``; configuration and input errors exit 2 with their message."""
    from hms_tasks.errors import ConfigurationError

    try:
        return fn()
    except (ConfigurationError, ValueError) as exc:
        fail(str(exc))


def _settings() -> Any:
    from hms_tasks.assets import settings

    return _checked(settings.get)


def _kb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f}"


def _echo_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))


def _print_analysis(doc: dict[str, Any]) -> None:
    rows = [[a["name"], _kb(a["raw"]), _kb(a["gzip"]), _kb(a["br"])]
            for a in sorted(doc["assets"], key=lambda a: -a["raw"])]
    t = doc["totals"]
    rows.append(["TOTAL", _kb(t["raw"]), _kb(t["gzip"]), _kb(t["br"])])
    click.echo(table(rows, ["ASSET", "RAW_KB", "GZIP_KB", "BR_KB"]))
    if doc["budgets"]:
        click.echo("")
        click.echo(table([
            [b["asset"], b["encoding"], _kb(b["limit"]), _kb(b["size"]),
             "-" if b["growth"] is None else f"{b['growth'] * 100:+.1f}%",
             "REGRESSED" if b["regressed"] else "ok"]
            for b in doc["budgets"]], ["BUDGET", "ENCODING", "LIMIT_KB", "SIZE_KB", "GROWTH",
                                       "STATUS"]))
    meta = doc.get("metafile")
    if meta:
        click.echo(f"\n{meta['kind']} metafile: {len(meta['bundles'])} bundles")
        for b in meta["bundles"]:
            top = ", ".join(f"{i['module']} ({_kb(i['bytes'])} KB)"
                            for i in b["largest_inputs"][:3])
            click.echo(f"  {b['name']}: {_kb(b['bytes'])} KB, {b['inputs']} inputs; largest:"
                       f" {top or '-'}")
        for d in meta["duplicates"]:
            click.echo(f"  duplicated: {d['module']} ({_kb(d['bytes'])} KB) in"
                       f" {', '.join(d['bundles'])}")
        for s in meta["shared"]:
            click.echo(f"  shared chunk: {s}")


@click.group()
def assets() -> None:
    """Static assets: sizes and budgets, precompression, CDN purges (docs/assets.md)."""


@assets.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--static-root", type=click.Path(file_okay=False, path_type=Path),
              help="Read this directory instead of STATIC_ROOT.")
def analyze(as_json: bool, static_root: Path | None) -> None:
    """Measure every collected asset (raw, gzip, brotli), read the bundler's metafile, check
    the budgets, and store the analysis (exit 1 when a budget regressed)."""
    setup()
    _settings()
    from hms_tasks.assets import analysis

    doc = _checked(lambda: analysis.analyze(root=static_root))
    _echo_json(doc) if as_json else _print_analysis(dict(doc))
    if doc["regressions"]:
        sys.exit(1)


@assets.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--static-root", type=click.Path(file_okay=False, path_type=Path),
              help="Precompress this directory instead of STATIC_ROOT (in this process).")
@click.option("--dispatch", is_flag=True,
              help="Publish hms.assets.precompress: the chunks run on the assets workers.")
def precompress(as_json: bool, static_root: Path | None, dispatch: bool) -> None:
    """Write .br (quality 11) and .gz beside every hashed asset, here or on the workers."""
    setup()
    _settings()
    from hms_tasks.assets import compression as pre
    from hms_tasks.assets import names

    if dispatch:
        from hms_tasks.celery import app

        if static_root is not None:
            fail("--static-root: the workers read their own STATIC_ROOT; use one or the other")
        result = app.send_task(names.ASSETS_PRECOMPRESS)
        doc: dict[str, Any] = {"task": names.ASSETS_PRECOMPRESS, "id": result.id}
    else:
        files = _checked(lambda: pre.hashed_files(static_root))
        doc = dict(pre.precompress_files(files, root=static_root))
    if as_json:
        _echo_json(doc)
    elif dispatch:
        click.echo(f"published {doc['task']} ({doc['id']})")
    else:
        click.echo(f"{doc['files']} files: {doc['written']} written, {doc['fresh']} fresh,"
                   f" {doc['no_gain']} not smaller, {doc['busy']} busy elsewhere,"
                   f" {doc['missing']} missing")


def _manifest(path: Path) -> dict[str, str]:
    from hms_tasks.assets import analysis

    return _checked(lambda: analysis.load_manifest(path))


@assets.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--old", "old", type=click.Path(dir_okay=False, path_type=Path),
              help="The previous deploy's staticfiles.json.")
@click.option("--new", "new", type=click.Path(dir_okay=False, path_type=Path),
              help="This deploy's staticfiles.json (default: STATIC_ROOT's).")
@click.option("--path", "paths", multiple=True, metavar="PATH",
              help="A URL path to purge (repeatable), besides the manifest diff.")
@click.option("--provider", "providers", multiple=True, metavar="NAME",
              help="Only this provider (repeatable; default: every configured one).")
@click.option("--dispatch", is_flag=True, help="Publish hms.assets.purge instead.")
def purge(as_json: bool, old: Path | None, new: Path | None, paths: tuple[str, ...],
          providers: tuple[str, ...], dispatch: bool) -> None:
    """Purge a deploy's changed and removed URLs at every configured CDN provider (exit 1 when
    a provider failed)."""
    setup()
    s = _settings()
    from django.conf import settings as django_settings

    from hms_tasks.assets import analysis, names, settings
    from hms_tasks.assets import cdn as purging

    for name in providers:
        if name not in settings.PROVIDERS:
            fail(f"--provider: unknown provider; allowed: {', '.join(settings.PROVIDERS)}")
        if name not in s.providers():
            fail(f"--provider: {name} is not configured in HMS_TASKS_ASSETS_CDN")
    changed: list[str] = []
    removed: list[str] = []
    if old is not None:
        new_path = new or _checked(lambda: analysis.manifest_path())
        diff = purging.manifest_diff(_manifest(old), _manifest(new_path),
                                     static_url=str(getattr(django_settings, "STATIC_URL",
                                                            "/static/") or "/static/"))
        changed, removed = diff["changed"], diff["removed"]
    elif new is not None:
        fail("--new: needs --old (the previous deploy's manifest)")
    for p in paths:
        if not purging.valid_path(p):
            fail("--path: must be an absolute URL path like /static/app.js (no query)")
    changed += paths
    if not changed and not removed:
        fail("nothing to purge: give --old (and --new) manifests or --path")
    if dispatch:
        from hms_tasks.celery import app

        if providers:
            fail("--provider: a dispatched purge goes to every configured provider")
        result = app.send_task(names.ASSETS_PURGE, args=[changed, removed])
        doc: dict[str, Any] = {"task": names.ASSETS_PURGE, "id": result.id,
                               "urls": len(set(changed) | set(removed))}
        _echo_json(doc) if as_json else click.echo(f"published {names.ASSETS_PURGE}"
                                                   f" ({result.id}) for {doc['urls']} URLs")
        return
    report = _checked(lambda: purging.purge([*changed, *removed],
                                            providers=list(providers) or None))
    if as_json:
        _echo_json(report)
    else:
        _print_purges(dict(report["providers"]))
    if any(r["status"] == "failed" for r in report["providers"].values()):
        sys.exit(1)


def _print_purges(reports: dict[str, Any]) -> None:
    if not reports:
        click.echo("no purges yet (HMS_TASKS_ASSETS_CDN names the providers)")
        return
    click.echo(table([
        [r["provider"], r["status"], f"{r['purged']}/{r['urls']}", str(r["calls"]),
         str(r["retries"]), f"{r['duration_s']:.2f}", r["error"] or ""]
        for r in reports.values()], ["PROVIDER", "STATUS", "PURGED", "CALLS", "RETRIES",
                                     "SECONDS", "ERROR"]))


@assets.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--history", "last", default=10, show_default=True,
              type=click.IntRange(1, 1000), help="Analyses of the history shown.")
def report(as_json: bool, last: int) -> None:
    """The last analysis (sizes, budgets, metafile), the budget history and the last purge
    of each provider (exit 1 when a budget regressed)."""
    setup()
    _settings()
    from hms_tasks.assets import analysis
    from hms_tasks.assets import cdn as purging

    doc: dict[str, Any] = {"analysis": analysis.latest(), "history": analysis.history(last=last),
           "purges": purging.last_reports()}
    if as_json:
        _echo_json(doc)
    else:
        if doc["analysis"] is None:
            click.echo("no analysis yet: run `hms-tasks assets analyze`")
        else:
            click.echo(f"analysis of {fmt_time(doc['analysis']['at'])}")
            _print_analysis(dict(doc["analysis"]))
        if doc["history"]:
            click.echo("\nhistory (newest first):")
            click.echo(table([[fmt_time(h["at"]), _kb(h["totals"]["raw"]),
                               _kb(h["totals"]["br"]),
                               ", ".join(f"{a}={_kb(v)}" for a, v in h["budgets"].items())]
                              for h in doc["history"]],
                             ["AT", "RAW_KB", "BR_KB", "BUDGETED_KB"]))
        click.echo("")
        _print_purges(dict(doc["purges"]))
    if doc["analysis"] is not None and doc["analysis"]["regressions"]:
        sys.exit(1)


#: Mounted on ``hms-tasks``.
commands: list[click.Command] = [assets]
