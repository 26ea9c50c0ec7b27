"""Redis over TLS: a real worker and ``hms-tasks dispatch --wait`` over ``rediss://`` with
certificate checks on, against a TLS-only redis-server whose CA the test makes; a client that
trusts another CA is refused; a URL that turns verification off stops start-up unless allowed.

Figure: tasks run over TLS, wrong-CA clients refused (redis-py, kombu), insecure URLs refused
at start-up (check, dispatch, worker), and connections those refusals made to Redis (0).
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from kombu import Connection

from hms_tasks import store, tls
from hms_tasks.errors import ConfigurationError
from tests.helpers import free_port, stop, wait_for
from tests.tlscerts import make_ca, make_cert

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]


class TlsRedis:
    """A TLS-only redis-server (no plain port) on a free loopback port."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ca, ca_key, ca_cert = make_ca(directory, "test-ca")
        self.other_ca, _, _ = make_ca(directory, "other-ca")
        cert, key = make_cert(directory, ca_key, ca_cert)
        self.port = free_port()
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not on PATH"
        self.proc = subprocess.Popen(
            [binary, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(cert), "--tls-key-file", str(key),
             "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no",
             "--save", "", "--appendonly", "no", "--dir", str(directory),
             "--logfile", str(directory / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.admin = redis.Redis(port=self.port, ssl=True, ssl_ca_certs=str(self.ca),
                                 socket_timeout=5, socket_connect_timeout=1)
        wait_for(self._up, what="redis-server over TLS")

    def _up(self) -> bool:
        try:
            return bool(self.admin.ping())
        except redis.ConnectionError:
            assert self.proc.poll() is None, "redis-server exited (built without TLS?)"
            return False

    def url(self, *, ca: Path | None = None, **query: str) -> str:
        params = {"ssl_ca_certs": str(ca or self.ca), **query}
        return f"rediss://127.0.0.1:{self.port}/0?" + "&".join(
            f"{k}={quote(v, safe='')}" for k, v in params.items())

    def connections(self) -> int:
        """Connections Redis has accepted so far (the admin client's own included)."""
        return int(self.admin.info("stats")["total_connections_received"])

    def stop(self) -> None:
        self.admin.close()
        stop(self.proc, timeout=10)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path_factory.mktemp("tls-redis"))
    try:
        yield server
    finally:
        server.stop()


def _env(tmp_path: Path, url: str, *, settings: str = "hms_tasks.demo.settings"
         ) -> dict[str, str]:
    # The demo settings: their Django caches (the hms-tasks cache too) are on REDIS_URL.
    return {**os.environ, "DJANGO_SETTINGS_MODULE": settings, "REDIS_URL": url,
            "MINIMAL_DB": str(tmp_path / "db.sqlite3"), "HMS_TASKS_HOME": str(tmp_path),
            "PYTHONPATH": os.pathsep.join((str(tmp_path), str(REPO)))}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hms_tasks", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=180)


def test_worker_and_dispatch_over_verified_tls(tls_redis: TlsRedis, tmp_path: Path) -> None:
    url = tls_redis.url()
    env = _env(tmp_path, url)
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "hms_tasks", "worker", "--pool", "solo",
         "-Q", "hms.metrics,hms.cache", "-n", "tls@%h", "--without-mingle", "--without-gossip",
         "--loglevel", "INFO"],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    runs = 0
    try:
        # Metrics (hms-tasks state through the store) and cache statistics (the Django cache
        # backend), each a broker message, a run and a result over TLS.
        for task in ("hms.metrics.collect_host", "hms.cache.stats") * 2:
            out = _cli(env, "dispatch", task, "--wait", "--timeout", "120")
            assert out.returncode == 0, out.stderr
            assert '"' in out.stdout  # the task's JSON summary
            runs += 1
        assert worker.poll() is None, "the worker exited"
    finally:
        stop(worker)
        stderr = worker.stderr.read().decode(errors="replace") if worker.stderr else ""
    # kombu warns when it falls back to no verification; it never did.
    assert "insecure SSL behaviour" not in stderr
    assert "CERT_NONE" not in stderr
    # Everything went through this TLS-only server: the run reports are there.
    reports = [k for k in tls_redis.admin.scan_iter(match="hms:report*")]
    assert reports, "no run report reached Redis"
    # A plain-text client gets nowhere on the TLS port.
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=tls_redis.port, socket_timeout=2, socket_connect_timeout=2).ping()
    print(f"\nRedis TLS: {runs}/{runs} dispatch --wait runs over rediss:// with verification"
          " (broker, results, hms-tasks state, Django cache), plain-text client refused")


