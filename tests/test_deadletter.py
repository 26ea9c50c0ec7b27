"""The dead-letter list and its command, against the session's real Redis."""

from __future__ import annotations

import json

from click.testing import CliRunner

from hms_tasks import deadletter, store
from hms_tasks.deadletter_cli import deadletter_command


def test_record_keeps_plain_identifiers_only_and_is_capped() -> None:
    deadletter.record("unknown task", queue="hms.cache", message_id="abc-123",
                      task="hms.nope.x", now=100.0)
    deadletter.record("body is not JSON", queue="Jane Doe", message_id="Jane Doe 1957",
                      task={"x": 1}, now=200.0)
    newest, oldest = deadletter.entries()
    assert oldest == {"v": 1, "at": 100.0, "reason": "unknown task", "queue": "hms.cache",
                      "id": "abc-123", "task": "hms.nope.x"}
    assert (newest["queue"], newest["id"], newest["task"]) == (None, None, None)
    assert deadletter.total() == 2
    assert deadletter.recent(window=150, now=300.0) == 1
    pipe = store.client().pipeline()
    for _ in range(deadletter.MAX_ENTRIES + 5):
        pipe.lpush(store.key("deadletter"), json.dumps(newest))
    pipe.execute()
    deadletter.record("unknown task")
    assert store.client().llen(store.key("deadletter")) == deadletter.MAX_ENTRIES


def test_checks_name_the_part_and_never_the_value() -> None:
    ok = {"task": "hms.test.echo", "id": "a1"}
    known = {"hms.test.echo"}
    kw = {"content_type": "application/json", "content_encoding": "utf-8", "known_tasks": known}
    assert deadletter.header_problem(ok, **kw) is None
    assert deadletter.header_problem({**ok, "eta": "Jane"}, **kw) == \
        "header eta or expires is not an ISO 8601 time"
    assert deadletter.header_problem({**ok, "timelimit": [1]}, **kw) == \
        "header timelimit is not a pair of numbers"
    assert deadletter.body_problem([[], {}, None]) is None
    assert deadletter.body_problem([[], {}, {"chain": None}]) is None
    assert deadletter.body_problem({"args": []}) == "body is not a list of [args, kwargs, embed]"
    assert deadletter.body_problem([[], {1: 2}, {}]) == "body kwargs are not an object"
    assert deadletter.envelope_problem([]) == "envelope is not a JSON object"


def test_command_lists_entries() -> None:
    deadletter.record("unknown task", queue="hms.cache", message_id="abc-123", task="hms.nope.x")
    runner = CliRunner()
    text = runner.invoke(deadletter_command, [])
    assert text.exit_code == 0
    assert "1 message(s) dead-lettered" in text.output
    assert "abc-123" in text.output
    doc = json.loads(runner.invoke(deadletter_command, ["--json"]).output)
    assert doc["total"] == 1
    assert doc["entries"][0]["reason"] == "unknown task"
    assert runner.invoke(deadletter_command, ["--last", "0"]).exit_code == 2


def test_a_dead_lettered_message_fires_the_deadletter_alert() -> None:
    import time

    from hms_tasks.metrics import alerts, collect
    from hms_tasks.metrics import store as ts

    now = time.time()
    _, points = collect.celery_sample(now=now, nodes_expected=[], timeout=0.1)
    ts.write(points, now=now)
    alerts.evaluate_and_store(now=now)
    assert "deadletter" not in {st["rule"] for st in alerts.states().values()}

    deadletter.record("unknown task", queue="hms.cache")
    _, points = collect.celery_sample(now=now + 60, nodes_expected=[], timeout=0.1)
    assert ("celery.deadletter_recent", now + 60, 1.0) in points
    ts.write(points, now=now + 60)
    alerts.evaluate_and_store(now=now + 60)
    firing = {st["rule"]: st["state"] for st in alerts.states().values()}
    assert firing.get("deadletter") == "firing"
