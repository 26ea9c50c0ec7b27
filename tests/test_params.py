from __future__ import annotations

from typing import Any, Literal

import pytest

from hms_tasks.errors import InvalidArguments
from hms_tasks.params import coerce_text, matches, signature_of


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
