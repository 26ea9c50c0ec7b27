"""Alert rules: pending, firing after `for`, resolving with hysteresis, no flood from a flapping
value; webhooks to a loopback receiver (with a retry), refused when not allowlisted; settings
that are out of range stop start-up with an error naming the setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from django.test import override_settings

from hms_tasks import reports
from hms_tasks.allowlist import url_allowed
from hms_tasks.cli import cli
from hms_tasks.errors import ConfigurationError
from hms_tasks.memory import settings as memory_settings
from hms_tasks.metrics import alerts, names
from hms_tasks.metrics import settings as metrics_settings
from hms_tasks.metrics import store as ts
from hms_tasks.metrics.tasks import evaluate_alerts
from tests.helpers import wait_for

NO_DEFAULTS: dict[str, Any] = dict.fromkeys(metrics_settings.DEFAULT_ALERT_RULES)
CPU_RULE = {"series": "host.cpu.percent", "op": ">", "threshold": 80, "clear": 70,
            "for": 120, "clear_for": 180, "severity": "warning"}
SID = "host.cpu.percent{node=w1@h}"


def _step(t: float, value: float) -> list[alerts.Transition]:
    ts.write([(SID, t, value)], now=t)
    _, notify = alerts.evaluate_and_store(now=t)
    return notify


@override_settings(HMS_TASKS_ALERT_RULES={**NO_DEFAULTS, "cpu": CPU_RULE})
def test_pending_firing_resolved_with_hysteresis_and_no_flood() -> None:
    t0 = time.time() - 3600
    notified: list[str] = []

    def step(k: int, value: float) -> dict[str, Any] | None:
        notified.extend(t["new"] for t in _step(t0 + 60 * k, value))
        return alerts.states().get(f"cpu|{SID}")

    st = step(0, 85)
    assert st is not None
    assert st["state"] == "pending"
    assert st["pending_since"] == t0
    assert step(1, 90)["state"] == "pending"  # type: ignore[index]  # 60 s < for (120 s)
    st = step(2, 88)
    assert st is not None
    assert st["state"] == "firing"
    assert st["firing_since"] == t0 + 120
    assert notified == ["firing"]
    assert step(3, 75)["state"] == "firing"  # type: ignore[index]  # in the hysteresis band
    # A value flapping across the band while firing: it never clears for clear_for, so it
    # keeps firing and nothing is sent again.
    k = 4
    for value in [60, 85, 60, 85, 65, 90, 60, 82, 60, 95]:
        assert step(k, value)["state"] == "firing"  # type: ignore[index]
        k += 1
    assert notified == ["firing"]
    # Clear (<= 70) for clear_for (180 s): resolved, once.
    for i in range(3):
        assert step(k + i, 60)["state"] == "firing"  # type: ignore[index]
    st = step(k + 3, 60)
    assert st is not None
    assert st["state"] == "resolved"
    assert st["resolved_at"] == t0 + 60 * (k + 3)
    assert notified == ["firing", "resolved"]
    k += 4
    # Flapping after it resolved: each breach starts a pending period the next clear value
    # cancels, so it never fires again.
    for i, value in enumerate([85, 60, 90, 65, 88, 50, 99, 60]):
        step(k + i, value)
    assert notified == ["firing", "resolved"]
    transitions = [(e["old"], e["new"]) for e in reversed(alerts.events(last=100))]
    assert transitions[:4] == [("inactive", "pending"), ("pending", "firing"),
                               ("firing", "resolved"), ("resolved", "pending")]
    assert transitions[4:] == [("pending", "inactive"), ("inactive", "pending")] * 3 + [
        ("pending", "inactive")]


@override_settings(HMS_TASKS_ALERT_RULES={**NO_DEFAULTS, "cpu": CPU_RULE})
def test_stale_series_change_nothing_and_labels_make_separate_alerts() -> None:
    t0 = time.time() - 1800
    other = "host.cpu.percent{node=w2@h}"
    ts.write([(SID, t0, 95.0), (other, t0, 10.0)], now=t0)
    alerts.evaluate_and_store(now=t0)
    ts.write([(SID, t0 + 120, 95.0)], now=t0 + 120)
    alerts.evaluate_and_store(now=t0 + 120)
    assert {aid: st["state"] for aid, st in alerts.states().items()} == {f"cpu|{SID}": "firing"}
    # Twenty minutes without a point: the value is stale, the alert neither resolves nor fires.
    counts, notify = alerts.evaluate_and_store(now=t0 + 1320)
    assert notify == []
    assert counts["firing"] == 1


def test_defaults_are_the_product_briefs() -> None:
    rules = {r.name: r for r in alerts.rules()}
    assert (rules["cpu_high"].series, rules["cpu_high"].threshold) == ("host.cpu.percent", 80)
    assert rules["memory_high"].threshold == 85
    assert (rules["api_p95_slow"].series, rules["api_p95_slow"].threshold) == (
        "api.duration_p95_ms", 2000)
    assert (rules["api_error_rate"].series, rules["api_error_rate"].threshold) == (
        "api.error_rate", 5)
    assert {"queue_backlog", "redis_evictions", "node_down"} <= set(rules)
    for r in rules.values():
        assert r.clear <= r.threshold if r.op == ">" else r.clear >= r.threshold


class _Receiver:
    """A loopback HTTP server recording the requests it gets; answers from a script."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.answers: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = receiver.answers.pop(0) if receiver.answers else 200
                receiver.requests.append((self.path, {"status": status,
                                                      "body": json.loads(body or b"{}")}))
                self.send_response(status)
                if status in (301, 302, 307):
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    r = _Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


