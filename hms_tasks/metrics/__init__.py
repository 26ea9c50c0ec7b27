"""Metrics: per-node samples (:mod:`~hms_tasks.metrics.host`, :mod:`~hms_tasks.metrics.collect`)
of the hosts, the worker processes and the shared services; a bounded time-series store in Redis
(:mod:`~hms_tasks.metrics.store`); the API's own request timings
(:mod:`~hms_tasks.metrics.timings`, :mod:`~hms_tasks.metrics.middleware`); alert rules with
hysteresis and webhooks (:mod:`~hms_tasks.metrics.alerts`); and Prometheus exposition
(:mod:`~hms_tasks.metrics.prometheus`)."""
