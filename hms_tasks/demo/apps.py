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

        register()
        # Its query probes, audited nightly by hms.queries.audit (docs/queries.md).
        probes.register()
