"""Load-test definitions: what a test is, how it is checked, how it splits into shards.

A definition is a JSON object (from ``HMS_TASKS_LOADTEST_TESTS``, a JSON or YAML file, or CLI
flags)::

    {
        "name": "smoke",                 # [a-z0-9_-], groups runs for the regression check
        "target": "demo",                # an id of HMS_TASKS_LOADTEST_TARGETS, never a URL
        "scenario": "demo",              # the shipped locustfile of the demo HMS API, or
                                         # {"endpoints": [{"path": "/api/patients/",
                                         #   "method": "GET", "weight": 3, "name": ...}],
                                         #  "wait": [0.5, 1.5], "user_class": "fast"}, or
                                         # {"locustfile": "mine.py"} (inside
                                         #  HMS_TASKS_LOADTEST_SCENARIOS_DIR)
        "users": 20,                     # simulated users over all shards
        "spawn_rate": 10,                # users started per second (or "ramp_up": seconds)
        "duration": 60,                  # seconds of load, ramp-up included
        "shards": 2,                     # worker processes generating load
        "thresholds": {"p95_ms": 500, "error_rate": 0.01, "min_rps": 50,
                       "endpoints": {"GET /api/patients/": {"p99_ms": 800}}},
    }

The definition is a pydantic model (the one validation layer of hms-tasks): values are strictly
typed (``"10"`` is not a number of users), unknown fields are refused, and users, duration and
shards are bounded by ``HMS_TASKS_LOADTEST_MAX_USERS``, ``..._MAX_DURATION`` and
``..._MAX_SHARDS``. Every problem is reported at once, one line each, naming the field and what
it accepts (``test.scenario.endpoints[0].path: expected ...``), never quoting the value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_serializer,
    model_validator,
)

from hms_tasks.errors import ConfigurationError, InvalidArguments
from hms_tasks.loadtest import names, settings
from hms_tasks.validation import problems

__all__ = [
    "DEMO_LOCUSTFILE",
    "METHODS",
    "THRESHOLD_KEYS",
    "DemoScenario",
    "Endpoint",
    "EndpointsScenario",
    "LoadTestSpec",
    "LocustfileScenario",
    "Scenario",
    "ShardPlan",
    "Thresholds",
    "configured",
    "configured_problems",
    "parse",
    "resolve_locustfile",
    "scenarios_dir",
    "target_url",
]

#: The locustfile shipped for the demo HMS API (scenario ``"demo"``).
DEMO_LOCUSTFILE = Path(__file__).resolve().parent / "locustfiles" / "demo_api.py"
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
THRESHOLD_KEYS = ("p50_ms", "p95_ms", "p99_ms", "error_rate", "min_rps")
MAX_ENDPOINTS = 100

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_BAD_PATH_CHARS = set("\\@# \t\r\n\x00")


# -- the checks: strict type first (pydantic), then our rule; one message naming what is allowed


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    return {int: "int", float: "float", str: "str", list: "list", dict: "object"}.get(
        type(value), "other")


def _expect(what: str | Callable[[], str], ok: Callable[[Any], bool] = lambda _: True) -> Any:
    """Annotation: the strictly typed value when ``ok(value)``, else the error ``expected
    <what>`` (with the input's type, never its value, when the type was wrong)."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            result = handler(value)
        except ValidationError:
            got = f", got {_kind(value)}"
        else:
            if result is None or ok(result):
                return result
            got = ""
        raise ValueError(f"expected {what if isinstance(what, str) else what()}{got}")

    return WrapValidator(check)


def _within(low: float, high: float, *, above: bool = False) -> Callable[[Any], bool]:
    return lambda v: math.isfinite(v) and (low < v if above else low <= v) and v <= high


def _limit(name: str) -> int:
    return int(getattr(settings.get(), f"loadtest_{name}"))


def _path_ok(path: str) -> bool:
    return (path.startswith("/") and not path.startswith("//") and len(path) <= 2000
            and "://" not in path and not _BAD_PATH_CHARS & set(path))


class _Model(BaseModel):
    """Strict, frozen, and every unknown field named at once with the allowed ones."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid", populate_by_name=True)
    #: What an object of this model is, for "expected an object (...)".
    what: ClassVar[str] = "an object"

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, raw: Any) -> Any:
        if isinstance(raw, cls):
            return raw
        if not isinstance(raw, Mapping):
            raise ValueError(f"expected {cls.what}, got {_kind(raw)}")
        allowed = {f.alias or n for n, f in cls.model_fields.items()}
        unknown = [k for k in raw if k not in allowed]
        if unknown:
            shown = sorted(k if isinstance(k, str) and _IDENT_RE.match(k) else "(a field name)"
                           for k in unknown)
            raise ValueError(f"unknown fields {shown}; allowed: {sorted(allowed)}")
        return raw


# -- thresholds ----------------------------------------------------------------------------------

_Ms = Annotated[float | None, _expect("milliseconds above 0", _within(0, 3_600_000, above=True))]


class Thresholds(_Model):
    """Service-level objectives of a whole run or of one endpoint; None means not judged."""

    what: ClassVar[str] = f"an object of {', '.join(THRESHOLD_KEYS)}"

    p50_ms: _Ms = None
    p95_ms: _Ms = None
    p99_ms: _Ms = None
    #: Failed requests / requests, from 0 to 1 (0.01 is 1 %).
    error_rate: Annotated[float | None, _expect("a fraction from 0 to 1 (0.01 is 1 %)",
                                                _within(0, 1))] = None
    #: Requests per second over the run's duration.
    min_rps: Annotated[float | None, _expect("requests per second from 0",
                                             _within(0, 1e9))] = None

    def items(self) -> list[tuple[str, float]]:
        return [(k, v) for k in THRESHOLD_KEYS if (v := getattr(self, k)) is not None]

    def to_json(self) -> dict[str, float]:
        return dict(self.items())


def _endpoint_key(key: str) -> bool:
    return 3 <= len(key) <= 210 and " " in key and key.split(" ", 1)[0] in METHODS


class RunThresholds(Thresholds):
    """The run's thresholds, and per endpoint (``"METHOD name"``, the statistics' key)."""

    what: ClassVar[str] = f"an object of {', '.join(THRESHOLD_KEYS)}, endpoints"

    endpoints: Annotated[
        dict[Annotated[str, _expect('"METHOD name" (for example "GET /api/patients/")',
                                    _endpoint_key)], Thresholds],
        Field(max_length=MAX_ENDPOINTS)] = {}


# -- scenarios -----------------------------------------------------------------------------------


class Endpoint(_Model):
    what: ClassVar[str] = "an object with path, method, weight, name"

    #: Path (and query) under the target's base URL: always starts with a single '/'.
    path: Annotated[str, _expect("a path under the target such as /api/patients/?limit=50"
                                 " (starting with one '/', no scheme, host, '@', '#' or spaces)",
                                 _path_ok)]
    method: Annotated[str, _expect(f"one of {', '.join(METHODS)}", lambda m: m in METHODS)] = "GET"
    weight: Annotated[int, _expect("an integer from 1 to 1000", _within(1, 1000))] = 1
    #: Name in the statistics (Locust's request name); defaults to the path without its query.
    name: Annotated[str, _expect("1 to 200 printable characters",
                                 lambda n: 1 <= len(n) <= 200 and n.isprintable())] = Field(
        default=None, validate_default=True)
    #: JSON body (POST, PUT, PATCH), or None.
    body: Any = Field(default=None, alias="json")

    @field_validator("name", mode="before")
    @classmethod
    def _name_defaults_to_path(cls, name: Any, info: ValidationInfo) -> Any:
        # Without a valid path (already reported) any name will do.
        return str(info.data.get("path", "/")).split("?", 1)[0] if name is None else name

    @field_validator("body")
    @classmethod
    def _body_needs_a_method_that_sends_one(cls, body: Any, info: ValidationInfo) -> Any:
        if body is not None and info.data.get("method", "GET") not in ("POST", "PUT", "PATCH"):
            raise ValueError("only POST, PUT and PATCH send a body")
        return body

    @property
    def key(self) -> str:
        return f"{self.method} {self.name}"


class DemoScenario(_Model):
    """``"demo"``: the shipped locustfile of the demo HMS API."""

    kind: ClassVar[Literal["demo"]] = "demo"

    @model_serializer
    def _as_name(self) -> str:
        return "demo"


def _wait_ok(wait: list[float]) -> bool:
    return len(wait) == 2 and all(math.isfinite(w) for w in wait) and 0 <= wait[0] <= wait[1] <= 60


class EndpointsScenario(_Model):
    """Weighted endpoints of the target, each user waiting between requests."""

    kind: ClassVar[Literal["endpoints"]] = "endpoints"
    what: ClassVar[str] = 'an object with endpoints'

    endpoints: Annotated[list[Endpoint], Field(min_length=1, max_length=MAX_ENDPOINTS)]
    #: Seconds each user waits between requests: uniform between the two.
    wait: Annotated[list[float], _expect("[min, max] seconds, 0 <= min <= max <= 60",
                                         _wait_ok)] = [0.5, 1.5]
    user_class: Annotated[str, _expect('"fast" (FastHttpUser) or "http" (HttpUser)',
                                       lambda c: c in ("fast", "http"))] = "fast"

    @field_validator("endpoints")
    @classmethod
    def _distinct(cls, endpoints: list[Endpoint]) -> list[Endpoint]:
        if len({e.key for e in endpoints}) != len(endpoints):
            raise ValueError("two endpoints share a method and name")
        return endpoints


class LocustfileScenario(_Model):
    """A locustfile of the scenarios directory (its own users set their wait times and
    clients)."""

    kind: ClassVar[Literal["locustfile"]] = "locustfile"
    what: ClassVar[str] = 'an object with locustfile'

    #: Path relative to HMS_TASKS_LOADTEST_SCENARIOS_DIR.
    locustfile: Annotated[str, _expect("a path inside HMS_TASKS_LOADTEST_SCENARIOS_DIR",
                                       lambda p: 0 < len(p) <= 500 and "\x00" not in p)]

    @field_validator("locustfile")
    @classmethod
    def _inside_the_scenarios_dir(cls, path: str, info: ValidationInfo) -> str:
        check_files = (info.context or {}).get("check_files", True)
        full = resolve_locustfile(path, must_exist=check_files)
        return str(full.relative_to(scenarios_dir()))


def _scenario_kind(raw: Any) -> str | None:
    if raw == "demo" or isinstance(raw, DemoScenario):
        return "demo"
    if isinstance(raw, BaseModel):
        return str(getattr(raw, "kind", None))
    if isinstance(raw, Mapping) and ("locustfile" in raw) != ("endpoints" in raw):
        return "locustfile" if "locustfile" in raw else "endpoints"
    return None


Scenario = Annotated[
    Annotated[DemoScenario, BeforeValidator(lambda _: {}), Tag("demo")]
    | Annotated[EndpointsScenario, Tag("endpoints")]
    | Annotated[LocustfileScenario, Tag("locustfile")],
    Discriminator(_scenario_kind, custom_error_type="scenario", custom_error_message=(
        'expected "demo", {"endpoints": [...]} or {"locustfile": "path.py"}'
        " (endpoints or locustfile, not both)")),
]


# -- the definition ------------------------------------------------------------------------------


def _targets() -> str:
    return ", ".join(sorted(settings.get().loadtest_targets)) or "none configured"


def _target(value: Any, handler: ValidatorFunctionWrapHandler) -> str:
    try:
        target: str = handler(value)
    except ValidationError:
        raise ValueError("expected a target id from HMS_TASKS_LOADTEST_TARGETS (allowed:"
                         f" {_targets()}), got {_kind(value)}") from None
    if target in settings.get().loadtest_targets:
        return target
    if any(c in target for c in ":/.@[]\\") or target.lower().startswith(("http", "www")):
        raise ValueError("expected a target id from HMS_TASKS_LOADTEST_TARGETS, not a URL or an"
                         f" address (allowed: {_targets()})")
    raise ValueError(f"unknown target id (allowed: {_targets()})")


class ShardPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    index: int
    users: int
    spawn_rate: float


class LoadTestSpec(_Model):
    """A checked load-test definition (see the module docstring)."""

    what: ClassVar[str] = "an object (a load test definition)"

    name: Annotated[str, _expect("1 to 64 of a-z 0-9 '_' '-' (starting with a letter or digit)",
                                 lambda n: bool(_NAME_RE.match(n)))]
    target: Annotated[str, WrapValidator(_target)]
    scenario: Scenario = DemoScenario()
    users: Annotated[int, _expect(
        lambda: f"an integer from 1 to {_limit('max_users')} (HMS_TASKS_LOADTEST_MAX_USERS)",
        lambda u: 1 <= u <= _limit("max_users"))]
    duration: Annotated[float, _expect(
        lambda: f"seconds above 0 and at most {_limit('max_duration')}"
                " (HMS_TASKS_LOADTEST_MAX_DURATION)",
        lambda d: _within(0, _limit("max_duration"), above=True)(d))]
    shards: Annotated[int, _expect(
        lambda: f"an integer from 1 to {_limit('max_shards')} (HMS_TASKS_LOADTEST_MAX_SHARDS)",
        lambda n: 1 <= n <= _limit("max_shards"))] = 1
    #: Users started per second (ramp_up or every user at once when not given).
    spawn_rate: Annotated[float, _expect("users per second above 0 and at most 10000",
                                         _within(0, 10_000, above=True))] = 0.0
    #: Seconds to start every user: turned into spawn_rate (never stored).
    ramp_up: Annotated[float | None, _expect("seconds from 0 to the duration",
                                             _within(0, math.inf))] = Field(None, exclude=True)
    thresholds: RunThresholds = RunThresholds()

    @field_validator("shards")
    @classmethod
    def _one_user_per_shard_at_least(cls, shards: int, info: ValidationInfo) -> int:
        users = info.data.get("users")
        if users is not None and shards > users:
            raise ValueError(f"at most one shard per user ({users} user{'s' * (users != 1)})")
        return shards

    @field_validator("ramp_up")
    @classmethod
    def _ramp_up_within_the_duration(cls, ramp: float | None, info: ValidationInfo) -> Any:
        if ramp is not None and ramp > info.data.get("duration", math.inf):
            raise ValueError("expected seconds from 0 to the duration")
        return ramp

    @field_validator("thresholds")
    @classmethod
    def _endpoint_thresholds_name_endpoints(cls, th: RunThresholds,
                                            info: ValidationInfo) -> RunThresholds:
        scenario = info.data.get("scenario")
        if isinstance(scenario, EndpointsScenario):
            known = {e.key for e in scenario.endpoints}
            if set(th.endpoints) - known:
                raise ValueError("endpoints: a key names no endpoint of the scenario"
                                 f" (endpoints: {', '.join(sorted(known))})")
        return th

    @model_validator(mode="after")
    def _spawn_rate(self) -> LoadTestSpec:
        given = "spawn_rate" in self.model_fields_set
        if self.ramp_up is None:
            return self if given else self.model_copy(update={"spawn_rate": float(self.users)})
        if given:
            raise ValueError("give spawn_rate or ramp_up, not both")
        rate = float(self.users) if self.ramp_up == 0 else self.users / self.ramp_up
        return self.model_copy(update={"spawn_rate": rate, "ramp_up": None})

    @property
    def endpoint_thresholds(self) -> dict[str, Thresholds]:
        return self.thresholds.endpoints

    def to_json(self) -> dict[str, Any]:
        """The definition in its canonical form (``parse`` of it gives the same spec)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def plan(self) -> list[ShardPlan]:
        """Users split over the shards (the first ones take the remainder); each shard's spawn
        rate is proportional to its users, so every shard finishes ramping up at once."""
        base, extra = divmod(self.users, self.shards)
        out = []
        for i in range(self.shards):
            users = base + (1 if i < extra else 0)
            out.append(ShardPlan(index=i, users=users,
                                 spawn_rate=self.spawn_rate * users / self.users))
        return out


