"""Load tests without workers: definitions and their refusals, the exact merge, verdicts,
regressions, the HTML report, and that nothing a worker imports pulls in Locust or gevent."""

from __future__ import annotations

import io
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from django.test import override_settings

from hms_tasks import capabilities, store
from hms_tasks.errors import ConfigurationError, InvalidArguments
from hms_tasks.loadtest import keys, names, orchestrate, report, settings, spec, stats, text
from hms_tasks.loadtest.stats import EndpointStats, RunData
from tests.helpers import CountingListener, wait_for

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def scenarios(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "scenarios"
    d.mkdir()
    (d / "mine.py").write_text("from locust import HttpUser\n")
    (tmp_path / "outside.py").write_text("from locust import HttpUser\n")
    (d / "escape.py").symlink_to(tmp_path / "outside.py")
    with override_settings(HMS_TASKS_LOADTEST_TARGETS={"demo": "http://127.0.0.1:9",
                                                       "staging": "https://10.0.0.5:8443/hms/"},
                           HMS_TASKS_LOADTEST_SCENARIOS_DIR=str(d),
                           HMS_TASKS_LOADTEST_MAX_USERS=100,
                           HMS_TASKS_LOADTEST_MAX_SHARDS=4,
                           HMS_TASKS_LOADTEST_MAX_DURATION=120):
        yield d


def _ok(**over: Any) -> dict[str, Any]:
    return {"name": "t1", "target": "demo", "users": 10, "duration": 5, "shards": 2, **over}


def _problems(definition: Any) -> list[str]:
    with pytest.raises(InvalidArguments) as info:
        spec.parse(definition)
    return info.value.problems


# -- definitions ---------------------------------------------------------------------------------


def test_a_good_definition_parses_and_splits_users_and_rates(scenarios: Path) -> None:
    t = spec.parse(_ok(users=11, shards=3, ramp_up=2, thresholds={
        "p95_ms": 500, "error_rate": 0.01, "min_rps": 3,
        "endpoints": {"GET /api/patients/": {"p99_ms": 900}}}))
    assert t.spawn_rate == 5.5
    assert [(p.users, p.spawn_rate) for p in t.plan()] == [(4, 2.0), (4, 2.0), (3, 1.5)]
    assert t.thresholds.items() == [("p95_ms", 500.0), ("error_rate", 0.01), ("min_rps", 3.0)]
    assert t.endpoint_thresholds["GET /api/patients/"].p99_ms == 900.0
    assert spec.parse(t.to_json()) == t  # the canonical form round-trips
    assert spec.parse(_ok(scenario={"locustfile": "mine.py"})).scenario.locustfile == "mine.py"
    # A trailing slash of a configured base URL is dropped (paths start with one).
    assert settings.get().loadtest_targets["staging"] == "https://10.0.0.5:8443/hms"


@pytest.mark.parametrize(("over", "field", "says"), [
    ({"target": "prod"}, "test.target", "unknown target id (allowed: demo, staging)"),
    ({"target": "http://127.0.0.1:9"}, "test.target", "not a URL or an address"),
    ({"target": "127.0.0.1:9"}, "test.target", "not a URL or an address"),
    ({"target": 7}, "test.target", "got int"),
    ({"scenario": {"locustfile": "../outside.py"}}, "test.scenario.locustfile",
     "inside HMS_TASKS_LOADTEST_SCENARIOS_DIR"),
    ({"scenario": {"locustfile": "/etc/passwd"}}, "test.scenario.locustfile",
     "inside HMS_TASKS_LOADTEST_SCENARIOS_DIR"),
    ({"scenario": {"locustfile": "escape.py"}}, "test.scenario.locustfile",
     "inside HMS_TASKS_LOADTEST_SCENARIOS_DIR"),
    ({"scenario": {"locustfile": "missing.py"}}, "test.scenario.locustfile", "no such file"),
    ({"scenario": {"endpoints": [{"path": "http://10.1.1.1/x"}]}},
     "test.scenario.endpoints[0].path", "no scheme, host"),
    ({"scenario": {"endpoints": [{"path": "//evil.example/x"}]}},
     "test.scenario.endpoints[0].path", "starting with one '/'"),
    ({"users": 0}, "test.users", "from 1 to 100"),
    ({"users": -3}, "test.users", "from 1 to 100"),
    ({"users": 101}, "test.users", "HMS_TASKS_LOADTEST_MAX_USERS"),
    ({"users": "10"}, "test.users", "got str"),
    ({"duration": 0}, "test.duration", "above 0 and at most 120"),
    ({"duration": -5}, "test.duration", "above 0"),
    ({"duration": 121}, "test.duration", "HMS_TASKS_LOADTEST_MAX_DURATION"),
    ({"shards": 5}, "test.shards", "HMS_TASKS_LOADTEST_MAX_SHARDS"),
    ({"shards": 0}, "test.shards", "from 1 to 4"),
    ({"users": 2, "shards": 3}, "test.shards", "one shard per user"),
    ({"thresholds": {"p95_ms": "fast"}}, "test.thresholds.p95_ms", "got str"),
    ({"thresholds": {"p99_ms": True}}, "test.thresholds.p99_ms", "got bool"),
    ({"thresholds": {"error_rate": 5}}, "test.thresholds.error_rate", "from 0 to 1"),
    ({"thresholds": {"min_rps": [1]}}, "test.thresholds.min_rps", "got list"),
    ({"thresholds": {"p95": 10}}, "test.thresholds", "unknown fields ['p95']"),
    ({"thresholds": ["p95_ms"]}, "test.thresholds", "expected an object"),
    ({"spawn_rate": 0}, "test.spawn_rate", "above 0"),
    ({"spawn_rate": 1, "ramp_up": 2}, "test", "spawn_rate or ramp_up, not both"),
    ({"name": "Has Spaces"}, "test.name", "a-z 0-9"),
    ({"hosts": ["x"]}, "test", "unknown fields ['hosts']"),
])
def test_bad_definitions_are_refused_naming_the_field(scenarios: Path, over: dict[str, Any],
                                                      field: str, says: str) -> None:
    problems = _problems(_ok(**over))
    line = next((p for p in problems if p.startswith(field + ":")), None)
    assert line is not None, problems
    assert says in line
    # The offending value is never quoted back (it could be data pasted in the wrong place).
    for value in over.values():
        if isinstance(value, str) and len(value) > 3 and value not in ("prod", "demo"):
            assert value not in " ".join(problems)


def test_every_problem_is_reported_at_once(scenarios: Path) -> None:
    problems = _problems({"name": "x", "target": "http://evil", "users": 0, "duration": -1,
                          "thresholds": {"p95_ms": "slow"}})
    assert [p.split(":")[0] for p in problems] == [
        "test.target", "test.users", "test.duration", "test.thresholds.p95_ms"]


def test_settings_are_validated_naming_the_setting() -> None:
    cases = [
        ({"HMS_TASKS_LOADTEST_TARGETS": {"demo": "ftp://x"}},
         "HMS_TASKS_LOADTEST_TARGETS['demo']: scheme must be http or https"),
        ({"HMS_TASKS_LOADTEST_TARGETS": {"Demo": "http://x"}}, "target ids are 1 to 40"),
        ({"HMS_TASKS_LOADTEST_TARGETS": {"d": "http://u:p@x"}}, "must not carry credentials"),
        ({"HMS_TASKS_LOADTEST_TARGETS": {"d": "http://x/?token=abc123"}},
         "HMS_TASKS_LOADTEST_TARGETS['d']: a base URL has no query string"),
        ({"HMS_TASKS_LOADTEST_MAX_DURATION": 3600},
         "HMS_TASKS_LOADTEST_MAX_DURATION: Input should be less than or equal to 1800"),
        ({"HMS_TASKS_LOADTEST_MAX_USERS": "10"},
         "HMS_TASKS_LOADTEST_MAX_USERS: Input should be a valid integer"),
        ({"HMS_TASKS_LOADTEST_GRACE": 1},
         "HMS_TASKS_LOADTEST_GRACE: Input should be greater than or equal to 5"),
        ({"HMS_TASKS_LOADTEST_REGRESSION_TOLERANCE": 0},
         "HMS_TASKS_LOADTEST_REGRESSION_TOLERANCE: Input should be greater than 0"),
        ({"HMS_TASKS_LOADTEST_KEEP_RAW": 1}, "HMS_TASKS_LOADTEST_KEEP_RAW: Input should be a"),
        ({"HMS_TASKS_LOADTEST_TESTS": {"t": {"name": "other"}}},
         "HMS_TASKS_LOADTEST_TESTS: a test's name is its key"),
        ({"HMS_TASKS_LOADTEST_NIGHTLY": "nope", "HMS_TASKS_LOADTEST_TESTS": {}},
         "HMS_TASKS_LOADTEST_NIGHTLY: must be None or the name of a test"),
    ]
    for overrides, message in cases:
        with override_settings(**overrides), pytest.raises(ConfigurationError) as info:
            settings.get()
        assert message in str(info.value)
        # A URL could carry a token: it is never quoted back.
        assert "abc123" not in str(info.value)
    with override_settings(HMS_TASKS_LOADTEST_START_DELAY=2):
        assert settings.get().loadtest_start_delay == 2.0


def test_configured_tests_are_checked_at_start_up(scenarios: Path) -> None:
    from hms_tasks.celery import app, startup_problems

    bad = {"broken": {"target": "prod", "users": 5, "duration": 5}}
    with override_settings(HMS_TASKS_LOADTEST_TESTS=bad, HMS_TASKS_LOADTEST_NIGHTLY=None):
        problems = startup_problems(app)
    assert any(p.startswith("HMS_TASKS_LOADTEST_TESTS['broken'].target: unknown target id")
               for p in problems)


def test_demo_settings_enable_the_nightly_smoke_test_and_production_defaults_do_not() -> None:
    # The suite runs on the demo settings: the nightly entry runs the "smoke" test there.
    smoke = orchestrate.resolve(None, nightly=True)
    assert smoke is not None
    assert (smoke.name, smoke.target, smoke.scenario.kind) == ("smoke", "demo", "demo")
    # A production settings module that sets nothing: the entry runs nothing.
    defaults = settings.LoadtestSettings()
    assert defaults.loadtest_nightly is None
    assert defaults.loadtest_targets == {}
    with override_settings(HMS_TASKS_LOADTEST_NIGHTLY=None):
        assert orchestrate.resolve(None, nightly=True) is None
    from hms_tasks.loadtest.tasks import run

    with override_settings(HMS_TASKS_LOADTEST_NIGHTLY=None):
        assert run.run(nightly=True) == {
            "skipped": True, "reason": "HMS_TASKS_LOADTEST_NIGHTLY names no test"}


def test_definitions_from_yaml_or_json_files_and_flags(scenarios: Path, tmp_path: Path) -> None:
    from hms_tasks.loadtest.text import definition_from

    (tmp_path / "t.yaml").write_text(
        "name: nightly-api\ntarget: demo\nusers: 8\nduration: 30\nshards: 2\n"
        "scenario:\n  endpoints:\n    - {path: /api/patients/, weight: 3}\n"
        "thresholds: {p95_ms: 400}\n")
    (tmp_path / "t.json").write_text(json.dumps({"name": "j", "target": "demo", "users": 2,
                                                 "duration": 5}))
    flags: dict[str, Any] = {"name": None, "target": None, "scenario": None, "endpoints": (),
                             "users": None, "spawn_rate": None, "ramp_up": None,
                             "duration": None, "shards": None, "thresholds": ()}
    d, problems = definition_from(base=None, file=str(tmp_path / "t.yaml"), **{
        **flags, "users": 10, "ramp_up": 5.0,
        "thresholds": ("error_rate=0.02", "GET /api/patients/:p99_ms=900")})
    assert problems == []
    t = spec.parse(d)
    assert (t.name, t.users, t.duration, t.shards, t.spawn_rate) == ("nightly-api", 10, 30.0,
                                                                     2, 2.0)
    assert t.thresholds.to_json() == {"p95_ms": 400.0, "error_rate": 0.02}
    assert t.endpoint_thresholds["GET /api/patients/"].p99_ms == 900.0
    assert spec.parse(definition_from(base=None, file=str(tmp_path / "t.json"),
                                      **flags)[0]).name == "j"
    _, problems = definition_from(base=None, file=str(tmp_path / "missing.yaml"), **flags)
    assert problems == ["--file: cannot read a JSON or YAML definition (FileNotFoundError)"]


def test_the_cli_refuses_bad_input_before_sending_anything(scenarios: Path) -> None:
    from hms_tasks.loadtest.cli import loadtest

    client = store.client()
    cases = [
        ["--target", "http://127.0.0.1:9", "--users", "5", "--duration", "5"],
        ["--target", "demo", "--users", "0", "--duration", "5"],
        ["--target", "demo", "--users", "5", "--duration", "5", "--scenario", "../outside.py"],
        ["--target", "demo", "--users", "5", "--duration", "5", "--threshold", "p95_ms=slow"],
        ["--target", "demo", "--users", "5", "--duration", "5", "--endpoint", "FETCH /x"],
        ["nosuchtest"],
    ]
    for args in cases:
        result = CliRunner().invoke(loadtest, ["run", *args])
        assert result.exit_code == 2, (args, result.output)
        assert "error:" in result.output
    assert client.llen(capabilities.queue("loadtest")) == 0
    assert keys.recent_runs() == []


# -- the exact merge -----------------------------------------------------------------------------


def _reference_percentile(samples: list[float], p: float) -> int:
    """Locust's rules written out independently: bucket each sample, walk from the top."""
    buckets = sorted((stats.bucket(s) for s in samples), reverse=True)
    wanted = int(len(samples) * p)
    for i, b in enumerate(buckets, start=1):
        if len(samples) - i <= wanted:
            return b
    return 0


def _ticks(samples: list[tuple[int, str, float, bool]], users: int) -> list[dict[str, Any]]:
    by_second: dict[int, dict[str, list[Any]]] = {}
    for t, key, ms, failed in samples:
        row = by_second.setdefault(t, {}).setdefault(key, [0, 0, 0.0, None, 0.0, 0, {}])
        row[0] += 1
        row[1] += int(failed)
        row[2] += ms
        row[3] = ms if row[3] is None else min(row[3], ms)
        row[4] = max(row[4], ms)
        b = str(stats.bucket(ms))
        row[6][b] = row[6].get(b, 0) + 1
    return [{"type": "tick", "t": t, "u": users, "e": e, "x": {}, "b": 0}
            for t, e in sorted(by_second.items())]


def test_merging_shards_equals_one_process_with_the_same_requests() -> None:
    rng = random.Random(7)
    keys_ = ["GET /a", "GET /b", "POST /c"]
    samples = [(1000 + rng.randrange(20), rng.choice(keys_),
                rng.lognormvariate(3.5, 1.2), rng.random() < 0.05) for _ in range(20_000)]
    one = RunData()
    for tick in _ticks(samples, users=12):
        one.add_tick(tick)
    parts = []
    for shard in range(4):
        part = RunData()
        for tick in _ticks(samples[shard::4], users=3):
            part.add_tick(tick)
        # Through JSON, as the shards store them.
        parts.append(RunData.from_json(json.loads(json.dumps(part.to_json()))))
    merged = stats.merge(parts)
    assert merged.endpoints.keys() == one.endpoints.keys()
    for key, ep in merged.endpoints.items():
        theirs = one.endpoints[key]
        # Counters and histograms exactly; the sum of response times up to float rounding.
        assert (ep.requests, ep.failures, ep.min_ms, ep.max_ms, ep.hist) == (
            theirs.requests, theirs.failures, theirs.min_ms, theirs.max_ms, theirs.hist)
        assert ep.sum_ms == pytest.approx(theirs.sum_ms)
    assert {t: s[:2] + s[3:] for t, s in merged.seconds.items()} == {
        t: s[:2] + s[3:] for t, s in one.seconds.items()}
    assert all(s[2] == 12 for s in merged.seconds.values())  # users add up per second
    summary = stats.summarize(merged)
    everything = [ms for *_, ms, _ in samples]
    for p in stats.PERCENTILES:
        assert summary["total"][stats.percentile_key(p)] == _reference_percentile(everything, p)
    for row in summary["endpoints"]:
        mine = [ms for _, k, ms, _ in samples if k == row["name"]]
        assert row["requests"] == len(mine)
        assert row["p95_ms"] == _reference_percentile(mine, 0.95)
        assert row["max_ms"] == pytest.approx(max(mine), abs=1e-3)
    assert sum(p["rps"] for p in summary["timeline"]) == len(samples)
    assert summary["total"]["failures"] == sum(1 for *_, f in samples if f)
    # Averaging per-shard percentiles would not give the same answer: the merge must not.
    averaged = sum(stats.summarize(p)["total"]["p99_ms"] for p in parts) / 4
    assert summary["total"]["p99_ms"] == _reference_percentile(everything, 0.99)
    assert isinstance(averaged, float)


def test_percentile_and_buckets_match_locust_itself() -> None:
    """Our reimplementation (workers never import Locust) against Locust's own functions, run
    in a subprocess."""
    rng = random.Random(3)
    samples = [rng.choice([rng.uniform(0, 120), rng.uniform(100, 2000),
                           rng.uniform(900, 70_000)]) for _ in range(5000)]
    hist: dict[int, int] = {}
    for s in samples:
        hist[stats.bucket(s)] = hist.get(stats.bucket(s), 0) + 1
    code = (
        "import json, sys\n"
        "from locust.stats import bucket_response_time, calculate_response_time_percentile\n"
        "samples = json.load(sys.stdin)\n"
        "h = {}\n"
        "for s in samples: h[bucket_response_time(s)] = h.get(bucket_response_time(s), 0) + 1\n"
        f"ps = {list(stats.PERCENTILES)!r}\n"
        "print(json.dumps({'hist': h, 'p': [calculate_response_time_percentile(h, len(samples),"
        " p) for p in ps]}))\n")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(samples),
                         capture_output=True, text=True, check=True, timeout=120)
    theirs = json.loads(out.stdout)
    assert {int(k): v for k, v in theirs["hist"].items()} == hist
    assert [stats.percentile(hist, len(samples), p) for p in stats.PERCENTILES] == theirs["p"]


