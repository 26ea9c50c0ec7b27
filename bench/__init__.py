"""Benchmarks of hms-tasks: each measures this project and its baseline side by side in one run."""
