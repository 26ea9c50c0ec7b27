"""``python -m bench``: every part in its own process, rows printed as a part ends, and a
failing part does not take the others with it (defect 14)."""

from __future__ import annotations

import pytest

import bench.__main__ as bench_main


def test_a_failing_part_does_not_lose_the_others(monkeypatch: pytest.MonkeyPatch,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench_main, "BENCHES", {
        "first": "tests.bench_fakes:uses_redis",
        "broken": "tests.bench_fakes:crash",
        "last": "tests.bench_fakes:uses_redis",
    })
    code = bench_main.main(["first", "broken", "last"])
    out, err = capfd.readouterr()
    assert code == 1
    # Each part's rows printed as it ended, then all of them; both Redis-using parts worked
    # although each ran after another part's Redis was stopped.
    first, broken, last = out.split("\n== ")[1:]
    assert first.startswith("first\n")
    assert "published" in first
    assert "yes" in first
    assert broken.startswith("broken\n")
    assert "published" not in broken
    assert last.startswith("last\n")
    summary = last.split("all parts (2 of 3 finished):")[1]
    assert summary.count("published") == 2
    assert "NO" not in summary
    assert out.rstrip().endswith("failed: broken")
    assert "redis.exceptions.ConnectionError" in err
    assert "broken: FAILED (exit 3)" in err


def test_an_unknown_part_exits_2() -> None:
    assert bench_main.main(["nosuch"]) == 2