# -- verdicts, regressions, HTML -----------------------------------------------------------------


def _summary(p95: int = 120, rps: float = 50.0) -> dict[str, Any]:
    data = RunData(started_at=1000.0, stopped_at=1010.0)
    ep = data.endpoints["GET /a"] = EndpointStats()
    ep.add_row([int(rps * 10), 5, 100.0 * rps * 10, 3.0, 400.0, 0,
                {"50": int(rps * 10) - 30, str(p95): 30}])
    for t in range(1000, 1010):
        data.seconds[t] = [int(rps), 0, 5, {50: int(rps) - 3, p95: 3}]
    return stats.summarize(data)


def test_thresholds_pass_and_fail_as_configured(scenarios: Path) -> None:
    test = spec.parse(_ok(thresholds={"p95_ms": 150, "p99_ms": 100, "error_rate": 0.001,
                                      "min_rps": 10, "endpoints": {"GET /a": {"p50_ms": 60},
                                                                   "GET /zz": {"p95_ms": 9}}}))
    summary = _summary()
    shards = [{"index": 0, "state": "finished"}, {"index": 1, "state": "finished"}]
    v = report.verdict(test, summary, shards, aborted=False)
    outcome = {(c["scope"], c["metric"]): c["passed"] for c in v["thresholds"]}
    assert outcome == {("total", "p95_ms"): True, ("total", "p99_ms"): False,
                       ("total", "error_rate"): False, ("total", "min_rps"): True,
                       ("GET /a", "p50_ms"): True, ("GET /zz", "p95_ms"): False}
    assert v["status"] == "failed"
    assert "total p99_ms 120 (must be <= 100)" in v["reasons"]
    assert "GET /zz p95_ms no value (must be <= 9): no requests" in v["reasons"]
    loose = spec.parse(_ok(thresholds={"p95_ms": 150, "min_rps": 10}))
    assert report.verdict(loose, summary, shards, aborted=False)["status"] == "passed"
    dead = [{"index": 0, "state": "finished"},
            {"index": 1, "state": "failed", "reason": "killed by SIGKILL"}]
    v = report.verdict(loose, summary, dead, aborted=False)
    assert v["status"] == "failed"
    assert v["reasons"] == ["shard 1 failed: killed by SIGKILL"]
    assert report.verdict(loose, summary, shards, aborted=True)["status"] == "aborted"


