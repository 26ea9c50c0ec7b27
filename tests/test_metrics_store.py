"""The time-series store: writes, rollups, retention under a simulated month, bad input,
Prometheus exposition and the API's request timings; against the session's real Redis."""

from __future__ import annotations

import time

import pytest
from django.test import Client, override_settings
from prometheus_client.parser import text_string_to_metric_families

from hms_tasks import store
from hms_tasks.errors import InvalidArguments
from hms_tasks.metrics import prometheus, timings
from hms_tasks.metrics import store as ts

CPU = "host.cpu.percent{node=w1@db-1}"


def _keys() -> list[str]:
    return sorted(store.client().scan_iter(match=store.key("ts", "*"), count=1000))


def test_series_ids_are_canonical_and_checked() -> None:
    assert ts.series_id("host.cpu.percent", {"node": "w1@db-1"}) == CPU
    assert ts.series_id("a.b", {"z": "1", "a": "2"}) == "a.b{a=2,z=1}"
    assert ts.parse_series(CPU) == ("host.cpu.percent", (("node", "w1@db-1"),))
    for bad in ["Host.CPU", "a..b", "a b", "a{node}", "a{z=1,a=2}", "a{node=x y}", "a|b", ""]:
        with pytest.raises(ValueError):  # noqa: PT011
            ts.parse_series(bad)


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15m", 900), ("1h", 3600),
                                               ("7d", 7 * 86400), ("1h30m", 5400),
                                               ("2w", 14 * 86400), ("0.5h", 1800)])
def test_durations(text: str, seconds: float) -> None:
    assert ts.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5x", "", "h", "1", "-1h", "1 h", "0s", "1hh"])
def test_bad_durations_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected a duration like 90s|above zero"):
        ts.parse_duration(text)


