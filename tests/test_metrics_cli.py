"""`hms-tasks metrics`, `memory` and `exporter` (the capabilities' commands, mounted as
`hms-tasks` mounts them): listing and querying the store, bad input (exit code 2, nothing
written), and the exporter's HTTP endpoint parsed by prometheus_client."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from hms_tasks import memory, metrics, store
from hms_tasks.cli import cli, mount
from hms_tasks.metrics import store as ts
from hms_tasks.metrics.prometheus import ExporterServer

mount(cli)  # as `hms-tasks` does: the capabilities' commands replace the core's old ones

CPU1 = "host.cpu.percent{node=w1@db-1}"
CPU2 = "host.cpu.percent{node=w2@db-1}"


def _keys() -> list[str]:
    return sorted(store.client().scan_iter(match=store.key("*"), count=1000))


@pytest.fixture
def points() -> float:
    now = time.time()
    ts.write([(CPU1, now - 120, 10.0), (CPU1, now - 60, 20.0), (CPU2, now - 60, 70.0),
              ("redis.clients", now - 30, 4.0)], now=now)
    return now


def test_the_capabilities_commands_are_mounted() -> None:
    import hms_tasks.memory.cli
    import hms_tasks.metrics.cli

    assert cli.commands["metrics"] is hms_tasks.metrics.cli.metrics
    assert cli.commands["alerts"] is hms_tasks.metrics.cli.alerts
    assert cli.commands["exporter"] is hms_tasks.metrics.cli.exporter
    assert cli.commands["memory"] is hms_tasks.memory.cli.memory


def test_public_api() -> None:
    for module in (metrics, memory):
        for name in module.__all__:
            assert getattr(module, name) is not None, name
    assert metrics.series_id("host.cpu.percent", {"node": "n@h"}) == "host.cpu.percent{node=n@h}"
    assert memory.get_settings().memory_tiers.emergency == 95


def test_lists_series_and_filters_by_node(points: float) -> None:
    out = CliRunner().invoke(cli, ["metrics"])
    assert out.exit_code == 0, out.output
    assert CPU1 in out.output
    assert CPU2 in out.output
    assert "redis.clients" in out.output
    out = CliRunner().invoke(cli, ["metrics", "--node", "w2@db-1", "--json"])
    assert [r["series"] for r in json.loads(out.output)] == [CPU2]


def test_shows_points_of_a_series(points: float) -> None:
    out = CliRunner().invoke(cli, ["metrics", "host.cpu.percent", "--node", "w1@db-1",
                                   "--since", "10m", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert list(data) == [CPU1]
    assert data[CPU1]["resolution"] == "raw"
    assert [p["value"] for p in data[CPU1]["points"]] == [10.0, 20.0]
    both = json.loads(CliRunner().invoke(cli, ["metrics", "host.cpu.percent", "--json"]).output)
    assert sorted(both) == [CPU1, CPU2]
    ts.rollup()
    out = CliRunner().invoke(cli, ["metrics", CPU1, "--since", "2d"])
    assert out.exit_code == 0, out.output
    assert "(1m, " in out.output
    assert "MEAN" in out.output


@pytest.mark.parametrize(("args", "message"), [
    (["metrics", "--since", "5x"], "--since: expected a duration like 90s"),
    (["metrics", "host.cpu.percent", "--since", "5x"], "--since: expected a duration"),
    (["metrics", "--since", "400d"], "--since: at most the longest retention"),
    (["metrics", "no.such.series"], "unknown series 'no.such.series'; known: host.cpu.percent,"),
    # The node is what is unknown: say so, and list the nodes that series has.
    (["metrics", "host.cpu.percent", "--node", "w9@x"],
     "unknown node 'w9@x' for series host.cpu.percent; known nodes: w1@db-1, w2@db-1"),
    (["metrics", "redis.clients", "--node", "w1@db-1"],
     "series redis.clients has no node label; leave out --node"),
    (["metrics", "host.cpu.percent{node=w9@x}"],
     "no series matches 'host.cpu.percent{node=w9@x}'; known: host.cpu.percent{node=w1@db-1},"),
    (["metrics", "Bad Name"], "SERIES: series names are dotted lower-case words"),
    (["metrics", "--resolution", "2m"], "Invalid value for '--resolution'"),
    (["memory", "--snapshot", "../etc"], "--snapshot: expected the id"),
    (["memory", "--snapshot", "nosuch"], "--snapshot: expected the id"),
    # Well formed, but no comparison ever had it: not a pending one (exit 0).
    (["memory", "--snapshot", "0123456789abcdef"],
     "--snapshot: no tracemalloc comparison has that id"),
    (["memory", "--snapshot", "0123456789abcdef", "--json"],
     "--snapshot: no tracemalloc comparison has that id"),
    (["exporter", "--host", "example.com"], "--host: expected an IP address"),
])
def test_bad_input_exits_2_and_writes_nothing(points: float, args: list[str],
                                              message: str) -> None:
    before = _keys()
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 2, out.output
    assert message in out.output
    assert _keys() == before


def test_memory_command_shows_events() -> None:
    from hms_tasks.memory import hooks

    out = CliRunner().invoke(cli, ["memory"])
    assert out.exit_code == 0
    assert "no memory events yet" in out.output
    hooks._record({"v": 1, "node": "n@h", "pid": 42, "tier": "critical", "action": "gc_full",
                   "trigger": "task", "task": "hms.x.y", "budget": 256 * 2**20,
                   "rss_before": 240 * 2**20, "rss_after": 200 * 2**20, "collected": 17,
                   "pause_ms": 3.5, "at": time.time(), "exitcode": None})
    out = CliRunner().invoke(cli, ["memory"])
    assert out.exit_code == 0
    assert "gc_full" in out.output
    assert "240.0" in out.output
    assert "200.0" in out.output


def test_memory_snapshot_pending_done_and_lost() -> None:
    from hms_tasks.memory import snapshot

    sid = "00112233aabbccdd"
    snapshot.announce(sid, node="n@h", seconds=60)
    out = CliRunner().invoke(cli, ["memory", "--snapshot", sid])
    assert out.exit_code == 0, out.output
    assert f"comparison {sid} on n@h is running; results are due at" in out.output
    assert json.loads(CliRunner().invoke(cli, ["memory", "--snapshot", sid, "--json"]).output
                      ) == []
    # Asked long ago, and no child ever reported: not pending any more.
    snapshot.announce(sid, node="n@h", seconds=60, now=time.time() - 3600)
    out = CliRunner().invoke(cli, ["memory", "--snapshot", sid])
    assert out.exit_code == 1
    assert "ended without results" in out.output
    result: snapshot.SnapshotResult = {
        "v": 1, "id": sid, "node": "n@h", "pid": 42, "seconds": 60.0, "traced_before": 10,
        "traced_after": 5000, "tracer_bytes": 100,
        "top": [{"site": "app/leak.py:7", "size_diff": 4990, "count_diff": 3, "size": 4990,
                 "count": 3}]}
    store.client().hset(store.key("memory", "snapshot", sid), "42", json.dumps(result))
    out = CliRunner().invoke(cli, ["memory", "--snapshot", sid])
    assert out.exit_code == 0, out.output
    assert "app/leak.py:7" in out.output
    assert "+4,990" in out.output


@pytest.fixture
def exporter() -> Iterator[ExporterServer]:
    server = ExporterServer("127.0.0.1", 0)
    server.start_in_thread()
    yield server
    server.shutdown()
    server.server_close()


def _get(server: ExporterServer, path: str) -> tuple[int, str, str]:
    url = f"http://127.0.0.1:{server.server_address[1]}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, "", ""


def test_exporter_serves_prometheus_text(points: float, exporter: ExporterServer) -> None:
    status, ctype, body = _get(exporter, "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert sorted((s.labels["node"], s.value) for s in families["hms_host_cpu_percent"].samples
                  ) == [("w1@db-1", 20.0), ("w2@db-1", 70.0)]
    assert families["hms_redis_clients"].samples[0].value == 4.0
    assert _get(exporter, "/healthz")[0] == 200
    assert _get(exporter, "/nope")[0] == 404