def _doc(summary: dict[str, Any], run_id: str, status: str = "passed") -> dict[str, Any]:
    return {"run_id": run_id, "test": "t1", **summary,
            "definition": {"target": "demo", "users": 10, "scenario": "demo", "shards": 2,
                           "duration": 10},
            "verdict": {"status": status, "reasons": [], "thresholds": []}}


def test_regression_against_the_previous_run() -> None:
    prev = _doc(_summary(p95=100, rps=50), "r1")
    slower = _doc(_summary(p95=130, rps=50), "r2")
    reg = report.regression(slower, prev, tolerance=0.2)
    assert reg["compared"]
    assert reg["regressed"]
    assert reg["metrics"]["p95_ms"] == {"previous": 100, "current": 130, "change": 0.3,
                                        "regressed": True}
    same = report.regression(_doc(_summary(p95=110, rps=45), "r3"), prev, tolerance=0.2)
    assert same["compared"]
    assert not same["regressed"]
    fewer = report.regression(_doc(_summary(p95=100, rps=30), "r4"), prev, tolerance=0.2)
    assert fewer["metrics"]["rps"]["regressed"]
    other = _doc(_summary(), "r5")
    other["definition"] = {**other["definition"], "users": 99}
    assert not report.regression(other, prev, tolerance=0.2)["compared"]
    assert report.regression(slower, None, tolerance=0.2)["note"] == \
        "no previous run of this test"


