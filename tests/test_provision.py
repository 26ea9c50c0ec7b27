"""Redis provisioning: REDIS_URL, the default URL, a private redis-server, and the errors.

Real redis-server processes throughout; the only thing a test changes is the environment.
"""

from __future__ import annotations

import socket
from pathlib import Path

import psutil
import pytest
import redis

from hms_tasks.demo.stack.provision import (
    ProvisionedRedis,
    RedisUnavailable,
    provision_redis,
    redact_url,
    redis_location,
)
from hms_tasks.errors import HmsTasksError
from tests.helpers import RedisServer, free_port, wait_for


def _dead_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


def _config(client: redis.Redis, name: str) -> str:
    return str(client.config_get(name)[name])


def test_location_and_redaction_hide_the_password() -> None:
    url = "redis://alice:s3cret@cache.internal:6390/2"
    assert redis_location(url) == "cache.internal:6390"
    assert redact_url(url) == "redis://alice:***@cache.internal:6390/2"
    assert redact_url("redis://:s3cret@127.0.0.1/0") == "redis://:***@127.0.0.1/0"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redis_location("redis://[::1]:7000/0") == "[::1]:7000"
    assert redis_location("unix:///run/redis.sock") == "/run/redis.sock"


def test_redis_url_in_env_is_used(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    with provision_redis(state_dir=tmp_path, default_url=_dead_url()) as found:
        assert found.source == "env"
        assert found.url == redis_server.url
        assert found.process is None
    # Nothing was started, so nothing was written under the state dir.
    assert not (tmp_path / "redis").exists()
    assert redis.Redis.from_url(redis_server.url).ping()  # leaving the block left it running


def test_unreachable_redis_url_is_an_error_without_the_password(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    port = free_port()
    monkeypatch.setenv("REDIS_URL", f"redis://:secret@127.0.0.1:{port}/0")
    with pytest.raises(RedisUnavailable) as caught:
        provision_redis(state_dir=tmp_path, default_url=_dead_url())
    message = str(caught.value)
    assert "REDIS_URL is set" in message
    assert f"127.0.0.1:{port}" in message
    assert "secret" not in message
    assert isinstance(caught.value, HmsTasksError)
    # It did not fall back to starting a private server.
    assert not (tmp_path / "redis").exists()


def test_redis_answering_on_the_default_url_is_used(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    found = provision_redis(state_dir=tmp_path, default_url=redis_server.url)
    assert (found.source, found.url, found.process) == ("default", redis_server.url, None)


def test_private_redis_server_is_started_and_stopped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    lines: list[str] = []
    with provision_redis(
        state_dir=tmp_path, default_url=_dead_url(), allow_install=False, echo=lines.append
    ) as private:
        assert private.source == "private"
        assert private.process is not None
        pid = private.process.pid
        port = int(private.url.rsplit(":", 1)[1].split("/")[0])
        client = redis.Redis.from_url(private.url)
        assert client.ping()
        data_dir = (tmp_path / "redis").resolve()
        assert private.data_dir == data_dir
        # Configured as a broker, with its data under the state dir.
        assert Path(_config(client, "dir")).resolve() == data_dir
        assert _config(client, "appendonly") == "yes"
        assert _config(client, "appendfsync") == "everysec"
        assert _config(client, "save") == ""
        assert _config(client, "maxmemory-policy") == "noeviction"
        assert _config(client, "bind").split() == ["127.0.0.1"]
        assert (data_dir / "redis.log").is_file()
        client.set("survives", "restart")
        client.close()
        assert any(f"pid {pid}" in line for line in lines)
    assert not psutil.pid_exists(pid)
    assert _port_closed(port)
    private.stop()  # idempotent

    # The AOF kept the data: a second private server on the same state dir sees it.
    with provision_redis(
        state_dir=tmp_path, default_url=_dead_url(), allow_install=False, echo=lines.append
    ) as again:
        assert redis.Redis.from_url(again.url).get("survives") == b"restart"


def test_private_server_left_over_by_a_killed_run_is_replaced(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    lines: list[str] = []
    # `first` is never stopped, as if the supervisor that started it had been SIGKILLed.
    first = provision_redis(state_dir=tmp_path, default_url=_dead_url(), echo=lines.append)
    assert first.process is not None
    old_pid = first.process.pid
    wait_for(lambda: (tmp_path / "redis" / "redis.pid").is_file(), what="redis.pid")
    try:
        with provision_redis(
            state_dir=tmp_path, default_url=_dead_url(), echo=lines.append
        ) as second:
            assert first.process.poll() is not None, "the stale server is still running"
            assert second.process is not None
            assert second.process.pid != old_pid
            assert redis.Redis.from_url(second.url).ping()
        assert any(f"left over from an earlier run (pid {old_pid})" in line for line in lines)
    finally:
        first.stop()


def test_no_redis_anywhere_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no redis-server, no apt-get
    with pytest.raises(RedisUnavailable) as caught:
        provision_redis(state_dir=tmp_path, default_url=_dead_url())
    message = str(caught.value)
    assert "sudo apt-get install redis-server" in message
    assert "brew install redis" in message
    assert "docker compose up redis" in message
    assert "REDIS_URL" in message


def test_repr_hides_the_password() -> None:
    found = ProvisionedRedis(url="redis://:secret@127.0.0.1:6379/0", source="env")
    assert "secret" not in repr(found)
    assert found.location == "127.0.0.1:6379"
