FROM python:3.11-slim

WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    TALLY_MIGRATIONS_DIR=/app/migrations TALLY_LOG_FORMAT=json
COPY pyproject.toml README.md ./
COPY service ./service
COPY consumers ./consumers
COPY migrations ./migrations
RUN pip install --no-cache-dir . && useradd --system --uid 10001 tally
USER tally
EXPOSE 8080 8081
CMD ["tally", "api"]