class _Charts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.svg: str | None = None
        self.polylines: dict[str, dict[str, int]] = {}
        self.in_data = False
        self.data = ""
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "svg":
            self.svg = a.get("id")
        if tag == "polyline" and self.svg:
            points = (a.get("points") or "").split()
            self.polylines.setdefault(self.svg, {})[a["data-series"] or ""] = len(points)
        if tag == "script" and a.get("id") == "hms-loadtest-report":
            assert a.get("type") == "application/json"
            self.in_data = True
        if a.get("src") or (tag == "link" and a.get("href")):
            self.external.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self.svg = None
        if tag == "script":
            self.in_data = False

    def handle_data(self, data: str) -> None:
        if self.in_data:
            self.data += data


def parse_html(text: str) -> _Charts:
    parser = _Charts()
    parser.feed(text)
    return parser


def test_html_report_is_self_contained_with_chart_data(scenarios: Path) -> None:
    summary = _summary()
    doc = _doc(summary, "r9")
    doc.update(shards=[{"index": 0, "state": "finished", "node": "w@h", "requests": 1}],
               environment={"shards": 1}, regression={"compared": False, "note": "first"},
               window_s=10.0)
    doc["definition"]["name"] = "t1"
    doc["errors"] = [{"endpoint": "GET /a", "error": "<script>alert(1)</script>", "count": 1}]
    page = report.render_html(doc)
    parsed = parse_html(page)
    assert parsed.external == []
    assert json.loads(parsed.data) == json.loads(json.dumps(doc))
    assert parsed.polylines["chart-latency"] == {"p50_ms": 10, "p95_ms": 10, "p99_ms": 10}
    assert parsed.polylines["chart-rps"] == {"rps": 10, "users": 10}
    assert "<script>alert(1)</script>" not in page.split('id="hms-loadtest-report"')[0]