def test_webhook_is_delivered_to_a_loopback_receiver_with_a_retry(
        worker: Any, receiver: _Receiver) -> None:
    receiver.answers = [503]  # the first attempt fails: the task must retry it
    rule = {**CPU_RULE, "for": 0}
    with override_settings(
        HMS_TASKS_ALERT_RULES={**NO_DEFAULTS, "cpu": rule},
        HMS_TASKS_WEBHOOK_ALLOWLIST=[receiver.url("/hooks/")],
        HMS_TASKS_ALERT_WEBHOOKS={"ops": receiver.url("/hooks/ops")},
    ):
        ts.write([(SID, time.time(), 97.0)])
        summary = evaluate_alerts.delay().get(timeout=30)
        assert summary["firing"] == 1
        assert summary["webhooks_queued"] == 1
        wait_for(lambda: any(r[1]["status"] == 200 for r in receiver.requests), timeout=60,
                 what="the webhook to be delivered")
    assert [r[1]["status"] for r in receiver.requests] == [503, 200]
    path, got = receiver.requests[-1]
    assert path == "/hooks/ops"
    alert = got["body"]["alert"]
    assert got["body"]["source"] == "hms-tasks"
    assert (alert["rule"], alert["new"], alert["value"], alert["labels"]) == (
        "cpu", "firing", 97.0, {"node": "w1@h"})
    assert set(alert) <= set(alerts.Transition.__annotations__)
    # The run report is written after the response arrived: wait for it, then read the history.
    wait_for(lambda: [r["outcome"] for r in reports.history(names.METRICS_DELIVER_WEBHOOK)
                      ][:1] == ["success"], what="the delivery's run report")
    outcomes = [r["outcome"] for r in reports.history(names.METRICS_DELIVER_WEBHOOK)]
    assert outcomes[0] == "success"
    assert "retry" in outcomes


def test_a_url_outside_the_allowlist_is_refused_before_any_request(
        receiver: _Receiver) -> None:
    with override_settings(HMS_TASKS_WEBHOOK_ALLOWLIST=[receiver.url("/hooks/")]):
        for url in [receiver.url("/other"), receiver.url("/hooks-evil/x"),
                    f"http://localhost:{receiver.port}/hooks/x",
                    f"https://127.0.0.1:{receiver.port}/hooks/x"]:
            with pytest.raises(alerts.WebhookRefused, match="not allowed"):
                alerts.deliver(url, {"x": 1})
        # A redirect is never followed, even to an allowlisted path.
        receiver.answers = [302]
        with pytest.raises(alerts.WebhookRefused, match="redirect"):
            alerts.deliver(receiver.url("/hooks/a"), {"x": 1})
    assert [p for p, _ in receiver.requests] == ["/hooks/a"]


