"""Redis Sentinel over TLS: a TLS-only loopback stack (master, 2 replicas, 3 sentinels; no plain
port anywhere; replication and the sentinels' links over TLS; client certificates required;
passwords on servers and sentinels) whose CA the test makes, and every client of hms-tasks
configured as docs/configuration.md says: ``HMS_TASKS_REDIS_SENTINELS``, the master's name, the
sentinels' password, ``HMS_TASKS_REDIS_SENTINEL_TLS`` and a ``rediss://`` URL whose ``ssl_*``
query names the CA and the client certificate.

Proved: the store's client, the tag cache (and an invalidation at commit), a real worker (a task
published through kombu's Sentinel transport, its result back through the Sentinel backend) and
redbeat's client all work, and follow ``SENTINEL FAILOVER``; a client trusting another CA, one
without a client certificate, plain-text clients, and hms-tasks with the sentinels' TLS off are
all refused, with the reason in the error.

Figure: dispatch --wait runs over TLS Sentinel before and after a failover, refusals.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
from django.core.cache import caches
from django.db import transaction
from django.test import override_settings
from kombu import Connection
from redis.backoff import NoBackoff
from redis.retry import Retry

from bench.sentinel_stack import MASTER_NAME, SentinelStack, TlsFiles
from hms_tasks import broker, store
from hms_tasks.cache import changes
from tests.helpers import stop, until_written, wait_for
from tests.tlscerts import make_ca, make_cert

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "sentinel-tls-test-pw"
TASKS = ("hms.metrics.collect_host", "hms.cache.stats")


class Stack(SentinelStack):
    """The TLS stack, and a CA that signed none of its certificates."""

    other_ca: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    d = Path(tmp_path_factory.mktemp("sentinel-tls"))
    ca, ca_key, ca_cert = make_ca(d, "test-ca")
    # The servers' certificate is their client certificate to each other as well.
    cert, key = make_cert(d, ca_key, ca_cert, name="server", client=True)
    client_cert, client_key = make_cert(d, ca_key, ca_cert, name="client", server=False,
                                        client=True)
    s = Stack(d / "stack", password=PASSWORD,
              tls=TlsFiles(ca, cert, key, client_cert, client_key))
    s.other_ca = make_ca(d, "other-ca")[0]
    s.start()
    yield s
    s.stop()


def _url(stack: Stack, **query: Path | None) -> str:
    """The stack's URL with some ``ssl_*`` options replaced (None: left out)."""
    params = {**stack.tls_query(), **query}
    return f"rediss://:{PASSWORD}@127.0.0.1:{stack.redis_ports[0]}/0?" + "&".join(
        f"{k}={quote(str(v), safe='')}" for k, v in params.items() if v is not None)


def _settings(stack: Stack, url: str | None = None, *, sentinel_tls: bool = True
              ) -> dict[str, Any]:
    url = url or stack.url()
    return {"HMS_TASKS_REDIS_URL": url, "HMS_TASKS_REDIS_SENTINELS": stack.sentinels,
            "HMS_TASKS_REDIS_SENTINEL_MASTER": MASTER_NAME,
            "HMS_TASKS_REDIS_SENTINEL_PASSWORD": PASSWORD,
            "HMS_TASKS_REDIS_SENTINEL_TLS": sentinel_tls,
            "CACHES": {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
                       "hms": {"BACKEND": "hms_tasks.cache.TaggedRedisCache",
                               "LOCATION": url, "KEY_PREFIX": "hms-cache"}}}


@pytest.fixture
def on_stack(stack: Stack) -> Iterator[Stack]:
    with override_settings(**_settings(stack)):
        store.reset()
        yield stack
    store.reset()


def _env(stack: Stack, tmp_path: Path) -> dict[str, str]:
    """The demo settings' environment for this stack (what docs/configuration.md lists)."""
    return {**os.environ, "DJANGO_SETTINGS_MODULE": "hms_tasks.demo.settings",
            "REDIS_URL": stack.url(), "REDIS_SENTINELS": ",".join(stack.sentinels),
            "REDIS_SENTINEL_MASTER": MASTER_NAME, "REDIS_SENTINEL_PASSWORD": PASSWORD,
            "REDIS_SENTINEL_TLS": "1", "HMS_TASKS_HOME": str(tmp_path),
            "PYTHONPATH": str(REPO)}