def test_html_environment_is_a_readable_table_and_counts_agree_in_number() -> None:
    doc = _doc(_summary(), "r10")
    doc["definition"].update(users=1, shards=1)
    doc.update(shards=[{"index": 0, "state": "finished", "node": "w@h", "requests": 1}],
               regression={"compared": False, "note": "first"}, window_s=10.0, errors=[],
               environment={"shards": 1, "nodes": ["w1@h", "w2@h"], "orchestrator": "o@h",
                            "start_skew_ms": 1.5, "versions": {"celery": "5.5.3",
                                                               "locust": None}})
    page = report.render_html(doc)
    env = page.split("<h2>Environment</h2>")[1].split("<script")[0]
    cells = re.findall(r"<td>(.*?)</td>", env)
    assert cells == ["shards", "1", "nodes", "w1@h, w2@h", "orchestrator", "o@h",
                     "start skew ms", "1.5", "versions", "celery 5.5.3, locust -"]
    assert "1 user over 1 shard" in page
    assert text.count(1, "shard") == "1 shard"
    assert text.count(2, "node") == "2 nodes"
    assert text.count(1, "process", "processes") == "1 process"
    assert text.count(0, "process", "processes") == "0 processes"


def _stored_run(run_id: str, test: str) -> None:
    """A finished one-shard run in Redis, as its shard would have left it."""
    now = time.time()
    definition = {"name": test, "target": "demo", "users": 1, "duration": 5, "shards": 1}
    keys.create_run(run_id, {
        "id": run_id, "test": test, "target": "demo", "status": "running",
        "spec": json.dumps(spec.parse(definition).to_json()), "created_at": now - 20,
        "start_at": now - 15, "end_at": now - 10, "deadline": now - 5, "shards": 1, "users": 1,
        "node": "o@h",
        "done": 1, "abort": "0"}, created_at=now - 20)
    data = RunData(started_at=now - 15, stopped_at=now - 10)
    for t in range(int(now) - 15, int(now) - 10):
        data.add_tick({"t": t, "u": 1, "e": {"GET /a": [10, 0, 500.0, 40.0, 60.0, 0,
                                                        {"50": 10}]}, "x": {}, "b": 0})
    keys.claim_shard(run_id, 0, node="w@h", now=now - 15)
    store.client().hset(keys.shard_key(run_id, 0), mapping={
        "state": "finished", "users": 1, "reason": "ran its duration",
        "result": json.dumps({**data.to_json(), "check": "ok"})})