def test_configured_webhook_outside_the_allowlist_stops_start_up() -> None:
    with override_settings(HMS_TASKS_WEBHOOK_ALLOWLIST=["https://hooks.example.com/alerts"],
                           HMS_TASKS_ALERT_WEBHOOKS={"evil": "https://evil.example.net/x?t=s3"}):
        with pytest.raises(ConfigurationError) as info:
            metrics_settings.get()
        assert "HMS_TASKS_ALERT_WEBHOOKS['evil']: not allowed by" in str(info.value)
        assert "s3" not in str(info.value)  # the URL (its token) is never quoted
        assert "evil.example" not in str(info.value)


@pytest.mark.parametrize(("url", "allowed"), [
    ("https://hooks.example.com/alerts", True),
    ("https://hooks.example.com/alerts/ops?token=1", True),
    ("https://HOOKS.example.com:443/alerts/x", True),
    ("https://hooks.example.com/alertsx", False),
    ("https://hooks.example.com.evil.net/alerts", False),
    ("http://hooks.example.com/alerts", False),
    ("https://hooks.example.com:8443/alerts", False),
    ("https://user:pw@hooks.example.com/alerts", False),
    ("http://[::1]:8080/h", True),
    ("http://[0:0::1]:8080/h/x", True),
    ("http://127.0.0.1:8080/h", False),
    ("ftp://hooks.example.com/alerts", False),
    # Dot segments, raw or percent-encoded, never climb out of the allowed path (issue 12).
    ("http://127.0.0.1:8081/alerts/../admin", False),
    ("http://127.0.0.1:8081/alerts/%2e%2e/admin", False),
    ("http://127.0.0.1:8081/alerts/%2E./admin", False),
    ("http://127.0.0.1:8081/alerts/.%2e/admin", False),
    ("http://127.0.0.1:8081/alerts/./x", False),
    ("http://127.0.0.1:8081/alerts/..;/admin", False),
    ("http://127.0.0.1:8081/alerts/x%2f..%2f..%2fadmin", False),
    ("http://127.0.0.1:8081/alerts\\..\\admin", False),
    ("http://127.0.0.1:8081/alerts/%41", True),
    ("http://127.0.0.1:8081/%61lerts/x", True),  # %61 is "a": the same path
    # Credentials in any spelling, and a host hidden behind them.
    ("https://@hooks.example.com/alerts", False),
    ("https://:@hooks.example.com/alerts", False),
    ("https://hooks.example.com@evil.example.net/alerts", False),
    # Encoded IPv4 and IPv6 spellings of an address resolve to it, so they are refused or
    # compared as that address.
    ("http://0x7f.1:8081/alerts", False),
    ("http://2130706433:8081/alerts", False),
    ("http://0177.0.0.1:8081/alerts", False),
    ("http://127.1:8081/alerts", False),
    ("http://[::ffff:127.0.0.1]:8081/alerts/x", True),
    ("http://[::ffff:7f00:1]:8081/alerts/x", True),
    ("http://[0:0:0:0:0:0:0:1]:8080/h", True),
    ("http://[::1%25lo]:8080/h", False),
    # IDN and case: the punycode form, lower case, a trailing dot.
    ("https://HOOKS.EXAMPLE.COM./alerts", True),
    ("https://bücher.example/hooks", True),
    ("https://BÜCHER.example/hooks", True),
    ("https://xn--bcher-kva.example/hooks/x", True),
    ("https://bucher.example/hooks", False),
    # Addresses never contacted, even if someone listed them.
    ("http://169.254.169.254/latest/meta-data/", False),
    ("http://0.0.0.0:8081/alerts", False),
    ("http://[::]:8080/h", False),
    ("http://[64:ff9b::a9fe:a9fe]/", False),  # NAT64 of 169.254.169.254
    ("http://[2002:a9fe:a9fe::1]/", False),  # 6to4 of it
    ("http://[::ffff:169.254.169.254]/", False),
])
def test_url_allowlist(url: str, allowed: bool) -> None:
    allowlist = ["https://hooks.example.com/alerts", "http://[::1]:8080/h",
                 "http://127.0.0.1:8081/alerts", "https://xn--bcher-kva.example/hooks",
                 "http://169.254.169.254/", "http://0.0.0.0:8081/"]
    assert url_allowed(url, allowlist) is allowed


