"""The baseline of ``bench/assets.py``'s page part: the demo with its static files served by
Django's ``django.views.static.serve`` and ``Cache-Control: no-cache`` (every visit revalidates
every asset, the usual setup when asset names carry no hash)."""

from __future__ import annotations

from hms_tasks.demo.settings import *  # noqa: F403

ROOT_URLCONF = "bench.assets_urls"
