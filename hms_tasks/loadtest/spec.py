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

Users, duration and shards are bounded by ``HMS_TASKS_LOADTEST_MAX_USERS``,
``HMS_TASKS_LOADTEST_MAX_DURATION`` and ``HMS_TASKS_LOADTEST_MAX_SHARDS``. Every problem is
reported at once, naming the field and what it accepts, never quoting the value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hms_tasks import conf, names
from hms_tasks.errors import ConfigurationError, InvalidArguments

__all__ = [
    "DEMO_LOCUSTFILE",
    "MAX_DURATION_CAP",
    "METHODS",
    "THRESHOLD_KEYS",
    "Endpoint",
    "LoadTestSpec",
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

#: The highest HMS_TASKS_LOADTEST_MAX_DURATION may go: the shard task's hard time limit is
#: derived from it and must stay below the visibility timeout.
MAX_DURATION_CAP = conf.LOADTEST_MAX_DURATION_CAP
#: The locustfile shipped for the demo HMS API (scenario ``"demo"``).
DEMO_LOCUSTFILE = Path(__file__).resolve().parent / "locustfiles" / "demo_api.py"
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
THRESHOLD_KEYS = ("p50_ms", "p95_ms", "p99_ms", "error_rate", "min_rps")
MAX_ENDPOINTS = 100

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_FIELDS = {"name", "target", "scenario", "users", "spawn_rate", "ramp_up", "duration", "shards",
           "thresholds"}
_SCENARIO_FIELDS = {"endpoints", "wait", "user_class", "locustfile"}
_ENDPOINT_FIELDS = {"path", "method", "weight", "name", "json"}


@dataclass(frozen=True, kw_only=True)
class Thresholds:
    """Service-level objectives of a whole run or of one endpoint; None means not judged."""

    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    #: Failed requests / requests, from 0 to 1 (0.01 is 1 %).
    error_rate: float | None = None
    #: Requests per second over the run's duration.
    min_rps: float | None = None

    def items(self) -> list[tuple[str, float]]:
        return [(k, v) for k in THRESHOLD_KEYS if (v := getattr(self, k)) is not None]

    def to_json(self) -> dict[str, float]:
        return dict(self.items())


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    method: str
    #: Path (and query) under the target's base URL: always starts with a single '/'.
    path: str
    #: Name in the statistics (Locust's request name); defaults to the path.
    name: str
    weight: int = 1
    #: JSON body (POST, PUT, PATCH), or None.
    json: Any = None

    @property
    def key(self) -> str:
        return f"{self.method} {self.name}"


@dataclass(frozen=True, kw_only=True)
class Scenario:
    kind: Literal["demo", "endpoints", "locustfile"]
    endpoints: tuple[Endpoint, ...] = ()
    #: Seconds each user waits between requests: uniform between the two.
    wait: tuple[float, float] = (0.5, 1.5)
    user_class: Literal["fast", "http"] = "fast"
    #: Path relative to HMS_TASKS_LOADTEST_SCENARIOS_DIR (kind "locustfile").
    locustfile: str | None = None

    def to_json(self) -> str | dict[str, Any]:
        if self.kind == "demo":
            return "demo"
        if self.kind == "locustfile":
            return {"locustfile": self.locustfile}
        return {
            "endpoints": [{"method": e.method, "path": e.path, "name": e.name,
                           "weight": e.weight, **({"json": e.json} if e.json is not None
                                                  else {})} for e in self.endpoints],
            "wait": list(self.wait), "user_class": self.user_class,
        }


@dataclass(frozen=True, kw_only=True)
class ShardPlan:
    index: int
    users: int
    spawn_rate: float


@dataclass(frozen=True, kw_only=True)
class LoadTestSpec:
    name: str
    target: str
    scenario: Scenario
    users: int
    spawn_rate: float
    duration: float
    shards: int
    thresholds: Thresholds = field(default_factory=Thresholds)
    endpoint_thresholds: dict[str, Thresholds] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The definition in its canonical form (``parse`` of it gives the same spec)."""
        thresholds: dict[str, Any] = self.thresholds.to_json()
        if self.endpoint_thresholds:
            thresholds["endpoints"] = {k: t.to_json() for k, t in self.endpoint_thresholds.items()}
        return {"name": self.name, "target": self.target, "scenario": self.scenario.to_json(),
                "users": self.users, "spawn_rate": self.spawn_rate, "duration": self.duration,
                "shards": self.shards, "thresholds": thresholds}

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


# -- helpers -------------------------------------------------------------------------------------


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    return {int: "int", float: "float", str: "str", list: "list", dict: "object"}.get(
        type(value), "other")


def _shown(key: Any) -> str:
    # A key that is no identifier could be data pasted in the wrong place: do not echo it.
    return str(key) if isinstance(key, str) and _IDENT_RE.match(key) else "(a field name)"


def scenarios_dir() -> Path:
    """The directory user locustfiles must live in (HMS_TASKS_LOADTEST_SCENARIOS_DIR)."""
    return Path(conf.get().loadtest_scenarios_dir).resolve()


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
    targets = conf.get().loadtest_targets
    if target not in targets:
        raise ConfigurationError(
            f"HMS_TASKS_LOADTEST_TARGETS has no target {target!r} on this node; configured:"
            f" {sorted(targets)}")
    return targets[target]


# -- parsing -------------------------------------------------------------------------------------


def parse(raw: Any, *, where: str = "test", task: str = names.LOADTEST_RUN,
          check_files: bool = True) -> LoadTestSpec:
    """Check a definition against the settings; return the spec or raise
    :class:`InvalidArguments` listing every problem (``where`` prefixes the field names)."""
    problems: list[str] = []
    spec = _parse(raw, where, problems, check_files=check_files)
    if problems or spec is None:
        raise InvalidArguments(task, problems or [f"{where}: not a load test definition"])
    return spec


def _parse(raw: Any, where: str, problems: list[str], *,
           check_files: bool) -> LoadTestSpec | None:
    s = conf.get()
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: expected an object (a load test definition), got {_kind(raw)}")
        return None
    unknown = [k for k in raw if k not in _FIELDS]
    if unknown:
        problems.append(f"{where}: unknown fields {sorted(map(_shown, unknown))}; allowed:"
                        f" {sorted(_FIELDS)}")

    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        problems.append(f"{where}.name: expected 1 to 64 of a-z 0-9 '_' '-' (starting with a"
                        " letter or digit)")

    target = raw.get("target")
    allowed = ", ".join(sorted(s.loadtest_targets)) or "none configured"
    if not isinstance(target, str):
        problems.append(f"{where}.target: expected a target id from HMS_TASKS_LOADTEST_TARGETS"
                        f" (allowed: {allowed}), got {_kind(target)}")
    elif target in s.loadtest_targets:
        pass
    elif any(c in target for c in ":/.@[]\\") or target.lower().startswith(("http", "www")):
        problems.append(f"{where}.target: expected a target id from HMS_TASKS_LOADTEST_TARGETS,"
                        f" not a URL or an address (allowed: {allowed})")
    else:
        problems.append(f"{where}.target: unknown target id (allowed: {allowed})")

    scenario = _scenario(raw.get("scenario", "demo"), f"{where}.scenario", problems,
                         check_files=check_files)

    users = raw.get("users")
    if type(users) is not int or not 1 <= users <= s.loadtest_max_users:
        problems.append(f"{where}.users: expected an integer from 1 to {s.loadtest_max_users}"
                        " (HMS_TASKS_LOADTEST_MAX_USERS)" + (
                            f", got {_kind(users)}" if type(users) is not int else ""))
        users = None

    duration: Any = raw.get("duration")
    if not _number(duration) or not 0 < duration <= s.loadtest_max_duration:
        problems.append(f"{where}.duration: expected seconds above 0 and at most"
                        f" {s.loadtest_max_duration} (HMS_TASKS_LOADTEST_MAX_DURATION)" + (
                            f", got {_kind(duration)}" if not _number(duration) else ""))
        duration = None

    shards = raw.get("shards", 1)
    if type(shards) is not int or not 1 <= shards <= s.loadtest_max_shards:
        problems.append(f"{where}.shards: expected an integer from 1 to {s.loadtest_max_shards}"
                        " (HMS_TASKS_LOADTEST_MAX_SHARDS)" + (
                            f", got {_kind(shards)}" if type(shards) is not int else ""))
        shards = None
    elif users is not None and shards > users:
        problems.append(f"{where}.shards: at most one shard per user ({users} users)")

    spawn_rate: float | None = None
    if "spawn_rate" in raw and "ramp_up" in raw:
        problems.append(f"{where}: give spawn_rate or ramp_up, not both")
    elif "ramp_up" in raw:
        ramp = raw["ramp_up"]
        if not _number(ramp) or ramp < 0 or (duration is not None and ramp > duration):
            problems.append(f"{where}.ramp_up: expected seconds from 0 to the duration" + (
                f", got {_kind(ramp)}" if not _number(ramp) else ""))
        elif users is not None:
            spawn_rate = float(users) if ramp == 0 else users / ramp
    elif "spawn_rate" in raw:
        rate = raw["spawn_rate"]
        if not _number(rate) or not 0 < rate <= 10_000:
            problems.append(f"{where}.spawn_rate: expected users per second above 0 and at most"
                            " 10000" + (f", got {_kind(rate)}" if not _number(rate) else ""))
        else:
            spawn_rate = float(rate)
    elif users is not None:
        spawn_rate = float(users)  # every user at once

    thresholds, per_endpoint = _thresholds(raw.get("thresholds", {}), f"{where}.thresholds",
                                           problems)
    if scenario is not None and scenario.kind == "endpoints":
        known = {e.key for e in scenario.endpoints}
        for key in per_endpoint:
            if key not in known:
                problems.append(f"{where}.thresholds.endpoints: a key names no endpoint of the"
                                f" scenario (endpoints: {', '.join(sorted(known))})")
                break

    if problems or scenario is None or users is None or duration is None or shards is None \
            or spawn_rate is None:
        return None
    assert isinstance(name, str)
    assert isinstance(target, str)
    return LoadTestSpec(name=name, target=target, scenario=scenario, users=users,
                        spawn_rate=spawn_rate, duration=float(duration), shards=shards,
                        thresholds=thresholds, endpoint_thresholds=per_endpoint)


def _scenario(raw: Any, where: str, problems: list[str], *, check_files: bool) -> Scenario | None:
    if raw == "demo":
        return Scenario(kind="demo")
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: expected \"demo\", {{\"endpoints\": [...]}} or"
                        f" {{\"locustfile\": \"path.py\"}}, got {_kind(raw)}")
        return None
    unknown = [k for k in raw if k not in _SCENARIO_FIELDS]
    if unknown:
        problems.append(f"{where}: unknown fields {sorted(map(_shown, unknown))}; allowed:"
                        f" {sorted(_SCENARIO_FIELDS)}")
        return None
    if ("locustfile" in raw) == ("endpoints" in raw):
        problems.append(f"{where}: give either endpoints or locustfile")
        return None
    if "locustfile" in raw:
        path = raw["locustfile"]
        if set(raw) != {"locustfile"}:
            problems.append(f"{where}: a locustfile scenario takes only locustfile (its own"
                            " users set their wait times and clients)")
            return None
        if not isinstance(path, str) or not path or len(path) > 500 or "\x00" in path:
            problems.append(f"{where}.locustfile: expected a path inside"
                            " HMS_TASKS_LOADTEST_SCENARIOS_DIR")
            return None
        try:
            full = resolve_locustfile(path, must_exist=check_files)
        except ValueError as exc:
            problems.append(f"{where}.locustfile: {exc}")
            return None
        return Scenario(kind="locustfile", locustfile=str(full.relative_to(scenarios_dir())))

    endpoints_raw = raw["endpoints"]
    if not isinstance(endpoints_raw, list) or not 1 <= len(endpoints_raw) <= MAX_ENDPOINTS:
        problems.append(f"{where}.endpoints: expected a list of 1 to {MAX_ENDPOINTS} endpoints")
        return None
    endpoints: list[Endpoint] = []
    ok = True
    for i, e in enumerate(endpoints_raw):
        ep = _endpoint(e, f"{where}.endpoints[{i}]", problems)
        ok = ok and ep is not None
        if ep is not None:
            endpoints.append(ep)
    keys = [e.key for e in endpoints]
    if len(set(keys)) != len(keys):
        problems.append(f"{where}.endpoints: two endpoints share a method and name")
        ok = False
    wait = raw.get("wait", [0.5, 1.5])
    if not isinstance(wait, list) or len(wait) != 2 or not all(_number(w) for w in wait) \
            or not 0 <= wait[0] <= wait[1] <= 60:
        problems.append(f"{where}.wait: expected [min, max] seconds, 0 <= min <= max <= 60")
        ok = False
    user_class = raw.get("user_class", "fast")
    if user_class not in ("fast", "http"):
        problems.append(f"{where}.user_class: expected \"fast\" (FastHttpUser) or \"http\""
                        " (HttpUser)")
        ok = False
    if not ok:
        return None
    return Scenario(kind="endpoints", endpoints=tuple(endpoints),
                    wait=(float(wait[0]), float(wait[1])), user_class=user_class)


def _endpoint(raw: Any, where: str, problems: list[str]) -> Endpoint | None:
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: expected an object with path, method, weight, name")
        return None
    unknown = [k for k in raw if k not in _ENDPOINT_FIELDS]
    if unknown:
        problems.append(f"{where}: unknown fields {sorted(map(_shown, unknown))}; allowed:"
                        f" {sorted(_ENDPOINT_FIELDS)}")
        return None
    path = raw.get("path")
    if not isinstance(path, str) or not path.startswith("/") or path.startswith("//") \
            or len(path) > 2000 or "://" in path or any(c in path for c in "\\@# \t\r\n\x00"):
        problems.append(f"{where}.path: expected a path under the target such as"
                        " /api/patients/?limit=50 (starting with one '/', no scheme, host,"
                        " '@', '#' or spaces)")
        return None
    method = raw.get("method", "GET")
    if method not in METHODS:
        problems.append(f"{where}.method: expected one of {', '.join(METHODS)}")
        return None
    weight = raw.get("weight", 1)
    if type(weight) is not int or not 1 <= weight <= 1000:
        problems.append(f"{where}.weight: expected an integer from 1 to 1000")
        return None
    name = raw.get("name", path.split("?", 1)[0])
    if not isinstance(name, str) or not 1 <= len(name) <= 200 or not name.isprintable():
        problems.append(f"{where}.name: expected 1 to 200 printable characters")
        return None
    body = raw.get("json")
    if body is not None and method not in ("POST", "PUT", "PATCH"):
        problems.append(f"{where}.json: only POST, PUT and PATCH send a body")
        return None
    return Endpoint(method=method, path=path, name=name, weight=weight, json=body)


_THRESHOLD_RULES: dict[str, tuple[float, float, bool, str]] = {
    # key: (low, high, low is exclusive, what)
    "p50_ms": (0.0, 3_600_000.0, True, "milliseconds above 0"),
    "p95_ms": (0.0, 3_600_000.0, True, "milliseconds above 0"),
    "p99_ms": (0.0, 3_600_000.0, True, "milliseconds above 0"),
    "error_rate": (0.0, 1.0, False, "a fraction from 0 to 1 (0.01 is 1 %)"),
    "min_rps": (0.0, 1e9, False, "requests per second from 0"),
}


def _one_thresholds(raw: Any, where: str, problems: list[str], *,
                    allow_endpoints: bool) -> Thresholds:
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: expected an object of {', '.join(THRESHOLD_KEYS)}")
        return Thresholds()
    allowed = set(THRESHOLD_KEYS) | ({"endpoints"} if allow_endpoints else set())
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        problems.append(f"{where}: unknown fields {sorted(map(_shown, unknown))}; allowed:"
                        f" {sorted(allowed)}")
    values: dict[str, float] = {}
    for key, (low, high, exclusive, what) in _THRESHOLD_RULES.items():
        if key not in raw or raw[key] is None:
            continue
        v = raw[key]
        if not _number(v) or v > high or (v <= low if exclusive else v < low):
            problems.append(f"{where}.{key}: expected {what}" + (
                f", got {_kind(v)}" if not _number(v) else ""))
            continue
        values[key] = float(v)
    return Thresholds(**values)


def _thresholds(raw: Any, where: str,
                problems: list[str]) -> tuple[Thresholds, dict[str, Thresholds]]:
    total = _one_thresholds(raw, where, problems, allow_endpoints=True)
    per: dict[str, Thresholds] = {}
    if isinstance(raw, Mapping) and raw.get("endpoints") is not None:
        eps = raw["endpoints"]
        if not isinstance(eps, Mapping) or len(eps) > MAX_ENDPOINTS:
            problems.append(f"{where}.endpoints: expected an object of endpoint keys (\"GET"
                            f" /path\") to thresholds, at most {MAX_ENDPOINTS}")
        else:
            for i, (key, t) in enumerate(eps.items()):
                if not isinstance(key, str) or not 3 <= len(key) <= 210 \
                        or key.split(" ", 1)[0] not in METHODS or " " not in key:
                    problems.append(f"{where}.endpoints: key #{i + 1} is not \"METHOD name\""
                                    " (for example \"GET /api/patients/\")")
                    continue
                per[key] = _one_thresholds(t, f"{where}.endpoints[{i + 1}]", problems,
                                           allow_endpoints=False)
    return total, per


# -- tests defined in settings ---------------------------------------------------------------


def configured(name: str, *, task: str = names.LOADTEST_RUN,
               check_files: bool = True) -> LoadTestSpec:
    """The test ``name`` of HMS_TASKS_LOADTEST_TESTS, checked; InvalidArguments for an unknown
    name or a definition that does not pass."""
    tests = conf.get().loadtest_tests
    if name not in tests:
        raise InvalidArguments(task, [
            f"test: unknown test name (defined in HMS_TASKS_LOADTEST_TESTS:"
            f" {', '.join(sorted(tests)) or 'none'})"])
    definition = {"name": name, **tests[name]}
    return parse(definition, where=f"HMS_TASKS_LOADTEST_TESTS[{name!r}]", task=task,
                 check_files=check_files)


def configured_problems() -> list[str]:
    """Start-up check: every test of HMS_TASKS_LOADTEST_TESTS passes (one line per problem).
    Locustfiles need not exist on every node (only loadtest workers run them): a shard checks
    that on its own node."""
    out: list[str] = []
    for name in sorted(conf.get().loadtest_tests):
        try:
            configured(name, check_files=False)
        except InvalidArguments as exc:
            out += exc.problems
    return out
