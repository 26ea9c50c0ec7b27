"""Django app config for hms-tasks: the only place hms-tasks hooks into Django."""

from __future__ import annotations

from django.apps import AppConfig


class HmsTasksConfig(AppConfig):
    name = "hms_tasks"
    label = "hms_tasks"
    verbose_name = "hms-tasks"

    def ready(self) -> None:
        from django.core.signals import setting_changed

        from hms_tasks import conf

        setting_changed.connect(conf.reset, dispatch_uid="hms_tasks.conf.reset")
