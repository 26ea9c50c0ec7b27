"""Typed task parameters: derived from a task function's annotations, checked before publishing
(``hms-tasks dispatch``) and again on the worker (``celery call`` and ``send_task`` skip every
client-side check). The check is the whole check: a task states its ranges and known names in
its signature, so the CLI refuses what the worker would refuse::

    def warm_hot(limit: Annotated[int, Field(ge=1, le=100_000)] = 5000) -> dict[str, Any]: ...
    def check_service(name: Annotated[str, known(registry.services, "service")]) -> ...: ...

Each parameter is validated by a strict pydantic :class:`~pydantic.TypeAdapter` of its
annotation (no coercion: ``"3"`` is not an int, ``true`` is not a number). Supported annotations
are the JSON shapes task arguments may take: ``int``, ``float``, ``str``, ``bool``, ``None``,
``list[T]``, ``dict[str, T]``, ``Literal[...]``, ``T | None``, unions of these, and any of them
wrapped in ``Annotated[T, Field(...)]`` (``ge``/``le``, ``min_length``/``max_length``,
``pattern``, ``description``) or with :func:`known`, :func:`satisfies` and :func:`checked_by`.

Problems name the field and what is allowed (``limit: expected int from 1 to 100000, got
str``) and never quote the value; a mapping key that could be data is hidden
(:mod:`hms_tasks.validation`).
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, ConfigDict, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from hms_tasks import validation
from hms_tasks.errors import InvalidArguments

__all__ = [
    "Param",
    "Signature",
    "call_arguments",
    "checked_by",
    "coerce_text",
    "describe",
    "known",
    "satisfies",
    "signature_of",
]

_NO_DEFAULT: Any = inspect.Parameter.empty
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_STRICT = ConfigDict(strict=True)
# pydantic error types that mean "not of the declared type" (rather than "out of range").
_TYPE_ERRORS = {"literal_error", "none_required", "is_instance_of", "int_from_float"}


# --- annotation helpers ------------------------------------------------------------------------


def known(names: Callable[[], Iterable[str]], what: str) -> AfterValidator:
    """Annotation metadata: the value must be one of ``names()`` (read at check time, so it
    follows the settings). The problem lists the allowed names: configuration, not data."""

    def check(value: str) -> str:
        allowed = sorted(names())
        if value not in allowed:
            raise ValueError(f"unknown {what} (allowed: {', '.join(allowed) or 'none'})")
        return value

    return AfterValidator(check)


def satisfies(predicate: Callable[[Any], bool], expected: str) -> AfterValidator:
    """Annotation metadata: ``predicate(value)`` must hold; the problem says ``expected ...``."""

    def check(value: Any) -> Any:
        if not predicate(value):
            raise ValueError(f"expected {expected}")
        return value

    return AfterValidator(check)


def checked_by(check: Callable[[Any], object]) -> AfterValidator:
    """Annotation metadata: run a capability's own check function, which raises
    :class:`InvalidArguments` naming the field; its problems are reported as they are. The
    value itself is kept (whatever ``check`` returns)."""

    def run(value: Any) -> Any:
        check(value)
        return value

    return AfterValidator(run)


# --- signatures --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    name: str
    annotation: Any
    default: Any = _NO_DEFAULT
    adapter: TypeAdapter[Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapter", TypeAdapter(self.annotation, config=_STRICT))

    @property
    def required(self) -> bool:
        return self.default is _NO_DEFAULT

    @property
    def type_name(self) -> str:
        return describe(self.annotation)

    def problems(self, value: Any) -> list[str]:
        """What is wrong with ``value`` for this parameter (empty when it fits)."""
        try:
            self.adapter.validate_python(value)
        except ValidationError as exc:
            return _problems(self, value, exc)
        return []


@dataclass(frozen=True)
class Signature:
    task: str
    params: tuple[Param, ...]

    def by_name(self) -> dict[str, Param]:
        return {p.name: p for p in self.params}

    def problems(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[str]:
        """Every mismatch between the call and the parameters, one line each."""
        out: list[str] = []
        if len(args) > len(self.params):
            out.append(f"takes at most {len(self.params)} positional arguments, got {len(args)}")
            return out
        given = {p.name: v for p, v in zip(self.params, args, strict=False)}
        for name, value in kwargs.items():
            if name in given:
                out.append(f"{name}: given twice")
            given[name] = value
        params = self.by_name()
        allowed = ", ".join(params) or "none"
        for name in given:
            if name not in params:
                # A key that is no identifier could be data pasted in the wrong place.
                shown = name if _IDENTIFIER.match(str(name)) else "(a name that is no identifier)"
                out.append(f"{shown}: unknown argument (allowed: {allowed})")
        for p in self.params:
            if p.name not in given:
                if p.required:
                    out.append(f"{p.name}: missing (expected {p.type_name})")
            else:
                out += p.problems(given[p.name])
        return out

    def check(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Raise :class:`InvalidArguments` listing every problem, if there is any."""
        problems = self.problems(args, kwargs)
        if problems:
            raise InvalidArguments(self.task, problems)