def test_regression_series_is_written_on_a_first_run_too(scenarios: Path) -> None:
    from hms_tasks.metrics import store as ts

    sid = ts.series_id("loadtest.regression", {"test": "first-run"})
    assert sid not in ts.latest()
    _stored_run("first-run-1", "first-run")
    doc = orchestrate.merge_run("first-run-1")
    assert keys.report("first-run-1")["regression"]["compared"] is False, doc
    assert ts.latest()[sid].value == 0.0
    # The second run of the same test is compared, and written as well.
    _stored_run("first-run-2", "first-run")
    orchestrate.merge_run("first-run-2")
    assert keys.report("first-run-2")["regression"]["compared"] is True
    assert ts.latest()[sid].value == 0.0


class _Lines(io.StringIO):
    """An output that is no terminal; a line-written event for the test to wait on."""

    def __init__(self) -> None:
        super().__init__()
        self.lines = 0

    def write(self, text: str) -> int:
        self.lines += text.count("\n")
        return super().write(text)


def test_following_a_run_off_a_terminal_prints_a_line_per_interval(scenarios: Path) -> None:
    from hms_tasks.loadtest.cli import follow

    _stored_run("follow-1", "follow")
    out = _Lines()
    result: dict[str, Any] = {}
    follower = threading.Thread(target=lambda: result.update(
        doc=follow("follow-1", timeout=60, out=out, interval=0.05)))
    follower.start()
    # Progress shows while the run is not over yet: lines before the report exists.
    wait_for(lambda: out.lines >= 3, timeout=30, what="progress lines before the report")
    assert keys.report("follow-1") is None
    orchestrate.merge_run("follow-1")
    follower.join(timeout=30)
    assert result["doc"]["run_id"] == "follow-1"
    lines = out.getvalue().splitlines()
    assert all(line.startswith("[") and "requests" in line for line in lines), lines
    assert "\r" not in out.getvalue()  # no progress bar redraws off a terminal


