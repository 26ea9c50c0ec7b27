"""App config of the demo HMS (app label ``hms``)."""

from __future__ import annotations

from django.apps import AppConfig


class DemoHmsConfig(AppConfig):
    name = "hms_tasks.demo"
    label = "hms"
    verbose_name = "Demo HMS"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The demo uses hms-tasks' cache the way a real HMS would: registering its kinds
        # and models from its own AppConfig.
        from hms_tasks.demo import probes
        from hms_tasks.demo.cache import register
        from hms_tasks.queries import pool

        register()
        # Its query probes, audited nightly by hms.queries.audit (docs/queries.md).
        probes.register()
        # Web processes publish their connection pool's figures too (workers do from the
        # queries tasks module), so `hms-tasks db` sees every process.
        pool.connect_signals()