def signature_of(task_name: str, fn: Callable[..., Any]) -> Signature:
    """The typed parameters of a task function; refuses ``*args``, ``**kwargs`` and missing or
    unsupported annotations (at import time, so a bad task never registers)."""
    hints = typing.get_type_hints(fn, include_extras=True)
    params = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"{task_name}: hms tasks take named parameters only, not *{p.name}")
        if p.name not in hints:
            raise TypeError(f"{task_name}: parameter {p.name!r} needs a type annotation")
        _check_supported(task_name, p.name, hints[p.name])
        params.append(Param(p.name, hints[p.name], p.default))
    return Signature(task_name, tuple(params))


def _problems(p: Param, value: Any, exc: ValidationError) -> list[str]:
    errors = exc.errors(include_url=False, include_input=False)
    # A capability's own check (checked_by) already names the field and what is allowed.
    own = [e["ctx"]["error"] for e in errors
           if isinstance(e.get("ctx", {}).get("error"), InvalidArguments)]
    if own:
        return [line for err in own for line in err.problems]
    if any(e["type"] in ("value_error", "assertion_error") for e in errors):
        return validation.problems(exc, name=lambda loc: p.name + validation.location(loc))
    # Wrong type or out of range: one line saying what the parameter takes.
    wrong_type = any(e["type"].endswith("_type") or e["type"] in _TYPE_ERRORS for e in errors)
    got = f", got {_json_type(value)}" if wrong_type else ""
    return [f"{p.name}: expected {p.type_name}{got}"]


def _args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _bare(tp: Any) -> Any:
    """``Annotated[T, ...]`` -> ``T``."""
    return _args(tp)[0] if typing.get_origin(tp) is Annotated else tp


def _check_supported(task: str, name: str, tp: Any) -> None:
    tp = _bare(tp)
    origin = typing.get_origin(tp)
    if tp in (int, float, str, bool, type(None), Any):
        return
    if origin is Literal and all(isinstance(a, (str, int, bool)) for a in _args(tp)):
        return
    if _is_union(tp) or origin is list:
        for a in _args(tp):
            _check_supported(task, name, a)
        return
    if origin is dict and _args(tp) and _args(tp)[0] is str:
        _check_supported(task, name, _args(tp)[1])
        return
    raise TypeError(f"{task}: parameter {name!r} has an annotation JSON cannot carry: {tp!r}")


def matches(value: Any, tp: Any) -> bool:
    """Whether a JSON-decoded ``value`` fits annotation ``tp`` (constraints included)."""
    try:
        TypeAdapter(tp, config=_STRICT).validate_python(value)
    except ValidationError:
        return False
    return True


# --- descriptions ------------------------------------------------------------------------------


