"""HMS_TASKS_CACHE_*: defaults, per-kind TTLs merged over the defaults, and bad values refused
with an error naming the setting, never the value."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.fernet import Fernet
from django.test import override_settings

from hms_tasks import conf
from hms_tasks.cache import settings
from hms_tasks.cache.core import ttl_of
from hms_tasks.errors import ConfigurationError

SECRET = "s3cr3t-Jane-Doe-1970"


def test_defaults() -> None:
    s = settings.get()
    assert s.cache_alias == "hms"
    assert s.cache_ttl == settings.DEFAULT_TTL
    assert s.cache_encryption_keys == ()
    assert (s.cache_wait_ms, s.cache_lease_ms, s.cache_max_pending_tags) == (100, 5000, 100_000)
    assert s.cache_hot_score == 3.0


def test_ttl_merges_per_kind_and_falls_back_to_default() -> None:
    with override_settings(HMS_TASKS_CACHE_TTL={"patient": 60, "ward": 30}):
        assert ttl_of("patient") == 60
        assert ttl_of("ward") == 30
        assert ttl_of("schedule") == settings.DEFAULT_TTL["schedule"]
        assert ttl_of("anything") == settings.DEFAULT_TTL["default"]


def test_keys_may_be_a_list_and_are_kept_in_order() -> None:
    keys = [Fernet.generate_key().decode() for _ in range(2)]
    with override_settings(HMS_TASKS_CACHE_ENCRYPTION_KEYS=keys):
        assert settings.get().cache_encryption_keys == tuple(keys)


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("HMS_TASKS_CACHE_TTL", {"patient": 0}, "HMS_TASKS_CACHE_TTL['patient']: "),
    ("HMS_TASKS_CACHE_TTL", {"patient": 30 * 86400 + 1}, "HMS_TASKS_CACHE_TTL['patient']: "),
    ("HMS_TASKS_CACHE_TTL", {"patient": True}, "HMS_TASKS_CACHE_TTL['patient']: "),
    ("HMS_TASKS_CACHE_TTL", {f"{SECRET} x": 5.5}, "HMS_TASKS_CACHE_TTL[…]: "),
    ("HMS_TASKS_CACHE_TTL", SECRET, "HMS_TASKS_CACHE_TTL: "),
    ("HMS_TASKS_CACHE_ENCRYPTION_KEYS", [SECRET], "HMS_TASKS_CACHE_ENCRYPTION_KEYS[0]: is not a"
                                                  " Fernet key"),
    ("HMS_TASKS_CACHE_ENCRYPTION_KEYS", SECRET, "HMS_TASKS_CACHE_ENCRYPTION_KEYS: must be a"
                                                " list"),
    ("HMS_TASKS_CACHE_ENCRYPTION_KEYS", [b"x"], "HMS_TASKS_CACHE_ENCRYPTION_KEYS[0]: "),
    ("HMS_TASKS_CACHE_WAIT_MS", -1, "HMS_TASKS_CACHE_WAIT_MS: "),
    ("HMS_TASKS_CACHE_WAIT_MS", 10_001, "HMS_TASKS_CACHE_WAIT_MS: "),
    ("HMS_TASKS_CACHE_WAIT_MS", "100", "HMS_TASKS_CACHE_WAIT_MS: "),
    ("HMS_TASKS_CACHE_LEASE_MS", 99, "HMS_TASKS_CACHE_LEASE_MS: "),
    ("HMS_TASKS_CACHE_LEASE_MS", 600_001, "HMS_TASKS_CACHE_LEASE_MS: "),
    ("HMS_TASKS_CACHE_HOT_SCORE", 0, "HMS_TASKS_CACHE_HOT_SCORE: "),
    ("HMS_TASKS_CACHE_HOT_SCORE", float("nan"), "HMS_TASKS_CACHE_HOT_SCORE: "),
    ("HMS_TASKS_CACHE_HOT_SCORE", True, "HMS_TASKS_CACHE_HOT_SCORE: "),
    ("HMS_TASKS_CACHE_MAX_PENDING_TAGS", 99, "HMS_TASKS_CACHE_MAX_PENDING_TAGS: "),
    ("HMS_TASKS_CACHE_MAX_PENDING_TAGS", 10_000_001, "HMS_TASKS_CACHE_MAX_PENDING_TAGS: "),
    ("HMS_TASKS_CACHE_ALIAS", "", "HMS_TASKS_CACHE_ALIAS: "),
])
def test_bad_values_name_the_setting_not_the_value(setting: str, value: Any,
                                                   message: str) -> None:
    with override_settings(**{setting: value}):
        with pytest.raises(ConfigurationError) as info:
            settings.get()
        assert str(info.value).startswith(message)
        assert SECRET not in str(info.value)
        # The start-up check reports it too.
        assert any(line.startswith(message) for line in conf.check_all())

