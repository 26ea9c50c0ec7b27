"""Celery task names of the metrics capability: contracts, snapshot-tested.

Import-light (nothing but constants), so beat schedules and clients calling ``send_task`` can
name the tasks without importing Celery or Django. Renaming one breaks in-flight messages and
beat entries: add a migration note to docs/metrics.md first.
"""

from __future__ import annotations

__all__ = [
    "METRICS_COLLECT",
    "METRICS_COLLECT_HOST",
    "METRICS_COLLECT_NODE",
    "METRICS_DELIVER_WEBHOOK",
    "METRICS_EVALUATE_ALERTS",
    "METRICS_ROLLUP",
]

METRICS_COLLECT_HOST = "hms.metrics.collect_host"
METRICS_COLLECT = "hms.metrics.collect"
METRICS_COLLECT_NODE = "hms.metrics.collect_node"
METRICS_ROLLUP = "hms.metrics.rollup"
METRICS_EVALUATE_ALERTS = "hms.metrics.evaluate_alerts"
METRICS_DELIVER_WEBHOOK = "hms.metrics.deliver_webhook"