# -- files and targets of this node --------------------------------------------------------------


def scenarios_dir() -> Path:
    """The directory user locustfiles must live in (HMS_TASKS_LOADTEST_SCENARIOS_DIR)."""
    return Path(settings.get().loadtest_scenarios_dir).resolve()


def resolve_locustfile(relative: str, *, must_exist: bool = True) -> Path:
    """The absolute path of a scenario locustfile; ValueError unless it is a ``.py`` file
    inside the scenarios directory (symbolic links resolved first) that exists (unless
    ``must_exist`` is off: the start-up check of a node that runs no load tests)."""
    base = scenarios_dir()
    candidate = (base / relative).resolve()
    if not candidate.is_relative_to(base) or candidate == base:
        raise ValueError("must be a path inside HMS_TASKS_LOADTEST_SCENARIOS_DIR")
    if candidate.suffix != ".py":
        raise ValueError("must name a .py locustfile")
    if must_exist and not candidate.is_file():
        raise ValueError("no such file in HMS_TASKS_LOADTEST_SCENARIOS_DIR")
    return candidate


def target_url(target: str) -> str:
    """The base URL of target id ``target`` from this process's settings; ConfigurationError
    when it has none (a node whose settings differ from the orchestrator's)."""
    targets = settings.get().loadtest_targets
    if target not in targets:
        raise ConfigurationError(
            f"HMS_TASKS_LOADTEST_TARGETS has no target {target!r} on this node; configured:"
            f" {sorted(targets)}")
    return targets[target]


