"""Metrics: snapshots of the nodes hms-tasks runs on (and, later, of the shared services)."""
