"""HMS_TASKS_SERVICES: defaults, merging, validation that names the entry and field, and the
registry as the allowlist (unknown names and foreign hosts refused)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

from hms_tasks import conf, health
from hms_tasks.errors import ConfigurationError, UnknownService
from hms_tasks.health import registry
from tests.health_servers import only

REPO = Path(__file__).resolve().parent.parent


def test_defaults_are_the_eight_services_on_loopback_only() -> None:
    found = registry.services()
    assert list(found) == ["patient", "ehr", "appointment", "billing", "pharmacy",
                           "laboratory", "imaging", "notification"]
    for svc in found.values():
        assert svc.check.type == "http"
        assert svc.check.path == "/healthz"
        assert svc.timeout > 0
        for inst in svc.instances:
            assert ipaddress.ip_address(inst.host).is_loopback
            assert inst.id == f"{inst.host}:{inst.port}"


def test_a_deployment_overrides_fields_and_drops_services() -> None:
    with override_settings(HMS_TASKS_SERVICES={
        "ehr": {"instances": ["https://10.1.2.3:8443/ehr/", "https://ehr-2.hospital.internal"],
                "timeout": 1.5, "breaker": {"failure_threshold": 3}},
        "billing": None,
        "cache-redis": {"instances": ["redis://:secret@127.0.0.1:6390/2"],
                        "check": {"type": "redis"}},
    }):
        found = registry.services()
        assert "billing" not in found
        assert "patient" in found  # untouched defaults stay
        ehr = found["ehr"]
        assert [i.id for i in ehr.instances] == ["10.1.2.3:8443/ehr", "ehr-2.hospital.internal:443"]
        assert ehr.instances[0].base_url == "https://10.1.2.3:8443/ehr"
        assert ehr.check.path == "/healthz"  # the default check, kept
        assert ehr.timeout == 1.5
        assert ehr.breaker.failure_threshold == 3
        assert ehr.breaker.reset_timeout == conf.BREAKER_DEFAULTS["reset_timeout"]
        cache_redis = found["cache-redis"]
        # The password stays in the URL the check uses, never in the id that is shown.
        assert cache_redis.instances[0].id == "127.0.0.1:6390"
        assert "secret" not in repr(cache_redis.instances[0].id)


@pytest.mark.parametrize(("entry", "where"), [
    ({"instances": ["http://127.0.0.1:99999"]}, "HMS_TASKS_SERVICES['x'].instances[0]"),
    ({"instances": ["not a url"]}, "HMS_TASKS_SERVICES['x'].instances[0]"),
    ({"instances": ["http://bad host:80"]}, "HMS_TASKS_SERVICES['x'].instances[0]"),
    ({"instances": ["ftp://127.0.0.1:21"]}, "HMS_TASKS_SERVICES['x'].instances[0]"),
    ({"instances": ["http://user:pw@127.0.0.1:80"]}, "HMS_TASKS_SERVICES['x'].instances[0]"),
    ({"instances": ["http://127.0.0.1:80"], "timeout": -1}, "HMS_TASKS_SERVICES['x'].timeout"),
    ({"instances": ["http://127.0.0.1:80"], "timeout": 0}, "HMS_TASKS_SERVICES['x'].timeout"),
    ({"instances": ["http://127.0.0.1:80"], "retries": -2}, "HMS_TASKS_SERVICES['x'].retries"),
    ({"instances": ["http://127.0.0.1:80"], "max_connections": 0},
     "HMS_TASKS_SERVICES['x'].max_connections"),
    ({"instances": []}, "HMS_TASKS_SERVICES['x'].instances"),
    ({"instances": ["http://127.0.0.1:80", "http://127.0.0.1:80/"]},
     "HMS_TASKS_SERVICES['x'].instances"),
    ({"instances": ["http://127.0.0.1:80"], "check": {"type": "ping"}},
     "HMS_TASKS_SERVICES['x'].check"),
    ({"instances": ["http://127.0.0.1:80"], "check": {"type": "http", "path": "healthz"}},
     "HMS_TASKS_SERVICES['x'].check.path"),
    ({"instances": ["http://127.0.0.1:80"], "check": {"type": "http", "expect_status": 999}},
     "HMS_TASKS_SERVICES['x'].check.expect_status"),
    ({"instances": ["tcp://127.0.0.1"], "check": {"type": "tcp"}},
     "HMS_TASKS_SERVICES['x'].instances[0]"),
    ({"instances": ["nodb"], "check": {"type": "database"}},
     "HMS_TASKS_SERVICES['x'].instances[0]"),
    ({"instances": ["http://127.0.0.1:80"], "breaker": {"reset_timeout": -5}},
     "HMS_TASKS_SERVICES['x'].breaker.reset_timeout"),
    ({"instances": ["http://127.0.0.1:80"], "breaker": {"trip_after": 3}},
     "HMS_TASKS_SERVICES['x'].breaker"),
    ({"instances": ["http://127.0.0.1:80"], "colour": "red"}, "HMS_TASKS_SERVICES['x']"),
])
def test_bad_entries_are_refused_naming_entry_and_field(entry: dict[str, Any],
                                                        where: str) -> None:
    with override_settings(HMS_TASKS_SERVICES={"x": entry}), \
            pytest.raises(ConfigurationError) as info:
        conf.get()
    assert str(info.value).startswith(where)
    assert "pw" not in str(info.value)


def test_a_sweep_that_could_outlast_its_budget_is_refused() -> None:
    entry = {"instances": [f"http://127.0.0.1:{9000 + i}" for i in range(30)], "timeout": 10,
             "max_connections": 1}
    with override_settings(HMS_TASKS_SERVICES={"x": entry}), \
            pytest.raises(ConfigurationError, match="budget"):
        conf.get()


def test_a_bad_registry_stops_start_up_naming_the_entry(tmp_path: Path) -> None:
    (tmp_path / "bad_services_settings.py").write_text(
        "from hms_tasks.demo.settings import *  # noqa\n"
        "HMS_TASKS_SERVICES = {'ehr': {'timeout': -1}}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "hms_tasks", "check"],
        env={**os.environ, "PYTHONPATH": str(tmp_path),
             "DJANGO_SETTINGS_MODULE": "bad_services_settings"},
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode != 0
    assert "HMS_TASKS_SERVICES['ehr'].timeout" in proc.stderr


def test_unknown_service_names_are_refused() -> None:
    with pytest.raises(UnknownService, match="unknown service 'radiology'"):
        health.guard("radiology")
    with pytest.raises(UnknownService, match="no service name"):
        registry.get("Jane Doe, 1970-01-01")
    with pytest.raises(UnknownService):
        health.pick("radiology")
    with pytest.raises(UnknownService, match="no such instance"):
        health.guard("ehr", instance="127.0.0.1:1")


def test_only_registered_hosts_are_allowed() -> None:
    with override_settings(HMS_TASKS_SERVICES=only(
            a={"instances": ["http://127.0.0.1:8201", "https://svc.hospital.internal/x"]})):
        assert registry.require_allowed("http://127.0.0.1:8201/healthz") == ("127.0.0.1", 8201)
        assert registry.require_allowed("https://SVC.hospital.internal/other") == (
            "svc.hospital.internal", 443)
        for url in ("http://127.0.0.2:8201/", "http://127.0.0.1:8202/",
                    "http://169.254.169.254/latest/meta-data/", "http://[::1]:8201/",
                    "http://127.0.0.1:notaport/"):
            with pytest.raises(UnknownService) as info:
                registry.require_allowed(url)
            assert "169.254" not in str(info.value)


def test_fail_open_setting_must_be_a_bool() -> None:
    with override_settings(HMS_TASKS_BREAKER_FAIL_OPEN="no"), \
            pytest.raises(ConfigurationError, match="HMS_TASKS_BREAKER_FAIL_OPEN"):
        conf.get()
