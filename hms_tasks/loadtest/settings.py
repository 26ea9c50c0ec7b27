"""The ``HMS_TASKS_LOADTEST_*`` settings: targets, named tests, limits, timings, directories.

Each test definition of ``HMS_TASKS_LOADTEST_TESTS`` is checked in full by
:mod:`hms_tasks.loadtest.spec` (at start-up and before every run); here only its shape.
"""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, field_validator

from hms_tasks import conf
from hms_tasks.allowlist import parse_url

__all__ = ["MAX_DURATION_CAP", "MAX_GRACE", "MAX_START_DELAY", "LoadtestSettings", "get"]

#: The highest HMS_TASKS_LOADTEST_MAX_DURATION may go: the shard task's hard time limit is
#: derived from these three (shards are acked at their start, so it is not bound by the
#: visibility timeout; the run's merge reports a shard whose worker died).
MAX_DURATION_CAP = 1800
MAX_GRACE = 60
MAX_START_DELAY = 30

_TARGET_ID = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
_TEST_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def _target_id(tid: str) -> str:
    if not _TARGET_ID.match(tid):
        raise ValueError("target ids are 1 to 40 lower-case letters, digits, '_' or '-',"
                         " starting with a letter")
    return tid


def _base_url(url: str) -> str:
    # parse_url's errors never quote the URL: it could carry a token.
    if parse_url(url).query:
        raise ValueError("a base URL has no query string")
    return url.rstrip("/")


def _test_name(name: str) -> str:
    if not _TEST_NAME.match(name):
        raise ValueError("test names are 1 to 64 of a-z 0-9 '_' '-'")
    return name


def _directory(value: Any) -> Any:
    return str(value) if isinstance(value, PurePath) else value


Directory = Annotated[str, BeforeValidator(_directory), Field(min_length=1)]


class LoadtestSettings(conf.Settings):
    """Load-test settings; every field is the Django setting ``HMS_TASKS_<FIELD>``."""

    #: The only targets load tests may hit: target id -> base URL (http or https). Tests name
    #: ids; a URL where an id is expected is refused.
    loadtest_targets: dict[Annotated[str, AfterValidator(_target_id)],
                           Annotated[str, AfterValidator(_base_url)]] = {}
    #: Named test definitions (see hms_tasks.loadtest.spec), run by name from the CLI, Flower
    #: or beat: test name -> definition (its "name" is the key).
    loadtest_tests: dict[Annotated[str, AfterValidator(_test_name)], dict[str, Any]] = {}
    #: The test the nightly beat entry (loadtest-nightly) runs; None: the entry does nothing.
    loadtest_nightly: str | None = None
    #: Limits of every test: users over all shards, seconds of load, shards.
    loadtest_max_users: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    loadtest_max_duration: Annotated[int, Field(ge=1, le=MAX_DURATION_CAP)] = MAX_DURATION_CAP
    loadtest_max_shards: Annotated[int, Field(ge=1, le=1000)] = 16
    #: Seconds from dispatch to the common start instant of a run's shards.
    loadtest_start_delay: Annotated[float, Field(ge=0.5, le=MAX_START_DELAY)] = 5.0
    #: Seconds past a run's end after which its shards are stopped whatever happens, and its
    #: results merged with whatever shards reported.
    loadtest_grace: Annotated[int, Field(ge=5, le=MAX_GRACE)] = 15
    #: A run whose p95 rose, or whose requests per second fell, by more than this fraction
    #: against the previous run of the same test is flagged as a regression (0.2 is 20 %).
    loadtest_regression_tolerance: Annotated[float, Field(gt=0, le=10)] = 0.2
    #: Directory user locustfiles must live in (scenario {"locustfile": path}).
    loadtest_scenarios_dir: Directory = Field(
        default_factory=lambda: str(conf.home() / "loadtest-scenarios"))
    #: Directory the merge writes HTML reports to (<run id>.html).
    loadtest_reports_dir: Directory = Field(
        default_factory=lambda: str(conf.home() / "loadtest-reports"))
    #: Days runs and reports stay in Redis.
    loadtest_keep_days: Annotated[int, Field(ge=1, le=365)] = 30
    #: Keep every request's raw response time in <reports dir>/<run id>/shard-<i>.raw (audits
    #: and tests; large).
    loadtest_keep_raw: bool = False
    #: OS-level containment of each shard's runner (a user locustfile is code): "auto" runs it
    #: in its own network namespace where this host allows it (root, or unprivileged user
    #: namespaces) and warns where not; "required" fails a shard that cannot be contained;
    #: "off" relies on the runner's Python-level connect guard only. See docs/loadtest.md.
    loadtest_containment: Literal["auto", "required", "off"] = "auto"

    @field_validator("loadtest_tests")
    @classmethod
    def _names_are_keys(cls, tests: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, definition in tests.items():
            if definition.get("name", name) != name:
                raise ValueError("a test's name is its key; leave 'name' out of its definition")
        return tests

    @field_validator("loadtest_nightly")
    @classmethod
    def _nightly_names_a_test(cls, nightly: str | None, info: ValidationInfo) -> str | None:
        tests = info.data.get("loadtest_tests")
        if nightly is not None and tests is not None and nightly not in tests:
            raise ValueError("must be None or the name of a test of HMS_TASKS_LOADTEST_TESTS"
                             f" (defined: {', '.join(sorted(tests)) or 'none'})")
        return nightly


get = conf.section(LoadtestSettings)
