"""HMS_TASKS_SERVICES: no library default, the demo's services, defaults per field, validation
that names the entry and field, and the registry as the allowlist (unknown names and foreign
hosts refused)."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

from hms_tasks import health
from hms_tasks.errors import ConfigurationError, UnknownService
from hms_tasks.health import registry
from hms_tasks.health import settings as health_settings
from tests.health_servers import only

REPO = Path(__file__).resolve().parent.parent


def test_the_library_watches_no_service_unless_told() -> None:
    # A HMS that configures nothing is never swept against placeholders.
    assert health_settings.HealthSettings.model_validate({}).services == {}
    assert health_settings.HealthSettings.model_validate({}).breaker_fail_open is True


def test_the_demo_watches_its_api_database_and_redis() -> None:
    from django.conf import settings

    found = registry.services()
    assert sorted(found) == ["api", "database", "redis"]
    assert found["api"].check.type == "http"
    assert found["api"].check.path == "/healthz"
    assert found["database"].check.type == "database"
    assert [i.id for i in found["database"].instances] == ["default"]
    assert found["redis"].check.type == "redis"
    for svc in (found["api"], found["redis"]):
        for inst in svc.instances:
            assert ipaddress.ip_address(inst.host).is_loopback
    assert settings.HMS_TASKS_SERVICES["api"]["instances"] == [
        settings.HMS_TASKS_LOADTEST_TARGETS["demo"]]


def test_fields_left_out_take_the_defaults_and_none_entries_are_ignored() -> None:
    with override_settings(HMS_TASKS_SERVICES={
        "ehr": {"instances": ["https://10.1.2.3:8443/ehr/", "https://ehr-2.hospital.internal"],
                "timeout": 1.5, "breaker": {"failure_threshold": 3}},
        "billing": None,
        "cache-redis": {"instances": ["redis://:secret@127.0.0.1:6390/2"],
                        "check": {"type": "redis"}},
    }):
        found = registry.services()
        assert sorted(found) == ["cache-redis", "ehr"]
        ehr = found["ehr"]
        assert [i.id for i in ehr.instances] == ["10.1.2.3:8443/ehr", "ehr-2.hospital.internal:443"]
        assert ehr.instances[0].base_url == "https://10.1.2.3:8443/ehr"
        assert ehr.check.path == "/healthz"  # the default check
        assert ehr.timeout == 1.5
        assert ehr.retries == health_settings.SERVICE_DEFAULTS["retries"]
        assert ehr.breaker.failure_threshold == 3
        assert ehr.breaker.reset_timeout == health_settings.BREAKER_DEFAULTS["reset_timeout"]
        cache_redis = found["cache-redis"]
        # The password stays in the URL the check uses, never in the id that is shown nor in
        # the repr of the settings or the registry.
        assert cache_redis.instances[0].id == "127.0.0.1:6390"
        assert "secret" not in repr(cache_redis)
        assert "secret" not in repr(health_settings.get())


X = "HMS_TASKS_SERVICES['x']"
HTTP = ["http://127.0.0.1:80"]


@pytest.mark.parametrize(("entry", "message"), [
    ({"instances": ["http://127.0.0.1:99999"]},
     f"{X}['instances'][0]: is not a valid URL (bad host or port)"),
    ({"instances": ["not a url"]}, f"{X}['instances'][0]: an http check takes http:// or https://"),
    ({"instances": ["http://bad host:80"]}, f"{X}['instances'][0]: has a host that is neither"),
    ({"instances": ["ftp://127.0.0.1:21"]}, f"{X}['instances'][0]: an http check takes"),
    ({"instances": ["http://user:pw@127.0.0.1:80"]},
     f"{X}['instances'][0]: must not carry credentials"),
    ({"instances": HTTP, "timeout": -1},
     f"{X}['timeout']: must be a number of seconds above 0 and at most 10"),
    ({"instances": HTTP, "timeout": 0}, f"{X}['timeout']: must be a number of seconds above 0"),
    ({"instances": HTTP, "timeout": "2"}, f"{X}['timeout']: must be a number of seconds"),
    ({"instances": HTTP, "retries": -2}, f"{X}['retries']: must be an integer from 0 to 5"),
    ({"instances": HTTP, "retries": True}, f"{X}['retries']: must be an integer from 0 to 5"),
    ({"instances": HTTP, "max_connections": 0},
     f"{X}['max_connections']: must be an integer from 1 to 1000"),
    ({"instances": []}, f"{X}['instances']: must be a list of 1 to 1000 base URLs"),
    ({"timeout": 1}, f"{X}['instances']: required"),
    ({"instances": ["http://127.0.0.1:80", "http://127.0.0.1:80/"]},
     f"{X}['instances']: lists the same instance (host, port and path) twice"),
    ({"instances": HTTP, "check": {"type": "ping"}},
     f"{X}['check']: must be a dict whose type is one of database, http, redis, tcp"),
    ({"instances": HTTP, "check": {"type": "tcp", "path": "/"}},
     f"{X}['check']: a tcp check takes only type"),
    ({"instances": HTTP, "check": {"type": "http", "path": "healthz"}},
     f"{X}['check']['path']: must be an absolute path like /healthz"),
    ({"instances": HTTP, "check": {"type": "http", "expect_status": 999}},
     f"{X}['check']['expect_status']: must be an HTTP status or a list of them (100-599)"),
    ({"instances": HTTP, "check": {"json_value": "ok"}},
     f"{X}['check']: json_value needs json_field"),
    ({"instances": ["tcp://127.0.0.1"], "check": {"type": "tcp"}},
     f"{X}['instances'][0]: a tcp:// URL needs a port and no path"),
    ({"instances": ["nodb"], "check": {"type": "database"}},
     f"{X}['instances'][0]: a database check's instances are aliases in DATABASES"),
    ({"instances": HTTP, "breaker": {"reset_timeout": -5}},
     f"{X}['breaker']['reset_timeout']: must be a number of seconds above 0 and at most 3600"),
    ({"instances": HTTP, "breaker": {"trip_after": 3}},
     f"{X}['breaker']: unknown field trip_after; allowed: failure_threshold, failure_window,"),
    ({"instances": HTTP, "colour": "red"},
     f"{X}: unknown field colour; allowed: check, instances, timeout,"),
    ("http://127.0.0.1:80", f"{X}: must be a dict"),
])
def test_bad_entries_are_refused_naming_entry_and_field(entry: Any, message: str) -> None:
    with override_settings(HMS_TASKS_SERVICES={"x": entry}), \
            pytest.raises(ConfigurationError) as info:
        health_settings.get()
    assert str(info.value).startswith(message)
    assert "pw" not in str(info.value)
    assert "127.0.0.1" not in str(info.value)  # never quotes a value


def test_service_names_and_the_whole_setting_are_checked() -> None:
    with override_settings(HMS_TASKS_SERVICES={"Jane Doe": {"instances": HTTP}}), \
            pytest.raises(ConfigurationError, match="service names are 1 to 40") as info:
        health_settings.get()
    assert "Jane" not in str(info.value)
    with override_settings(HMS_TASKS_SERVICES=["http://127.0.0.1:80"]), \
            pytest.raises(ConfigurationError, match="HMS_TASKS_SERVICES: must be a dict"):
        health_settings.get()


def test_a_sweep_that_could_outlast_its_budget_is_refused() -> None:
    entry = {"instances": [f"http://127.0.0.1:{9000 + i}" for i in range(30)], "timeout": 10,
             "max_connections": 1}
    with override_settings(HMS_TASKS_SERVICES={"x": entry}), \
            pytest.raises(ConfigurationError, match=r"HMS_TASKS_SERVICES\['x'\]: .*budget"):
        health_settings.get()


def test_a_bad_registry_stops_start_up_naming_the_entry(tmp_path: Path) -> None:
    (tmp_path / "bad_services_settings.py").write_text(
        "from hms_tasks.demo.settings import *  # noqa\n"
        "HMS_TASKS_SERVICES = {'ehr': {'timeout': -1}}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "hms_tasks", "check"],
        env={**os.environ, "PYTHONPATH": os.pathsep.join((str(tmp_path), str(REPO))),
             "DJANGO_SETTINGS_MODULE": "bad_services_settings"},
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode != 0
    # (".timeout" is the old HmsSettings' spelling, still checked until conf.py drops it.)
    assert re.search(r"HMS_TASKS_SERVICES\['ehr'\](\['timeout'\]|\.timeout): must be a number"
                     r" of seconds above 0 and at most 10", proc.stderr)


def test_unknown_service_names_are_refused() -> None:
    ehr = {"instances": ["http://127.0.0.1:8102"]}
    with override_settings(HMS_TASKS_SERVICES=only(ehr=ehr)):
        _unknown_names_are_refused()


def _unknown_names_are_refused() -> None:
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
            pytest.raises(ConfigurationError,
                          match="HMS_TASKS_BREAKER_FAIL_OPEN: must be True or False"):
        health_settings.get()


def test_the_public_api_and_task_names() -> None:
    from hms_tasks.health import names

    assert sorted(health.__all__) == ["Guard", "Lease", "ServiceUnavailable", "UnknownService",
                                      "breaker_state_changed", "guard", "lease", "pick"]
    for module in (health, health_settings, names):
        assert all(hasattr(module, name) for name in module.__all__)
    assert (names.HEALTH_SWEEP, names.HEALTH_CHECK_SERVICE) == (
        "hms.health.sweep", "hms.health.check_service")
