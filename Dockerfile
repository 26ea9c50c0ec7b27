# One image for every hms-tasks service in docker-compose.yml: web API, workers, beat, Flower.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HMS_TASKS_HOME=/data

WORKDIR /app
COPY pyproject.toml README.md beat_schedule.py ./
COPY hms_tasks ./hms_tasks
RUN pip install . && useradd --system --create-home --uid 10001 hms \
    && mkdir -p /data && chown hms /data

USER hms
WORKDIR /data
EXPOSE 8000 5555
CMD ["hms-tasks", "--help"]
