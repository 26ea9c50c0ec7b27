"""The tag-aware cache: a Redis cache the HMS reads from, kept warm and correct by hms-tasks."""