def test_write_and_query_raw_points() -> None:
    now = time.time()
    points = [(CPU, now - 600 + i * 10, float(i)) for i in range(60)]
    assert ts.write(points, now=now) == {"points": 60, "series": 1, "blocks": len(
        {int(p[1] // 3600) for p in points})}
    used, got = ts.query(CPU, since=now - 3600, now=now)
    assert used == "raw"
    assert [p.value for p in got] == [float(i) for i in range(60)]
    assert got[0].ts == pytest.approx(now - 600, abs=0.002)
    assert ts.latest()[CPU].value == 59.0
    # Only the window asked for.
    _, recent = ts.query(CPU, since=now - 100.5, now=now)
    assert [p.value for p in recent] == [float(i) for i in range(50, 60)]


def test_bad_points_are_refused_and_nothing_is_written() -> None:
    now = time.time()
    good = (CPU, now, 1.0)
    cases = [
        [good, ("Not A Series", now, 1.0)],
        [good, (CPU, now, float("nan"))],
        [good, (CPU, now + 3600, 1.0)],
        [good, (CPU, now - 400 * 86400, 1.0)],
        [good, (CPU, now, "12")],
    ]
    for points in cases:
        with pytest.raises(InvalidArguments) as info:
            ts.write(points, now=now)  # type: ignore[arg-type]
        assert "points[1]" in str(info.value)
        assert _keys() == []


def test_rollup_aggregates_min_max_mean_count_and_merges_late_points() -> None:
    now = float(int(time.time() // 3600) * 3600 + 1800)  # half past an hour
    minute0 = now - 20 * 60
    points = [(CPU, minute0 + s, float(v)) for s, v in [(1, 10), (20, 30), (59, 20),
                                                       (61, 5), (119, 7)]]
    ts.write(points, now=now)
    assert ts.rollup(now=now)["points_folded"] == 5
    used, agg = ts.query(CPU, since=minute0, until=minute0 + 119, resolution="1m", now=now)
    assert used == "1m"
    assert [(a.ts, a.min, a.max, a.mean, a.n) for a in agg] == [
        (minute0, 10.0, 30.0, 20.0, 3), (minute0 + 60, 5.0, 7.0, 6.0, 2)]
    # A late point for the first minute merges into its slot (and the hour's).
    ts.write([(CPU, minute0 + 30, 100.0)], now=now)
    assert ts.rollup(now=now)["points_folded"] == 1
    _, agg = ts.query(CPU, since=minute0, until=minute0 + 119, resolution="1m", now=now)
    assert (agg[0].min, agg[0].max, agg[0].mean, agg[0].n) == (10.0, 100.0, 40.0, 4)
    _, hours = ts.query(CPU, since=now - 3600, resolution="1h", now=now)
    assert [(h.min, h.max, h.n) for h in hours] == [(5.0, 100.0, 6)]
    assert hours[0].mean == pytest.approx((10 + 30 + 20 + 5 + 7 + 100) / 6, rel=1e-6)
    # Folding again folds nothing new.
    assert ts.rollup(now=now)["points_folded"] == 0


def test_a_simulated_month_keeps_memory_bounded() -> None:
    """10 series, a point every 5 minutes, 36 simulated days ending now; rollup every
    simulated hour. Raw points go after a day, 1-minute and 1-hour aggregates after 30 days,
    and memory levels off instead of growing with the uptime."""
    series = [ts.series_id("host.cpu.percent", {"node": f"w{i}@h"}) for i in range(10)]
    end = float(int(time.time() // 3600) * 3600)
    days = 36
    start = end - days * 86400
    memory_by_day: dict[int, int] = {}
    for hour in range(days * 24):
        t0 = start + hour * 3600
        batch = [(sid, t0 + k * 300 + 1, float((hour + k) % 100))
                 for k in range(12) for sid in series]
        ts.write(batch, now=t0 + 3600)
        ts.rollup(now=t0 + 3600)
        if hour % 24 == 23:
            usage = ts.memory_usage()
            memory_by_day[hour // 24 + 1] = usage["raw"] + usage["1m"] + usage["1h"]
            raw_keys = list(store.client().scan_iter(match=store.key("ts", "raw", "*")))
            # Raw blocks: the last 24 hours plus the one being written, per series.
            assert len(raw_keys) <= 10 * 26
            day_keys = list(store.client().scan_iter(match=store.key("ts", "1m", "*")))
            assert len(day_keys) <= 10 * 32
    # From day 31 on, a day of new aggregates replaces a pruned one: flat, not growing.
    steady = [memory_by_day[d] for d in range(32, days + 1)]
    assert max(steady) <= min(steady) * 1.05
    assert memory_by_day[days] < memory_by_day[31] * 1.1
    # The bound the key layout promises (the 1h blocks are sparse strings, so at most).
    per_series = 26 * 12 * 12 + 32 * 23_040 + 7 * 2688
    assert memory_by_day[days] <= 10 * per_series * 1.25
    # The oldest aggregates are gone; the last 30 days answer at both resolutions.
    _, hours = ts.query(series[0], since=end - 36 * 86400, resolution="1h", now=end)
    assert hours[0].ts >= end - 30 * 86400 - 3600
    assert len(hours) >= 30 * 24 - 1
    week_keys = list(store.client().scan_iter(match=store.key("ts", "1h", "*")))
    assert len(week_keys) <= 10 * 7
    _, minutes = ts.query(series[0], since=end - 2 * 86400, resolution="1m", now=end)
    assert len(minutes) >= 2 * 24 * 12 - 12
    assert all(m.n == 1 for m in minutes)
    _, raw = ts.query(series[0], since=end - 86400, resolution="raw", now=end)
    assert 23 * 12 <= len(raw) <= 24 * 12


def test_series_without_points_for_the_retention_are_forgotten() -> None:
    now = time.time()
    ts.write([(CPU, now - 29 * 86400, 1.0)], now=now)
    assert CPU in ts.latest()
    ts.rollup(now=now + 2 * 86400)
    assert CPU not in ts.latest()
    assert _keys() == [] or all(":1h:" in k or "expiry" in k for k in _keys())


def test_prometheus_exposition_parses() -> None:
    now = time.time()
    ts.write([(CPU, now, 42.5),
              ("celery.queue.depth{queue=hms.cache}", now, 3.0),
              ("redis.used_memory_bytes", now, 1e6),
              ("host.cpu.percent{node=old@h}", now - 3600, 99.0)], now=now)  # stale
    families = {f.name: f for f in text_string_to_metric_families(prometheus.render().decode())}
    cpu = families["hms_host_cpu_percent"]
    assert cpu.type == "gauge"
    assert [(s.labels, s.value) for s in cpu.samples] == [({"node": "w1@db-1"}, 42.5)]
    assert families["hms_celery_queue_depth"].samples[0].labels == {"queue": "hms.cache"}
    assert families["hms_redis_used_memory_bytes"].samples[0].value == 1e6
    assert "hms_alert" in families


@pytest.mark.django_db
def test_demo_api_serves_metrics_and_times_its_requests() -> None:
    client = Client()
    timings.recorder().flush()  # requests of earlier tests still buffered in this process
    before = sum(int(store.client().hget(store.key("ts", "api", str(m)), "n") or 0)
                 for m in range(int(time.time() // 60) - 1, int(time.time() // 60) + 2))
    for _ in range(3):
        assert client.get("/api/no-such-endpoint/").status_code == 404
    timings.recorder().flush()
    after = sum(int(store.client().hget(store.key("ts", "api", str(m)), "n") or 0)
                for m in range(int(time.time() // 60) - 1, int(time.time() // 60) + 2))
    assert after - before == 3
    ts.write([(CPU, time.time(), 7.0)])
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(response.content.decode())}
    assert "hms_host_cpu_percent" in names


def test_request_timings_become_p95_and_error_rate_series() -> None:
    rec = timings.Recorder()
    now = float(int(time.time() // 60) * 60) - 120  # two minutes ago, settled
    for i in range(100):
        rec.record(3000.0 if i >= 90 else 40.0, 500 if i < 10 else 200, now=now + 1)
    rec.flush()
    points = {name: value for name, _, value in timings.convert(now=now + 120)}
    assert points["api.requests"] == 100
    assert points["api.errors"] == 10
    assert points["api.error_rate"] == 10.0
    assert 2500 < points["api.duration_p95_ms"] <= 3000  # 10 % of requests are slow
    assert points["api.duration_mean_ms"] == pytest.approx((90 * 40 + 10 * 3000) / 100)
    # Converted minutes are not converted again.
    assert timings.convert(now=now + 120) == []


def test_timings_never_fail_a_request_when_redis_is_down() -> None:
    with override_settings(HMS_TASKS_REDIS_URL="redis://127.0.0.1:1/0"):
        store.reset()
        rec = timings.Recorder()
        rec.record(5.0, 200)
        rec.flush()
        assert rec.dropped == 1
    store.reset()


def test_rollup_is_single_flight_under_an_owner_checked_lock() -> None:
    from hms_tasks.metrics.tasks import ROLLUP_LOCK, rollup

    lock_key = store.key("lock", ROLLUP_LOCK)
    other = store.lock(ROLLUP_LOCK, ttl=30)  # another rollup, still running
    assert other.acquire(blocking=False)
    assert rollup() == {"skipped": True}
    assert other.owned()  # the skipped run left the running one's lock alone
    other.release()
    now = time.time()
    ts.write([(CPU, now - 5, 1.0), (CPU, now - 4, 3.0)], now=now)
    summary = rollup()
    assert summary["points_folded"] == 2
    assert not store.client().exists(lock_key)  # released after the run
    # The old layout's lock (released with an unconditional DEL) is not used any more.
    assert not store.client().exists(store.key("metrics", "rollup", "lock"))
