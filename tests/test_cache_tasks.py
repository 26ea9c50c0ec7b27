"""The cache tasks on a real worker: warming (and splitting), the hot set, invalidation by tag,
statistics, and bad input refused with nothing written."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest
from click.testing import CliRunner

from hms_tasks import reports
from hms_tasks.cache import changes, get_or_build, names
from hms_tasks.cache.core import backend
from hms_tasks.cache.registry import get_kind
from hms_tasks.cache.tasks import invalidate_tags, stats, warm_hot, warm_patients
from hms_tasks.cli import cli
from hms_tasks.demo.cache import hot_patients
from hms_tasks.demo.models import Patient
from hms_tasks.demo.seed import seed
from hms_tasks.errors import InvalidArguments
from tests.helpers import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def ids() -> list[int]:
    seed(patients=2600, seed=9, today=date.today(), force=True)
    assert changes.flush()
    wait_for(lambda: changes.pending_entries() == 0, what="the seed's invalidation")
    return list(Patient.objects.order_by("id").values_list("id", flat=True))


def key(id_: int) -> str:
    """The patient summary's cache key (it carries today's date)."""
    return get_kind("patient").key(id_)


def cached_count(ids: list[int]) -> int:
    return len(backend().get_many([key(i) for i in ids]))


def test_warm_patients_writes_with_constant_queries(worker: Any, ids: list[int]) -> None:
    summary = warm_patients.delay(ids[:800]).get(timeout=60)
    assert summary["written"] == 800
    assert summary["missing"] == 0
    assert summary["batches"] == 1
    assert summary["queries"] == 3
    assert cached_count(ids[:800]) == 800
    report = reports.latest(names.CACHE_WARM_PATIENTS)
    assert report is not None
    assert report["summary"]["written"] == 800
    # Idempotent: again, same payloads.
    before = backend().get(key(ids[0]))
    assert warm_patients.delay(ids[:800]).get(timeout=60)["written"] == 800
    assert backend().get(key(ids[0])) == before


def test_large_sets_are_split_across_tasks(worker: Any, ids: list[int]) -> None:
    summary = warm_patients.delay(ids[:2500]).get(timeout=60)
    assert summary == {"requested": 2500, "chunks_dispatched": 3}
    wait_for(lambda: cached_count(ids[:2500]) == 2500, timeout=60, what="the chunks to land")
    runs = reports.history(names.CACHE_WARM_PATIENTS, last=10)
    assert sorted(r["summary"].get("written", 0) for r in runs) == [0, 500, 1000, 1000]


def test_warm_hot_warms_the_hot_set_and_decays_heat(worker: Any, ids: list[int]) -> None:
    hot = hot_patients(10_000)
    assert hot
    for _ in range(4):
        get_or_build("patient", ids[-1])  # a read-hot key outside the domain hot set
    heat = backend().client().zscore(backend().internal_key("heat"),
                                     backend().make_key(key(ids[-1])))
    assert heat == 4
    summary = warm_hot.delay(limit=5000).get(timeout=60)
    assert summary["patient_hot"] >= len(set(hot[:5000]))
    wait_for(lambda: cached_count(hot[:2000]) == len(hot[:2000]), timeout=60,
             what="the hot patients to be warm")
    assert backend().client().zscore(backend().internal_key("heat"),
                                     backend().make_key(key(ids[-1]))) == 2
    assert summary["census_hot"] > 0
    assert summary.get("census_written", 0) == summary["census_hot"]


def test_invalidate_tags_task(worker: Any, ids: list[int]) -> None:
    warm_patients.delay(ids[:10]).get(timeout=60)
    out = invalidate_tags.delay([f"patient:{i}" for i in ids[:4]]).get(timeout=60)
    assert out["unlinked"] == 4
    assert cached_count(ids[:10]) == 6


def test_stats_reports_hit_rate_per_kind(worker: Any, ids: list[int]) -> None:
    get_or_build("patient", ids[0])  # miss
    # The miss is stored by this process's filler thread just after it returned.
    wait_for(lambda: cached_count(ids[:1]) == 1, what="the fill")
    get_or_build("patient", ids[0])  # hit
    get_or_build("patient", ids[0])  # hit
    out = stats.delay(window_minutes=5).get(timeout=60)
    assert out["kinds"]["patient"] == {"hits": 2, "misses": 1, "hit_rate": round(2 / 3, 4)}
    assert out["keys"]["patient"] == 1
    assert out["used_memory"] > 0


@pytest.mark.parametrize(
    ("task", "kwargs", "message"),
    [
        ("hms.cache.warm_patients", {"ids": []}, "ids: must not be empty"),
        ("hms.cache.warm_patients", {"ids": list(range(1, 10_002))}, "ids: at most 10000"),
        ("hms.cache.warm_patients", {"ids": [0, -3]}, "ids: every id must be a positive"),
        ("hms.cache.warm_patients", {"ids": ["7"]}, "ids: expected list of int"),
        ("hms.cache.invalidate_tags", {"tags": ["Patient 7"]}, "tags: every tag must look"),
        ("hms.cache.invalidate_tags", {"tags": []}, "tags: expected list of str with 1 to"),
        ("hms.cache.warm_hot", {"limit": 0}, "limit: expected int from 1"),
        ("hms.cache.stats", {"window_minutes": 99999}, "window_minutes: expected int"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(worker: Any, celery_app: Any, task: str,
                                                 kwargs: dict[str, Any], message: str) -> None:
    def cache_keys() -> set[bytes]:
        return set(backend().client().scan_iter(match="hms-cache:*", count=1000))

    before = cache_keys()
    result = celery_app.send_task(task, kwargs=kwargs)
    with pytest.raises(InvalidArguments) as info:
        result.get(timeout=60)
    assert message in str(info.value)
    report = reports.latest(task)
    assert report is not None
    assert report["outcome"] in ("rejected", "failure")
    assert report["error"] == "InvalidArguments"
    # Nothing in the cache changed: no payload, generation, index or statistic.
    assert cache_keys() == before


def test_dispatch_validates_cache_task_arguments_before_publishing(ids: list[int]) -> None:
    result = CliRunner().invoke(cli, ["dispatch", "hms.cache.warm_patients", "--arg",
                                      "ids=1,x"], catch_exceptions=False)
    assert result.exit_code == 2
    assert "ids: expected list of int" in result.output
