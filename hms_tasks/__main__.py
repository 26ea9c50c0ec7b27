"""``python -m hms_tasks``: the ``hms-tasks`` command line, for when the script is not on PATH."""

from __future__ import annotations

from hms_tasks.cli import main

if __name__ == "__main__":
    main()