def _dispatch(env: dict[str, str], task: str) -> None:
    out = subprocess.run([sys.executable, "-m", "hms_tasks", "dispatch", task, "--wait",
                          "--timeout", "120"], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"' in out.stdout  # the task's JSON summary, through the result backend


@pytest.mark.django_db(transaction=True)
def test_store_and_tag_cache_over_tls_sentinels(on_stack: Stack) -> None:
    from hms_tasks.demo.models import Patient

    stack = on_stack
    master = stack.client(stack.master_port())
    client = store.client()
    client.set(store.key("t", "tls"), "1")
    assert client.get(store.key("t", "tls")) == "1"
    assert master.get(store.key("t", "tls")) == "1"  # on the master the sentinels name

    be = caches["hms"]
    be.set("plain", {"v": 1}, 600)
    assert be.get("plain") == {"v": 1}
    assert master.exists(be.make_key("plain"))
    # An invalidation at commit: the committing thread bumps the tag's generation over TLS
    # (not buffered for later: at_commit counts it), so the next read is a miss.
    patient = Patient.objects.create(mrn="TLS-1", given_name="x", family_name="y",
                                     birth_date="2000-01-01")
    tag = f"patient:{patient.pk}"
    be.set("patient-tls", {"v": 1}, 600, tags=[tag])
    assert be.get("patient-tls") == {"v": 1}
    at_commit = changes.recorder().stats["at_commit"]
    with transaction.atomic():
        patient.allergies = "none known"
        patient.save()
    assert be.get("patient-tls", "miss") == "miss"
    assert changes.recorder().stats["at_commit"] == at_commit + 1
    assert master.get(be.gen_prefix + tag) is not None


def test_worker_redbeat_and_clients_follow_a_failover_over_tls(stack: Stack,
                                                              tmp_path: Path) -> None:
    env = _env(stack, tmp_path)
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "hms_tasks", "worker", "--pool", "solo",
         "-Q", "hms.metrics,hms.cache", "-n", "senttls@%h", "--without-mingle",
         "--without-gossip", "--loglevel", "INFO"],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    runs = 0
    try:
        for task in TASKS:
            _dispatch(env, task)
            runs += 1
        with override_settings(**_settings(stack)):
            store.reset()
            client = store.client()
            client.set(store.key("t", "before"), "1")
            be = caches["hms"]
            be.set("before", 1, 600)
            beat = _redbeat_client()
            assert beat.ping()
            first = stack.master_port()
            new = stack.failover()
            assert new != first
            until_written(client, store.key("t", "after"), on=stack.client(new))
            wait_for(lambda: _cache_roundtrip(be), timeout=30, interval=0.05,
                     what="the tag cache on the new master")
            assert stack.client(new).exists(be.make_key("after"))
            wait_for(lambda: _set_on(beat, stack.client(new)), timeout=30, interval=0.05,
                     what="redbeat's client on the new master")
        store.reset()
        # The worker consumes from the new master and its results come back from there.
        for task in TASKS:
            _dispatch(env, task)
            runs += 1
        assert worker.poll() is None, "the worker exited"
    finally:
        store.reset()
        stop(worker)
        stderr = worker.stderr.read().decode(errors="replace") if worker.stderr else ""
        if runs < 2 * len(TASKS):  # a run failed: what the worker said
            print("\nworker log (tail):\n" + stderr[-12000:])
    assert "insecure SSL behaviour" not in stderr
    assert "CERT_NONE" not in stderr
    print(f"\nSentinel TLS: {runs}/{runs} dispatch --wait runs (broker, results, state, cache)"
          f" over TLS sentinels and a TLS master, {runs // 2} after SENTINEL FAILOVER")


def _cache_roundtrip(be: Any) -> bool:
    try:
        be.set("after", 2, 600)
        return bool(be.get("after") == 2)
    except redis.ConnectionError:
        return False


