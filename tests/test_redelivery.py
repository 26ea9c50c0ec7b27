"""A message whose worker process dies every time is redelivered, then dropped as poisoned:
a real prefork worker subprocess whose pool child is SIGKILLed by the task it runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from hms_tasks import conf, names, reports, store
from tests.helpers import RedisServer, wait_for

REPO = Path(__file__).resolve().parent.parent


def test_poisoned_message_is_dropped_and_worker_keeps_serving(
    redis_server: RedisServer, celery_app: Any, tmp_path: Path
) -> None:
    env = {**os.environ, "REDIS_URL": redis_server.url, "HMS_TASKS_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "hms_tasks", "worker", "--pool", "prefork",
         "--concurrency", "1", "--include", "tests.tasks_for_tests", "-Q", names.DEFAULT_QUEUE,
         "-n", "redelivery@localhost", "--without-mingle", "--without-gossip",
         "--loglevel", "INFO"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        doomed = celery_app.send_task("hms.test.die")
        report = wait_for(lambda: reports.latest("hms.test.die"), timeout=120,
                          what="the poisoned message's run report")
        assert report["outcome"] == "poisoned"
        assert report["id"] == doomed.id
        deaths = int(store.client().get(store.key("redeliveries", doomed.id)) or 0)
        assert deaths == conf.get().max_redeliveries + 1
        # The message is gone for good: nothing queued, nothing waiting to be restored.
        client = store.client()
        wait_for(lambda: client.hlen("unacked") == 0, what="the poisoned message to be acked")
        assert client.llen(names.DEFAULT_QUEUE) == 0
        # The worker survived its children's deaths and still serves.
        ok = celery_app.send_task("hms.test.echo", kwargs={"count": 1, "ids": []})
        assert ok.get(timeout=60) == {"count": 1, "ids": 0, "mode": "fast", "noted": False}
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
