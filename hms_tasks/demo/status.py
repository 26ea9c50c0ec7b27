"""The status page of hms-tasks itself: ``/status/`` and the JSON endpoints it reads.

The page (``templates/demo/status.html`` with ``static/demo/status.js`` and ``status.css``,
plain files: no Node at run or test time) is rendered once with hashed asset URLs
(``ManifestStaticFilesStorage``) and fetches four endpoints, each a thin view over a public
function of a capability:

- ``/status/api/services.json``: services, instances and breakers (:mod:`hms_tasks.health`);
- ``/status/api/alerts.json``: alerts pending or firing (:mod:`hms_tasks.metrics.alerts`);
- ``/status/api/cache.json``: cache hit rate per kind over 15 minutes (:mod:`hms_tasks.cache`);
- ``/status/api/loadtests.json``: the latest run of each configured load test.

Counts, names and statuses only: nothing here carries patient data. The page and the endpoints
answer ``Cache-Control: no-cache``; the assets they load are immutable (:mod:`hms_tasks.assets`).
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils.cache import patch_cache_control
from django.views.decorators.http import require_GET

__all__ = ["alerts", "cache", "loadtests", "page", "services"]


def _json(doc: Any) -> JsonResponse:
    response = JsonResponse(doc, safe=False)
    patch_cache_control(response, no_cache=True)
    return response


@require_GET
def page(request: HttpRequest) -> HttpResponse:
    response = render(request, "demo/status.html")
    patch_cache_control(response, no_cache=True)
    return response


@require_GET
def services(request: HttpRequest) -> JsonResponse:
    from hms_tasks.health import report

    rows = [{"service": r["service"], "status": r["status"], "breaker": r["breaker"],
             "latency_ms": r["latency_ms"], "checked_at": r["checked_at"],
             "instances": [{"id": i["id"], "status": i["status"], "breaker": i["breaker"]}
                           for i in r["instances"]],
             "availability_1h": r["windows"]["1h"]["availability"]}
            for r in report.status()]
    return _json({"services": rows})


@require_GET
def alerts(request: HttpRequest) -> JsonResponse:
    from hms_tasks.metrics import alerts as alerting

    active = [{"id": a["id"], "rule": a["rule"], "series": a["series"], "state": a["state"],
               "since": a["since"],
               "value": a["value"]}
              for a in alerting.states().values() if a["state"] in ("pending", "firing")]
    return _json({"alerts": sorted(active, key=lambda a: (a["state"] != "firing", a["id"]))})


@require_GET
def cache(request: HttpRequest) -> JsonResponse:
    from hms_tasks.cache.stats import cache_stats

    stats = cache_stats(window_minutes=15)
    hits = sum(k["hits"] for k in stats["kinds"].values())
    reads = hits + sum(k["misses"] for k in stats["kinds"].values())
    return _json({"window_minutes": stats["window_minutes"],
                  "hit_rate": round(hits / reads, 4) if reads else None, "reads": reads,
                  "kinds": stats["kinds"]})


@require_GET
def loadtests(request: HttpRequest) -> JsonResponse:
    from hms_tasks.loadtest import keys, settings

    runs = []
    for test in sorted(settings.get().loadtest_tests):
        last = keys.history(test, last=1)
        doc = keys.report(last[0]) if last else None
        if doc is None:
            runs.append({"test": test, "run": None})
            continue
        total = doc.get("total") or {}
        runs.append({"test": test, "run": last[0], "status": (doc.get("verdict") or {}).get(
            "status"), "finished_at": doc.get("merged_at"), "rps": total.get("rps"),
                     "p95_ms": total.get("p95_ms"), "requests": total.get("requests")})
    return _json({"loadtests": runs})