def test_a_client_trusting_another_ca_is_refused(tls_redis: TlsRedis) -> None:
    wrong = tls_redis.url(ca=tls_redis.other_ca)
    refused = 0
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        store.client(url=wrong, socket_timeout=2).ping()
    refused += 1
    url, options = tls.celery_ssl(wrong)
    assert options is not None
    with Connection(url, ssl=options, transport="redis", connect_timeout=2) as conn, \
            pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
    refused += 1
    # The right CA, same clients: both connect.
    assert store.client(url=tls_redis.url(), socket_timeout=2).ping()
    url, options = tls.celery_ssl(tls_redis.url())
    with Connection(url, ssl=options, transport="redis", connect_timeout=2) as conn:
        conn.ensure_connection(max_retries=1)
    print(f"\nRedis TLS: clients trusting another CA refused {refused}/2 (redis-py, kombu)")


INSECURE = [{"ssl_cert_reqs": "none"}, {"ssl_cert_reqs": "CERT_NONE"},
            {"ssl_cert_reqs": "optional"}, {"ssl_check_hostname": "false"}]


def test_insecure_tls_is_refused_at_start_up_unless_allowed(tls_redis: TlsRedis,
                                                            tmp_path: Path) -> None:
    refusals = 0
    before = tls_redis.connections()
    for query in INSECURE:
        url = tls_redis.url(**query)
        env = _env(tmp_path, url)
        out = _cli(env, "check")
        assert out.returncode == 2, out.stderr
        assert "HMS_TASKS_REDIS_ALLOW_INSECURE_TLS" in out.stderr
        assert "CELERY_BROKER_URL" in out.stderr
        assert "CACHES['hms']" in out.stderr
        assert "Traceback" not in out.stderr
        assert str(tls_redis.port) not in out.stderr  # the URL is never echoed
        refusals += 1
        out = _cli(env, "dispatch", "hms.metrics.collect_host")
        assert out.returncode == 2, out.stderr
        assert "HMS_TASKS_REDIS_ALLOW_INSECURE_TLS" in out.stderr
        refusals += 1
    worker = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "hms_tasks", "worker", "--pool", "solo",
         "-Q", "hms.metrics", "-n", "insecure@%h", "--without-mingle", "--without-gossip"],
        env=_env(tmp_path, tls_redis.url(ssl_cert_reqs="none")), cwd=REPO,
        capture_output=True, text=True, timeout=180)
    assert worker.returncode != 0
    assert "HMS_TASKS_REDIS_ALLOW_INSECURE_TLS" in worker.stdout + worker.stderr
    refusals += 1
    # Only our own admin client's INFO calls connected: none of the refused processes did.
    made = tls_redis.connections() - before
    assert made == 0, f"{made} connections from refused processes"
    # In-process too: the store refuses to build such a client.
    with pytest.raises(ConfigurationError, match="HMS_TASKS_REDIS_ALLOW_INSECURE_TLS"):
        store.client(url=tls_redis.url(ssl_cert_reqs="none"))
    # Explicitly allowed: the check passes.
    (tmp_path / "insecure_allowed.py").write_text(
        "from tests.minimal_settings import *  # noqa\n"
        "HMS_TASKS_REDIS_ALLOW_INSECURE_TLS = True\n")
    out = _cli(_env(tmp_path, tls_redis.url(ssl_cert_reqs="none"), settings="insecure_allowed"),
               "check")
    assert out.returncode == 0, out.stderr
    print(f"\nRedis TLS: insecure URLs refused at start-up {refusals}/{2 * len(INSECURE) + 1}"
          f" (check, dispatch, worker), connections they made to Redis {made};"
          " allowed by HMS_TASKS_REDIS_ALLOW_INSECURE_TLS")


def test_celery_ssl_options_follow_the_url() -> None:
    url, options = tls.celery_ssl(
        "rediss://:secret@h:6380/1?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs=%2Fca.pem"
        "&ssl_check_hostname=true&health_check_interval=5")
    assert url == "rediss://:secret@h:6380/1?health_check_interval=5"
    assert options == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/ca.pem",
                       "ssl_check_hostname": True}
    assert tls.celery_ssl("redis://h/0") == ("redis://h/0", None)
    assert tls.normalized_url("rediss://h/0?ssl_cert_reqs=CERT_REQUIRED") == \
        "rediss://h/0?ssl_cert_reqs=required"


def test_an_unknown_cert_reqs_spelling_is_named(tls_redis: TlsRedis, tmp_path: Path) -> None:
    out = _cli(_env(tmp_path, tls_redis.url(ssl_cert_reqs="strict")), "check")
    assert out.returncode == 2, out.stderr
    assert "ssl_cert_reqs must be required, optional or none" in out.stderr
    assert "strict" not in out.stderr
