"""The demo HMS: a small Django hospital app (label ``hms``) that hms-tasks ships as its embedded
default and tests against. It uses hms-tasks through the same public API a real HMS would."""