def _redbeat_client() -> redis.Redis:
    """redbeat's own client (beat's lock and schedule), from hms-tasks' Celery options."""
    from celery import Celery
    from redbeat.schedulers import get_redis

    from hms_tasks.celery import celery_defaults

    app = Celery("senttls", set_as_current=False)
    app.conf.update(celery_defaults())
    client: redis.Redis = get_redis(app)
    return client


def _set_on(client: redis.Redis, master: redis.Redis) -> bool:
    try:
        client.set(store.key("t", "beat"), "after")
    except redis.ConnectionError:
        return False
    except redis.ResponseError as exc:
        # redbeat's own client gets a new master's refusal before it has replicas as a
        # plain error (CheckedScheduler.tick waits it out the same way).
        if str(exc).startswith("NOREPLICAS"):
            return False
        raise
    return master.get(store.key("t", "beat")) == "after"


def test_wrong_ca_missing_client_cert_and_plain_text_are_refused(stack: Stack) -> None:
    refused = 0
    # A client trusting another CA: the sentinels' certificate fails verification, and the
    # error says so for each sentinel.
    with override_settings(**_settings(stack, _url(stack, ssl_ca_certs=stack.other_ca))):
        store.reset()
        with pytest.raises(redis.ConnectionError) as err:
            store.client(socket_timeout=2).ping()
        # Each sentinel's reason, not only its error's type (redis-py 8's own message).
        assert str(err.value).count("CERTIFICATE_VERIFY_FAILED") == len(stack.sentinels)
        assert PASSWORD not in str(err.value)
        refused += 1
        from hms_tasks.celery import celery_defaults

        # kombu's Sentinel transport (the worker's broker): refused as well. Its message is
        # redis-py's, which names no reason (docs/reliability.md).
        with _broker(celery_defaults()) as conn, \
                pytest.raises(Exception, match="No master found"):
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
        refused += 1
    # The right CA, the same clients: both connect (the refusals above were the CA's).
    with override_settings(**_settings(stack)):
        store.reset()
        assert store.client(socket_timeout=2).ping()
        with _broker(celery_defaults()) as conn:
            conn.ensure_connection(max_retries=1)
    # Without a client certificate (tls-auth-clients yes): refused by the sentinels.
    with override_settings(**_settings(stack, _url(stack, ssl_certfile=None,
                                                   ssl_keyfile=None))):
        store.reset()
        with pytest.raises(redis.ConnectionError) as err:
            store.client(socket_timeout=2).ping()
        # The server ends the handshake (TLS 1.3: "EOF occurred in violation of protocol" or
        # "certificate required"); each sentinel is named with its reason.
        for address in stack.sentinels:
            assert f"sentinel {address}: " in str(err.value)
        assert "ssl" in str(err.value).lower()
        refused += 1
    # The sentinels' TLS left off: hms-tasks speaks plain text to a TLS port, and gets nowhere.
    with override_settings(**_settings(stack, sentinel_tls=False)):
        store.reset()
        with pytest.raises(redis.ConnectionError, match="No master found"):
            store.client(socket_timeout=2).ping()
        refused += 1
    store.reset()
    # No port of the stack answers plain text.
    for port in stack.redis_ports + stack.sentinel_ports:
        # No retries: each would be refused alike, after a backoff.
        plain = redis.Redis(port=port, password=PASSWORD, socket_timeout=2,
                            socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
        with pytest.raises(redis.ConnectionError):
            plain.ping()
        refused += 1
    print(f"\nSentinel TLS: refused {refused}/{4 + 6} (other CA: store, kombu; no client"
          " certificate; sentinel TLS off; plain text on each of 6 ports)")


def _broker(options: dict[str, Any]) -> Connection:
    """A kombu connection as the worker makes it: the Sentinel transport, its SSL options and
    transport options (``sentinel_kwargs``) from hms-tasks' Celery options."""
    return Connection(options["broker_url"], transport=broker.SENTINEL_TRANSPORT,
                      ssl=options["broker_use_ssl"],
                      transport_options=options["broker_transport_options"],
                      connect_timeout=2)