@pytest.mark.parametrize("entry", [
    "http://127.0.0.1:8081/alerts/../admin", "http://169.254.169.254/", "http://0x7f.1/",
    "http://user:token-s3cret@127.0.0.1/", "http://[fe80::1%25eth0]/x",
])
def test_allowlist_entries_that_could_reach_elsewhere_stop_start_up(entry: str) -> None:
    with override_settings(HMS_TASKS_WEBHOOK_ALLOWLIST=[entry]), \
            pytest.raises(ConfigurationError) as info:
        metrics_settings.get()
    assert str(info.value).startswith("HMS_TASKS_WEBHOOK_ALLOWLIST[0]: ")
    for part in ("s3cret", "169.254", "0x7f", "admin", "fe80"):
        assert part not in str(info.value)


@pytest.mark.parametrize(("settings", "message"), [
    ({"HMS_TASKS_ALERT_RULES": {"cpu_high": {"threshold": 150}}},
     "HMS_TASKS_ALERT_RULES['cpu_high']['threshold']: must be a number from 0 to 100"),
    ({"HMS_TASKS_ALERT_RULES": {"cpu_high": {"threshold": -1}}},
     "HMS_TASKS_ALERT_RULES['cpu_high']['threshold']"),
    ({"HMS_TASKS_ALERT_RULES": {"cpu_high": {"clear": 90}}},
     "HMS_TASKS_ALERT_RULES['cpu_high']['clear']: must be at or below the threshold"),
    ({"HMS_TASKS_ALERT_RULES": {"cpu_high": {"for": "5m"}}},
     "HMS_TASKS_ALERT_RULES['cpu_high']['for']"),
    ({"HMS_TASKS_ALERT_RULES": {"mine": {"series": "x.y", "threshold": 1, "bogus": 2}}},
     "HMS_TASKS_ALERT_RULES['mine']['bogus']: unknown field"),
    ({"HMS_TASKS_ALERT_RULES": {"node_down": {"clear": 0}}},
     "HMS_TASKS_ALERT_RULES['node_down']['clear']: must be at or above the threshold"),
    ({"HMS_TASKS_ALERT_RULES": {"mine": {"series": "Not A Series", "threshold": 1}}},
     "HMS_TASKS_ALERT_RULES['mine']['series']: must name a series like host.cpu.percent"),
    ({"HMS_TASKS_ALERT_RULES": {"mine": {"series": "x.error_rate", "threshold": 101}}},
     "HMS_TASKS_ALERT_RULES['mine']['threshold']: must be a number from 0 to 100"),
    ({"HMS_TASKS_ALERT_RULES": {"cpu_high": {"severity": "page"}}},
     "HMS_TASKS_ALERT_RULES['cpu_high']['severity']"),
    ({"HMS_TASKS_MEMORY_TIERS": {"critical": 99, "emergency": 95}},
     "HMS_TASKS_MEMORY_TIERS: must rise"),
    ({"HMS_TASKS_MEMORY_TIERS": {"warning": 0}}, "HMS_TASKS_MEMORY_TIERS['warning']"),
    ({"HMS_TASKS_MEMORY_BUDGET_MB": 10}, "HMS_TASKS_MEMORY_BUDGET_MB"),
    ({"HMS_TASKS_METRICS_RETENTION": {"raw": 60}},
     "HMS_TASKS_METRICS_RETENTION['raw']: must be whole seconds from 3600 to 604800"),
    ({"HMS_TASKS_METRICS_RETENTION": {"raw": 7 * 86400, "1m": 86400}},
     "HMS_TASKS_METRICS_RETENTION: 'raw' must not exceed"),
    ({"HMS_TASKS_METRICS_STALE_SECONDS": True}, "HMS_TASKS_METRICS_STALE_SECONDS"),
    ({"HMS_TASKS_METRICS_PING_TIMEOUT": 0.01},
     "HMS_TASKS_METRICS_PING_TIMEOUT: must be a number of seconds from 0.1 to 30"),
    ({"HMS_TASKS_WEBHOOK_TIMEOUT": float("inf")}, "HMS_TASKS_WEBHOOK_TIMEOUT"),
    ({"HMS_TASKS_MEMORY_COOLDOWN": 7200}, "HMS_TASKS_MEMORY_COOLDOWN"),
    ({"HMS_TASKS_WEBHOOK_ALLOWLIST": ["file:///etc/passwd"]},
     "HMS_TASKS_WEBHOOK_ALLOWLIST[0]: scheme must be http or https"),
])
def test_settings_out_of_range_name_the_setting(settings: dict[str, Any], message: str) -> None:
    def read_both() -> None:
        metrics_settings.get()
        memory_settings.get()

    with override_settings(**settings), pytest.raises(ConfigurationError) as info:
        read_both()
    assert message in str(info.value)


