"""docker-compose.yml: no Docker engine runs here, so check what can be checked without one:
every service's command names a real entry point with valid options, the workers cover every
queue, long-running services have health checks, and every variable is documented."""

from __future__ import annotations

import importlib
import re
import shlex
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from hms_tasks import names
from hms_tasks.cli import cli

REPO = Path(__file__).resolve().parent.parent
VAR_RE = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::?[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


def _argv(command: str) -> list[str]:
    # Compose substitutes ${VAR:-default}; use the default, or a placeholder value.
    def sub(m: re.Match[str]) -> str:
        text = m.group(0)
        return text.split(":-", 1)[1][:-1] if ":-" in text else "placeholder"

    return shlex.split(VAR_RE.sub(sub, command).replace("$$", "$"))


def _our_services(compose: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in compose["services"].items() if "build" in v}


def test_expected_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"redis", "postgres", "migrate", "web", "worker",
                                        "worker-loadtest", "beat", "flower",
                                        # profile sentinel
                                        "redis-master", "redis-replica-1", "redis-replica-2",
                                        "sentinel-1", "sentinel-2", "sentinel-3"}
    assert "--appendonly yes" in compose["services"]["redis"]["command"]
    assert (REPO / "Dockerfile").exists()
    assert all(s["build"] == "." for s in _our_services(compose).values())


def test_every_command_names_a_real_entry_point(compose: dict[str, Any]) -> None:
    celery_commands = {"worker", "beat", "inspect"} | {
        e.name for e in entry_points(group="celery.commands")}
    for name, service in _our_services(compose).items():
        argv = _argv(service["command"])
        program = argv[0]
        if program == "celery":
            assert argv[1:3] == ["-A", "hms_tasks"], name
            assert argv[3] in celery_commands, f"{name}: celery has no {argv[3]!r} command"
        elif program == "hms-tasks":
            # As `hms-tasks` resolves it: core, capability and plugin (demo) commands.
            command = cli.get_command(click.Context(cli), argv[1])
            assert command is not None, f"{name}: hms-tasks has no {argv[1]!r} command"
            command.make_context(argv[1], argv[2:])  # raises on an unknown option
        elif program == "gunicorn":
            module, attr = argv[1].split(":")
            assert callable(getattr(importlib.import_module(module), attr)), name
        else:
            pytest.fail(f"{name}: unexpected program {program!r}")


def test_workers_cover_every_queue_and_loadtests_run_apart(compose: dict[str, Any]) -> None:
    queues: dict[str, set[str]] = {}
    for name, service in _our_services(compose).items():
        argv = _argv(service["command"])
        if argv[3] == "worker":
            queues[name] = set(argv[argv.index("-Q") + 1].split(","))
    assert set().union(*queues.values()) == set(names.ALL_QUEUES)
    assert queues["worker-loadtest"] == {"hms.loadtest"}
    assert "hms.loadtest" not in queues["worker"]


def test_flower_requires_auth(compose: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    # Required (":?"): compose refuses to start without it; Flower reads it from the env.
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert flower["environment"]["REDIS_URL"] == compose["services"]["worker"]["environment"][
        "REDIS_URL"]
    assert "--address=0.0.0.0" in _argv(flower["command"])
    assert all(p.startswith("127.0.0.1:") for p in flower["ports"])


def test_long_running_services_have_health_checks(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name != "migrate":
            assert "healthcheck" in service, name


def test_the_sentinel_profile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    profile = {n for n, s in services.items() if "sentinel" in s.get("profiles", [])}
    assert profile == {"redis-master", "redis-replica-1", "redis-replica-2", "sentinel-1",
                       "sentinel-2", "sentinel-3"}
    for name in ("redis-master", "redis-replica-1", "redis-replica-2"):
        assert "--min-replicas-to-write 1" in services[name]["command"], name
        assert "--appendonly yes" in services[name]["command"], name
    for name in ("redis-replica-1", "redis-replica-2"):
        assert "--replicaof redis-master 6379" in services[name]["command"]
    for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
        script = services[name]["command"][-1]
        assert "sentinel monitor mymaster redis-master 6379 2" in script
        assert "--sentinel" in script
    # Every hms-tasks process reads the sentinels from the environment (demo settings).
    env = services["worker"]["environment"]
    assert {"REDIS_SENTINELS", "REDIS_SENTINEL_MASTER"} <= set(env)


def test_every_variable_is_documented() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    # The environment variables' reference is docs/configuration.md (the README links it).
    readme = (REPO / "docs" / "configuration.md").read_text()
    variables = set(VAR_RE.findall(text))
    assert variables, "the pattern found no variables"
    undocumented = sorted(v for v in variables if f"`{v}`" not in readme)
    assert undocumented == []
