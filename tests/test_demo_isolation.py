"""The library is safe without the demo: no module outside ``hms_tasks/demo/`` imports it.

Static (``ast``), so an import inside a function body counts too: a lazy import still makes the
library depend on the demo.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import hms_tasks

PACKAGE = Path(hms_tasks.__file__).resolve().parent
DEMO = PACKAGE / "demo"

# Until the core command line drops its old `run` and `seed` (the demo mounts its own through
# entry points), hms_tasks/cli.py still holds them. Empty this once it does.
_PENDING: dict[str, set[str]] = {}


def _imported(tree: ast.AST, *, module: str) -> set[str]:
    """Absolute names of the modules ``tree`` imports (relative imports resolved)."""
    found: set[str] = set()
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _is_demo(name: str) -> bool:
    return name == "hms_tasks.demo" or name.startswith("hms_tasks.demo.")


def _demo_imports_outside_demo() -> dict[str, set[str]]:
    offenders: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if DEMO in path.parents:
            continue
        rel = path.relative_to(PACKAGE)
        module = ".".join(("hms_tasks", *rel.with_suffix("").parts))
        names = _imported(ast.parse(path.read_text(), filename=str(path)), module=module)
        allowed = _PENDING.get(str(rel), set())
        bad = {
            n for n in names
            if _is_demo(n) and not any(n == a or n.startswith(a + ".") for a in allowed)
        }
        if bad:
            offenders[str(rel)] = bad
    return offenders


def test_nothing_outside_the_demo_imports_it() -> None:
    assert _demo_imports_outside_demo() == {}


def test_the_scan_sees_relative_and_from_imports() -> None:
    # The checker has teeth: every spelling of a demo import is caught.
    for source, module in (
        ("from hms_tasks.demo.stack import supervisor", "hms_tasks.x"),
        ("from hms_tasks import demo", "hms_tasks.x"),
        ("from .demo import seed", "hms_tasks.x"),
        ("def f():\n    import hms_tasks.demo.seed", "hms_tasks.x"),
        ("from ..demo import api", "hms_tasks.cache.core"),
    ):
        names = _imported(ast.parse(source), module=module)
        assert any(_is_demo(n) for n in names), source


def test_the_dev_stack_left_the_core() -> None:
    assert not (PACKAGE / "supervisor.py").exists()
    assert not (PACKAGE / "provision.py").exists()
    assert (DEMO / "stack" / "supervisor.py").exists()


# --- The demo settings, chosen by default, say so ----------------------------------------------

_WARNING = "DJANGO_SETTINGS_MODULE is not set: running on the demo HMS settings"
_SETUP = "import django; django.setup(); from django.conf import settings; settings.INSTALLED_APPS"


def _python(code: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DJANGO_SETTINGS_MODULE", "HMS_TASKS_SETTINGS_DEFAULTED")}
    env["HMS_TASKS_HOME"] = str(tmp_path)
    env.update(extra)
    return env


def test_demo_settings_picked_by_default_warn_once(tmp_path: Path) -> None:
    demo = "hms_tasks.demo.settings"
    marked = _env(tmp_path, DJANGO_SETTINGS_MODULE=demo, HMS_TASKS_SETTINGS_DEFAULTED=demo)
    assert _python(_SETUP, marked).count(_WARNING) == 1
    # Named on purpose: no warning.
    assert _WARNING not in _python(_SETUP, _env(tmp_path, DJANGO_SETTINGS_MODULE=demo))
    # A project's settings that build on the demo's, with a mark inherited from a parent that
    # fell back: not the defaulted module, no warning.
    project = tmp_path / "project_settings.py"
    project.write_text("from hms_tasks.demo.settings import *  # noqa\n")
    inherited = _env(tmp_path, DJANGO_SETTINGS_MODULE="project_settings",
                     HMS_TASKS_SETTINGS_DEFAULTED=demo,
                     PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    assert _WARNING not in _python(_SETUP, inherited)


def test_the_core_fallback_warns_once_per_process(tmp_path: Path) -> None:
    code = f"import hms_tasks.celery; from hms_tasks.celery import app; {_SETUP}"
    assert _python(code, _env(tmp_path)).count(_WARNING) == 1