def test_rules_merge_per_rule_and_field() -> None:
    with override_settings(HMS_TASKS_ALERT_RULES={
            "cpu_high": {"threshold": 90}, "node_down": None,
            "beds_low": {"series": "hms.beds.free", "op": "<", "threshold": 3, "clear": 5,
                         "labels": {"ward": "icu"}}}):
        rules = {r.name: r for r in alerts.rules()}
    assert "node_down" not in rules
    # A new threshold without a clear: the clear follows it (no stale hysteresis band).
    assert (rules["cpu_high"].threshold, rules["cpu_high"].clear) == (90, 90)
    assert (rules["cpu_high"].for_s, rules["cpu_high"].severity) == (300, "warning")
    beds = rules["beds_low"]
    assert (beds.op, beds.threshold, beds.clear, beds.for_s, beds.clear_for_s) == (
        "<", 3, 5, 0, 0)
    assert beds.labels == (("ward", "icu"),)
    assert rules["memory_high"].threshold == 85


def test_bad_threshold_stops_the_worker_at_start_up(tmp_path: Path) -> None:
    (tmp_path / "bad_alert_settings.py").write_text(
        "from hms_tasks.demo.settings import *  # noqa\n"
        "HMS_TASKS_ALERT_RULES = {'memory_high': {'threshold': 185}}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "HMS_TASKS_HOME": str(tmp_path),
           "DJANGO_SETTINGS_MODULE": "bad_alert_settings"}
    proc = subprocess.run([sys.executable, "-m", "celery", "-A", "hms_tasks", "worker",
                           "--pool", "solo", "--loglevel", "INFO"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0
    assert "HMS_TASKS_ALERT_RULES['memory_high']['threshold']: must be a number from 0 to" \
           " 100" in proc.stderr + proc.stdout


@override_settings(HMS_TASKS_ALERT_RULES={**NO_DEFAULTS, "cpu": {**CPU_RULE, "for": 0}})
def test_alerts_cli_lists_states_and_rules() -> None:
    ts.write([(SID, time.time(), 99.0)])
    alerts.evaluate_and_store()
    runner = CliRunner()
    out = runner.invoke(cli, ["alerts"])
    assert out.exit_code == 0, out.output
    assert "cpu" in out.output
    assert SID in out.output
    assert "firing" in out.output
    data = json.loads(runner.invoke(cli, ["alerts", "--json", "--events", "5"]).output)
    assert [a["state"] for a in data["alerts"]] == ["firing"]
    assert data["events"][0]["new"] == "firing"
    rules = runner.invoke(cli, ["alerts", "--rules"])
    assert rules.exit_code == 0
    assert "host.cpu.percent" in rules.output