# -- never Locust in a worker --------------------------------------------------------------------


def test_no_hms_tasks_module_imports_locust_or_gevent() -> None:
    code = (
        "import importlib, pkgutil, sys, django; django.setup()\n"
        "import hms_tasks\n"
        "from hms_tasks.celery import app, load_tasks; load_tasks(app)\n"
        "mods = [m.name for m in pkgutil.walk_packages(hms_tasks.__path__, 'hms_tasks.')\n"
        "        if '.migrations' not in m.name]\n"
        "for m in mods: importlib.import_module(m)\n"
        "assert 'hms_tasks.loadtest.runner' in sys.modules\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('locust', 'gevent',"
        " 'geventhttpclient')))\n")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "hms_tasks.demo.settings"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120, env=env, cwd=REPO)
    assert out.stdout.strip() == "[]"
    # Nor this test process (the suite imports hms_tasks modules and Locust's pytest plugin).
    assert not {"locust", "gevent"} & set(sys.modules)


def _queued(queue: str) -> list[dict[str, Any]]:
    """The headers of the messages waiting in ``queue`` (kombu's Redis list)."""
    return [json.loads(raw)["headers"] for raw in store.client().lrange(queue, 0, -1)]


def test_the_final_merge_waits_for_the_deadline_in_hops_below_the_visibility_timeout(
        scenarios: Path) -> None:
    from datetime import datetime

    from hms_tasks.celery import max_countdown

    _stored_run("hops-1", "hops")
    now = time.time()
    deadline = now + 1860  # the longest run: 30 s start delay, 1,800 s, 30 s grace
    store.client().hset(keys.run_key("hops-1"), mapping={"done": 0, "deadline": deadline})
    store.client().delete(keys.shard_key("hops-1", 0))
    queue = capabilities.queue("loadtest")
    hop = max_countdown(names.MERGE)
    assert 0 < hop <= 20  # 150 s visibility timeout - 120 s hard limit - 10 s margin

    # Before the deadline the merge merges nothing and sends itself again, due within one hop.
    result = orchestrate.merge_or_wait("hops-1", now=now)
    assert "shards still running" in result["skipped"]
    [sent] = _queued(queue)
    assert sent["id"] == "hops-1-merge-final"
    wait = datetime.fromisoformat(sent["eta"]).timestamp() - now
    assert hop - 1 <= wait <= hop + 1
    assert keys.report("hops-1") is None

    # At the deadline it merges (the shard that never reported is lost) and sends nothing.
    store.client().delete(queue)
    result = orchestrate.merge_or_wait("hops-1", now=deadline + orchestrate.FINAL_MERGE_DELAY)
    assert result["status"] == "failed"
    assert keys.report("hops-1")["shards"][0]["state"] == "lost"
    assert _queued(queue) == []


