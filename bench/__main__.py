"""``python -m bench [NAME]`` (``make bench [BENCH=NAME]``): run benchmarks, print one table."""

from __future__ import annotations

import importlib
import os
import sys

from bench.common import Row, print_table

BENCHES = {
    "overhead": "bench.overhead",
    "health": "bench.health",
    "cache": "bench.cache",
    "loadtest": "bench.loadtest",
    "metrics": "bench.metrics",
}


def main(argv: list[str]) -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hms_tasks.demo.settings")
    names = argv or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown benchmark {unknown[0]!r}; known: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    rows: list[Row] = []
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows += importlib.import_module(BENCHES[name]).run()
    print_table(rows)
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