def describe(tp: Any) -> str:
    """What an annotation takes, in words: ``int from 1 to 100000``, ``list of int with at
    most 10 items``, ``one of "fast", "full"``; a ``Field(description=...)`` wins."""
    if typing.get_origin(tp) is Annotated:
        base, *meta = _args(tp)
        infos = [m for m in meta if isinstance(m, FieldInfo)]
        for info in infos:
            if info.description:
                return info.description
        constraints = [c for info in infos for c in info.metadata]
        return " ".join([describe(base), *_constraint_words(base, constraints)])
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if isinstance(tp, type):
        return tp.__name__
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in _args(tp))
    if _is_union(tp):
        return " or ".join(describe(a) for a in _args(tp))
    if origin is list:
        return f"list of {describe(_args(tp)[0])}"
    if origin is dict:
        item = _args(tp)[1]
        return "object" if item is Any else f"object of {describe(item)}"
    return "any"


def _constraint_words(base: Any, constraints: list[Any]) -> list[str]:
    c: dict[str, Any] = {}
    for item in constraints:
        for attr in ("ge", "gt", "le", "lt", "min_length", "max_length", "pattern"):
            if getattr(item, attr, None) is not None:
                c[attr] = getattr(item, attr)
    words = []
    if "ge" in c or "gt" in c:
        words.append(f"from {c['ge']}" if "ge" in c else f"above {c['gt']}")
        if "le" in c or "lt" in c:
            words.append(f"to {c['le']}" if "le" in c else f"below {c['lt']}")
    elif "le" in c or "lt" in c:
        words.append(f"at most {c['le']}" if "le" in c else f"below {c['lt']}")
    lo, hi = c.get("min_length"), c.get("max_length")
    if lo is not None or hi is not None:
        unit = "characters" if _bare(base) is str else "items"
        if lo is not None and hi is not None:
            words.append(f"with {lo} to {hi} {unit}")
        elif lo is not None:
            words.append(f"with at least {lo} {unit}")
        else:
            words.append(f"with at most {hi} {unit}")
    if "pattern" in c:
        words.append(f"matching {c['pattern']}")
    return words


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, list):
        return "list" if not value else "list with other items"
    return {int: "int", float: "float", str: "str", dict: "object"}.get(type(value), "other")


# --- command-line text -------------------------------------------------------------------------


def coerce_text(text: str, tp: Any) -> Any:
    """Turn a command-line ``--arg k=v`` text into the JSON value the annotation asks for.

    Scalars parse from their usual spelling (``true``/``false`` for bool); lists accept
    ``1,2,3`` or JSON; objects take JSON. What cannot be read is left as the string, so the
    signature check reports the field with its expected type.
    """
    tp = _bare(tp)
    if tp is str:
        return text
    if tp is bool:
        return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(
            text.lower(), text
        )
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            return text
    origin = typing.get_origin(tp)
    if origin is Literal:
        for a in _args(tp):
            if str(a) == text:
                return a
        return text
    if _is_union(tp):
        if text in ("null", "none", "") and type(None) in _args(tp):
            return None
        for a in _args(tp):
            if a is type(None):
                continue
            value = coerce_text(text, a)
            # The type alone decides the reading; ranges are the signature check's business.
            if matches(value, _bare(a)):
                return value
        return text
    if origin is list:
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if isinstance(value, list):
            return value
        return [coerce_text(part.strip(), _args(tp)[0]) for part in text.split(",") if part.strip()]
    try:
        return json.loads(text)
    except ValueError:
        return text


def call_arguments(task: Any, pairs: Sequence[str], raw_json: str | None) -> dict[str, Any]:
    """Arguments from ``--arg k=v`` pairs and a ``--json`` object, coerced by the task's
    parameter annotations and checked against its signature (raises InvalidArguments)."""
    sig = task.hms_signature
    params = sig.by_name()
    kwargs: dict[str, Any] = {}
    problems: list[str] = []
    if raw_json is not None:
        try:
            loaded = json.loads(raw_json)
        except ValueError:
            loaded = None
        if not isinstance(loaded, dict):
            problems.append("--json: expected a JSON object of argument names to values")
        else:
            kwargs.update(loaded)
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            problems.append("--arg: expected NAME=VALUE")
            continue
        if name in kwargs:
            problems.append(f"{name}: given twice")
            continue
        kwargs[name] = coerce_text(text, params[name].annotation) if name in params else text
    problems += sig.problems((), kwargs)
    if problems:
        raise InvalidArguments(sig.task, problems)
    return kwargs
