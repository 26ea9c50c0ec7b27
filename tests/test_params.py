from __future__ import annotations

from typing import Annotated, Any, Literal

import pytest
from pydantic import Field

from hms_tasks.errors import InvalidArguments
from hms_tasks.params import (
    checked_by,
    coerce_text,
    describe,
    known,
    matches,
    satisfies,
    signature_of,
)


def sample(count: int, ids: list[int], mode: Literal["a", "b"] = "a",
           ratio: float = 1.0, note: str | None = None, extra: dict[str, int] | None = None
           ) -> None: ...


SIG = signature_of("hms.test.sample", sample)


def test_valid_call_has_no_problems() -> None:
    assert SIG.problems((), {"count": 1, "ids": [1, 2], "ratio": 2, "extra": {"a": 1}}) == []
    assert SIG.problems((3, []), {}) == []


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"ids": []}, "count: missing (expected int)"),
        ({"count": "3", "ids": []}, "count: expected int, got str"),
        ({"count": True, "ids": []}, "count: expected int, got bool"),
        ({"count": 1, "ids": [1, "x"]}, "ids: expected list of int, got list with other items"),
        ({"count": 1, "ids": [], "mode": "c"}, 'mode: expected one of "a", "b", got str'),
        ({"count": 1, "ids": [], "bogus": 1}, "bogus: unknown argument (allowed: count, ids, mode,"
                                              " ratio, note, extra)"),
        ({"count": 1, "ids": [], "extra": {"a": "b"}}, "extra: expected object of int or null"),
    ],
)
def test_problems_name_field_and_type(kwargs: dict[str, Any], expected: str) -> None:
    problems = SIG.problems((), kwargs)
    assert any(p.startswith(expected) for p in problems), problems


def test_problems_never_quote_values() -> None:
    secret = "Jane Doe 1961-04-02"
    with pytest.raises(InvalidArguments) as info:
        SIG.check((), {"count": secret, "ids": [secret], "note": 5, secret: 1})
    assert secret not in str(info.value)
    assert "1961" not in str(info.value)


def test_too_many_positional_arguments() -> None:
    assert SIG.problems(tuple(range(7)), {}) == ["takes at most 6 positional arguments, got 7"]


@pytest.mark.parametrize(
    ("text", "tp", "value"),
    [
        ("3", int, 3),
        ("x", int, "x"),
        ("2.5", float, 2.5),
        ("true", bool, True),
        ("no", bool, False),
        ("1,2,3", list[int], [1, 2, 3]),
        ("[4, 5]", list[int], [4, 5]),
        ("null", str | None, None),
        ("b", Literal["a", "b"], "b"),
        ('{"a": 1}', dict[str, int], {"a": 1}),
    ],
)
def test_coerce_text(text: str, tp: Any, value: Any) -> None:
    assert coerce_text(text, tp) == value


def test_matches_rejects_bool_for_numbers() -> None:
    assert not matches(True, int)
    assert not matches(False, float)
    assert matches(3, float)


def test_bad_signatures_refused_at_declaration() -> None:
    def star(*ids: int) -> None: ...

    def untyped(x) -> None:  # type: ignore[no-untyped-def]
        ...

    def objecty(x: object) -> None: ...

    for fn in (star, untyped, objecty):
        with pytest.raises(TypeError, match=r"hms\.test\.bad"):
            signature_of("hms.test.bad", fn)


# --- constraints in the signature (pydantic Field, known names, a capability's own check) ---

_SERVICES = ["billing", "lab"]


def _check_rows(rows: list[int]) -> list[int]:
    if sum(rows) > 10:
        raise InvalidArguments("hms.test.ranged", ["rows: at most 10 in total"])
    return rows


def ranged(
    limit: Annotated[int, Field(ge=1, le=100)] = 5,
    ids: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1, max_length=3)]
    | None = None,
    service: Annotated[str, known(lambda: _SERVICES, "service")] | None = None,
    run: Annotated[str, satisfies(str.isalnum, "a run id")] | None = None,
    code: Annotated[str, Field(pattern=r"^[a-f0-9]{8}$", description="8 hex digits")]
    | None = None,
    rows: Annotated[list[int], checked_by(_check_rows)] | None = None,
    meta: dict[str, Annotated[int, Field(ge=0)]] | None = None,
) -> None: ...


RANGED = signature_of("hms.test.ranged", ranged)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"limit": -5}, ["limit: expected int from 1 to 100"]),
        ({"limit": 101}, ["limit: expected int from 1 to 100"]),
        ({"limit": "5"}, ["limit: expected int from 1 to 100, got str"]),
        ({"ids": []}, ["ids: expected list of int from 1 with 1 to 3 items or null"]),
        ({"ids": [1, 0]}, ["ids: expected list of int from 1 with 1 to 3 items or null"]),
        ({"service": "radiology"}, ["service: unknown service (allowed: billing, lab)"]),
        ({"run": "a b"}, ["run: expected a run id"]),
        ({"code": "xyz"}, ["code: expected 8 hex digits or null"]),
        ({"rows": [5, 6]}, ["rows: at most 10 in total"]),
        ({"meta": {"ok": -1}}, ["meta: expected object of int from 0 or null"]),
    ],
)
def test_constraints_name_field_and_allowed_values(kwargs: dict[str, Any],
                                                   expected: list[str]) -> None:
    assert RANGED.problems((), kwargs) == expected


def test_constraints_accept_what_fits() -> None:
    assert RANGED.problems((), {"limit": 100, "ids": [1, 2, 3], "service": "lab", "run": "r1",
                                "code": "0a1b2c3d", "rows": [5, 5], "meta": {"a": 0}}) == []


def test_known_names_follow_their_source() -> None:
    _SERVICES.append("radiology")
    try:
        assert RANGED.problems((), {"service": "radiology"}) == []
    finally:
        _SERVICES.remove("radiology")


def test_constraint_problems_never_quote_values() -> None:
    secret = "Jane Doe 1961-04-02"
    problems = RANGED.problems((), {"service": secret, "run": secret, "code": secret,
                                    "meta": {secret: "x"}, "limit": secret})
    assert len(problems) == 5
    assert not any("Jane" in p or "1961" in p for p in problems), problems


def test_describe_renders_ranges_lengths_and_descriptions() -> None:
    assert describe(Annotated[int, Field(ge=0, le=999)]) == "int from 0 to 999"
    assert describe(Annotated[int, Field(le=9)]) == "int at most 9"
    assert describe(Annotated[str, Field(max_length=64)]) == "str with at most 64 characters"
    assert describe(Annotated[str, Field(description="a sweep id")] | None) == "a sweep id or null"
    assert describe(dict[str, Any]) == "object"


def test_coerce_text_reads_annotated_types() -> None:
    assert coerce_text("-5", Annotated[int, Field(ge=1)]) == -5
    assert coerce_text("0", Annotated[int, Field(ge=1)] | None) == 0
    assert coerce_text("1,2", Annotated[list[int], Field(min_length=1)]) == [1, 2]