def test_the_last_hop_waits_only_what_is_left(scenarios: Path) -> None:
    from datetime import datetime

    _stored_run("hops-2", "hops")
    now = time.time()
    store.client().hset(keys.run_key("hops-2"), mapping={"done": 0, "deadline": now + 3})
    orchestrate.merge_or_wait("hops-2", now=now)
    [sent] = _queued(capabilities.queue("loadtest"))
    wait = datetime.fromisoformat(sent["eta"]).timestamp() - now
    assert 3 + orchestrate.FINAL_MERGE_DELAY - 1 <= wait <= 3 + orchestrate.FINAL_MERGE_DELAY + 1


def test_the_shard_hands_a_contained_runner_sockets_to_the_target_and_to_nothing_else() -> None:
    """The two ends of containment's channel, in this process (no namespace needed): the
    runner's :class:`Dialer` gets a socket connected to the target in place of its own; any
    other address or port is refused by the shard without a packet sent, whatever the runner
    asks (a locustfile could talk to the channel itself)."""
    from hms_tasks.loadtest import containment

    target, other = CountingListener(greeting=b"hi"), CountingListener(greeting=b"hi")
    ours, theirs = containment.socket_pair()
    connector = containment.Connector(ours, containment.Target(
        "127.0.0.1", target.port, ("127.0.0.1",)))
    connector.start()
    dialer = containment.Dialer(theirs.detach())
    try:
        sock = socket.socket()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        number = sock.fileno()
        dialer.connect(sock, "127.0.0.1", target.port)
        with sock:
            # The same object and file number, now connected to the target; its blocking mode
            # and the options the caller set before connecting are kept, and the runner's
            # children do not inherit it.
            assert sock.fileno() == number
            assert os.get_blocking(number)
            assert sock.getpeername() == ("127.0.0.1", target.port)
            assert sock.recv(2) == b"hi"
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert not os.get_inheritable(number)
        for address, port in (("127.0.0.1", other.port), ("127.0.0.2", target.port),
                              ("::1", target.port)):
            with pytest.raises(PermissionError):
                dialer.connected_fd(address, port, 5.0)
        # A reply "socket" that is not one (a pipe): the shard drops the request, and serves on.
        r, w = os.pipe()
        request = json.dumps({"address": "127.0.0.1", "port": target.port, "timeout": 5})
        socket.send_fds(dialer.channel, [request.encode()], [r])
        os.close(r)
        os.close(w)
        fd = dialer.connected_fd("127.0.0.1", target.port, 5.0)
        with socket.socket(fileno=fd) as again:
            again.setblocking(True)  # it comes non-blocking, as gevent's sockets are
            assert again.recv(2) == b"hi"
        wait_for(lambda: target.accepted == 2, what="the target to accept both connections")
        # The target's own failure reaches the runner as its errno.
        target.close()
        with pytest.raises(ConnectionRefusedError):
            dialer.connected_fd("127.0.0.1", target.port, 5.0)
    finally:
        dialer.channel.close()
        connector.close()
        other.close()
    assert other.accepted == 0
    assert target.accepted == 2
    assert (connector.connections, connector.refused, connector.failed) == (2, 3, 1)
