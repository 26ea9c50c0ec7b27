"""The cache's public API: ``hms_tasks.cache.__all__`` (as httpx checks its own), and the
import-light task names."""

from __future__ import annotations

import os
import subprocess
import sys
from types import ModuleType

import pytest

import hms_tasks.cache
from hms_tasks.cache import names, settings


def test_all_names_exist_and_are_public() -> None:
    exported = hms_tasks.cache.__all__
    assert exported == sorted(exported)
    assert len(set(exported)) == len(exported)
    for name in exported:
        assert not name.startswith("_"), name
        assert getattr(hms_tasks.cache, name) is not None, name
        assert not isinstance(getattr(hms_tasks.cache, name), ModuleType), name


def test_every_public_member_is_exported() -> None:
    for name in hms_tasks.cache.__all__:
        getattr(hms_tasks.cache, name)
    public = {
        name for name, value in vars(hms_tasks.cache).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
        and name not in ("annotations", "importlib", "TYPE_CHECKING")
    }
    assert public == set(hms_tasks.cache.__all__)


def test_exported_names_are_the_ones_behind_them() -> None:
    from hms_tasks.cache import core, registry, tracking

    assert hms_tasks.cache.get_or_build is core.get_or_build
    assert hms_tasks.cache.register_kind is registry.register_kind
    assert hms_tasks.cache.register_model is tracking.register_model


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="get_or_bild"):
        hms_tasks.cache.get_or_bild  # noqa: B018


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**clean, **env})


def test_the_contract_imports_without_django_settings() -> None:
    out = _python("from hms_tasks.cache import get_or_build, register_kind, register_model;"
                  "print(get_or_build.__module__, register_model.__module__)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["hms_tasks.cache.core", "hms_tasks.cache.tracking"]


def test_cache_names_are_import_light() -> None:
    out = _python(
        "import sys, hms_tasks.cache.names;"
        "print(sorted(m for m in ('celery', 'django', 'kombu', 'redis') if m in sys.modules))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cache_names_match_their_tasks() -> None:
    from hms_tasks import names as core_names
    from hms_tasks.cache import tasks

    for name in names.__all__:
        value = getattr(names, name)
        assert value.startswith("hms.cache.")
        assert getattr(tasks, value.rsplit(".", 1)[1]).name == value
        # Until the core's names module is slimmed down, both say the same.
        assert getattr(core_names, name, value) == value


def test_settings_section_is_registered() -> None:
    assert settings.get().cache_alias == "hms"
