"""``python -m bench [NAME...]`` (``make bench [BENCH=NAME]``): run benchmarks, print their tables.

Each benchmark (a *part*) runs in a process of its own: a part binds Django, the Celery app,
kombu's pools and the hms-tasks store to its private Redis, which it stops when it ends, so
nothing a part leaves behind can reach the next one. A part's rows print as soon as it ends; a
part that fails is reported (its traceback on stderr) and the others still run. At the end one
table holds every figure measured, followed by the parts that failed.

Exit status: 0 every target met, 1 a target missed or a part failed, 2 unknown benchmark.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict
from pathlib import Path

from bench.common import REPO, Row, print_table

#: name -> ``module`` (its ``run()``) or ``module:function``.
BENCHES = {
    "overhead": "bench.overhead",
    "health": "bench.health",
    "cache": "bench.cache",
    "loadtest": "bench.loadtest",
    "metrics": "bench.metrics",
    "queries": "bench.queries",
    "queries_pool": "bench.queries_pool",
    "assets": "bench.assets",
    "scaling": "bench.scaling",
    "responses": "bench.responses",
    "failover": "bench.failover",
    "take": "bench.take",
}

#: Exit codes of one part's process.
MET, MISSED, CRASHED = 0, 1, 3


def run_part(target: str, rows_file: str) -> int:
    """Run one part in this process: print its table, write its rows to ``rows_file``."""
    module, _, function = target.partition(":")
    try:
        rows: list[Row] = getattr(importlib.import_module(module), function or "run")()
    except (Exception, SystemExit):
        traceback.print_exc()
        return CRASHED
    Path(rows_file).write_text(json.dumps([asdict(r) for r in rows]))
    print_table(rows)
    sys.stdout.flush()
    return MET if all(r.ok is not False for r in rows) else MISSED


def main(argv: list[str]) -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hms_tasks.demo.settings")
    if argv[:1] == ["--part"]:
        return run_part(argv[1], argv[2])
    names = argv or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown benchmark {unknown[0]!r}; known: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    rows: list[Row] = []
    failed: list[str] = []
    missed = False
    with tempfile.TemporaryDirectory(prefix="hms-bench-rows-") as tmp:
        for name in names:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            print(f"\n== {name}", flush=True)
            rows_file = Path(tmp) / f"{name}.json"
            code = subprocess.call(
                [sys.executable, "-m", "bench", "--part", BENCHES[name], str(rows_file)],
                cwd=REPO)
            if code in (MET, MISSED) and rows_file.exists():
                rows += [Row(**r) for r in json.loads(rows_file.read_text())]
                missed = missed or code == MISSED
            else:
                failed.append(name)
                print(f"{name}: FAILED (exit {code}); its error is above; going on",
                      file=sys.stderr, flush=True)
    if len(names) > 1:
        print(f"\nall parts ({len(names) - len(failed)} of {len(names)} finished):")
        print_table(rows)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