# -- parsing -------------------------------------------------------------------------------------


def _located(where: str, loc: tuple[Any, ...]) -> str:
    """``('scenario', 'endpoints', 'endpoints', 0, 'path')`` -> ``test.scenario.endpoints[0]
    .path``: the scenario's kind (pydantic's union tag) and dict-key markers left out, keys
    that are no identifier hidden."""
    out, previous = where, None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]" or (previous == "scenario" and part in ("demo", "endpoints",
                                                                       "locustfile")):
            pass
        elif isinstance(part, str) and _IDENT_RE.match(part):
            out += f".{part}"
        else:
            out += "[…]"
        previous = part
    return out


def parse(raw: Any, *, where: str = "test", task: str = names.RUN,
          check_files: bool = True) -> LoadTestSpec:
    """Check a definition against the settings; return the spec or raise
    :class:`InvalidArguments` listing every problem (``where`` prefixes the field names)."""
    try:
        return LoadTestSpec.model_validate(raw, context={"check_files": check_files})
    except ValidationError as exc:
        raise InvalidArguments(task, problems(exc, name=lambda loc: _located(where, loc))
                               ) from None


def configured(name: str, *, task: str = names.RUN, check_files: bool = True) -> LoadTestSpec:
    """The test ``name`` of HMS_TASKS_LOADTEST_TESTS, checked; InvalidArguments for an unknown
    name or a definition that does not pass."""
    tests = settings.get().loadtest_tests
    if name not in tests:
        raise InvalidArguments(task, [
            f"test: unknown test name (defined in HMS_TASKS_LOADTEST_TESTS:"
            f" {', '.join(sorted(tests)) or 'none'})"])
    return parse({"name": name, **tests[name]}, where=f"HMS_TASKS_LOADTEST_TESTS[{name!r}]",
                 task=task, check_files=check_files)


def configured_problems() -> list[str]:
    """Start-up check: every test of HMS_TASKS_LOADTEST_TESTS passes (one line per problem).
    Locustfiles need not exist on every node (only loadtest workers run them): a shard checks
    that on its own node."""
    out: list[str] = []
    for name in sorted(settings.get().loadtest_tests):
        try:
            configured(name, check_files=False)
        except InvalidArguments as exc:
            out += exc.problems
    return out
