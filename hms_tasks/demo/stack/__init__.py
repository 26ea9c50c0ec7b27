"""The demo's development stack (``hms-tasks run``, what ``make run`` runs): Redis provisioning
(:mod:`.provision`, which may ``apt-get install`` as root), the supervisor of worker, beat,
Flower and the demo API (:mod:`.supervisor`), and its command (:mod:`.cli`).

Part of the demo, not of the library: nothing outside ``hms_tasks.demo`` imports it. The
``hms-tasks`` command line finds ``run`` through the entry point group ``hms_tasks.commands``.
"""
