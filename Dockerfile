FROM python:3.11-slim

WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    UV_PROJECT_ENVIRONMENT=/opt/tally UV_PYTHON_DOWNLOADS=never UV_NO_CACHE=1 \
    PATH=/opt/tally/bin:$PATH \
    TALLY_MIGRATIONS_DIR=/app/migrations TALLY_LOG_FORMAT=json
# The runtime dependencies exactly as uv.lock pins them (no dev or docs extra), installed by
# the uv version the Makefile pins; the dependencies first, so that a code change reuses them.
RUN pip install --no-cache-dir uv==0.13.9
COPY pyproject.toml uv.lock README.md LICENSE ./
RUN uv sync --frozen --no-install-project
COPY service ./service
COPY consumers ./consumers
COPY migrations ./migrations
RUN uv sync --frozen && useradd --system --uid 10001 tally
USER tally
EXPOSE 8080 8081
CMD ["tally", "api"]
