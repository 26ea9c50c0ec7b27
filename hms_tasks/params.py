"""Typed task parameters: derived from a task function's annotations, checked before publishing
(``hms-tasks dispatch``) and again on the worker (``celery call`` and ``send_task`` skip every
client-side check).

Supported annotations are the JSON shapes task arguments may take: ``int``, ``float``, ``str``,
``bool``, ``None``, ``list[T]``, ``dict[str, T]``, ``Literal[...]``, ``T | None`` and unions of
these. Problems name the field and the expected type and never quote the value.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

from hms_tasks.errors import InvalidArguments

__all__ = ["Param", "Signature", "coerce_text", "signature_of"]

_NO_DEFAULT: Any = inspect.Parameter.empty
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


@dataclass(frozen=True)
class Param:
    name: str
    annotation: Any
    default: Any = _NO_DEFAULT

    @property
    def required(self) -> bool:
        return self.default is _NO_DEFAULT

    @property
    def type_name(self) -> str:
        return type_name(self.annotation)


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
            elif not matches(given[p.name], p.annotation):
                out.append(
                    f"{p.name}: expected {p.type_name}, got {_json_type(given[p.name])}"
                )
        return out

    def check(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Raise :class:`InvalidArguments` listing every problem, if there is any."""
        problems = self.problems(args, kwargs)
        if problems:
            raise InvalidArguments(self.task, problems)


def signature_of(task_name: str, fn: Callable[..., Any]) -> Signature:
    """The typed parameters of a task function; refuses ``*args``, ``**kwargs`` and missing or
    unsupported annotations (at import time, so a bad task never registers)."""
    hints = typing.get_type_hints(fn)
    params = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"{task_name}: hms tasks take named parameters only, not *{p.name}")
        if p.name not in hints:
            raise TypeError(f"{task_name}: parameter {p.name!r} needs a type annotation")
        _check_supported(task_name, p.name, hints[p.name])
        params.append(Param(p.name, hints[p.name], p.default))
    return Signature(task_name, tuple(params))


def _args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _check_supported(task: str, name: str, tp: Any) -> None:
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
    """Whether a JSON-decoded ``value`` fits annotation ``tp``."""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in _args(tp))
    if _is_union(tp):
        return any(matches(value, a) for a in _args(tp))
    if origin is list:
        (item,) = _args(tp) or (Any,)
        return isinstance(value, list) and all(matches(v, item) for v in value)
    if origin is dict:
        item = _args(tp)[1]
        return isinstance(value, dict) and all(
            isinstance(k, str) and matches(v, item) for k, v in value.items()
        )
    return False


def type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in _args(tp))
    if _is_union(tp):
        return " or ".join(type_name(a) for a in _args(tp))
    if origin is list:
        return f"list of {type_name(_args(tp)[0])}"
    if origin is dict:
        return f"object of {type_name(_args(tp)[1])}"
    return "any"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, list):
        return "list" if not value else "list with other items"
    return {int: "int", float: "float", str: "str", dict: "object"}.get(type(value), "other")


def coerce_text(text: str, tp: Any) -> Any:
    """Turn a command-line ``--arg k=v`` text into the JSON value the annotation asks for.

    Scalars parse from their usual spelling (``true``/``false`` for bool); lists accept
    ``1,2,3`` or JSON; objects take JSON. What cannot be read is left as the string, so the
    signature check reports the field with its expected type.
    """
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
            if matches(value, a):
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
