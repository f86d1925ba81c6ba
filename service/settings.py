"""Configuration, read from the environment (prefix ``TALLY_``) by pydantic-settings."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# The migrations live beside the packages in a source checkout (and in the Docker image,
# which installs the checkout in place); TALLY_MIGRATIONS_DIR overrides it elsewhere.
DEFAULT_MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TALLY_", extra="ignore")

    database_url: str = "postgresql://127.0.0.1:5432/tally"
    database_read_url: str | None = Field(
        default=None, description="Optional read replica; list and retrieve queries go there."
    )
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    # Prefix of every exchange and queue name (<ns>.events, <ns>.ingest, <ns>.dlx, <ns>.dead).
    amqp_namespace: str = Field(default="tally", pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    # RabbitMQ management API, for `tally queues` rates; optional.
    amqp_management_url: str = "http://guest:guest@127.0.0.1:15672/"

    http_host: str = "0.0.0.0"
    http_port: int = 8080
    consumer_http_port: int = 8081

    # The asyncpg pool: 2 cores serve best with a small pool (more connections only queue
    # inside PostgreSQL). Every statement is bounded so a stuck database never hangs a caller.
    db_pool_min: int = 2
    db_pool_max: int = 8
    db_command_timeout: float = 10.0
    db_connect_timeout: float = 5.0

    # Consumer batching: a batch closes at batch_size messages or batch_max_wait seconds
    # after its first message, whichever comes first.
    batch_size: int = Field(default=1000, ge=1, le=10_000)
    batch_max_wait: float = Field(default=0.05, gt=0, le=10)
    prefetch: int = Field(default=2000, ge=1, le=65_535)
    dedupe_retention_days: int = Field(default=35, ge=1)

    # Verified API keys are cached per process; a revocation evicts them at once (NOTIFY),
    # and this bounds an entry's life should a notification ever be missed. 0 disables.
    auth_cache_seconds: float = Field(default=30.0, ge=0, le=3600)

    # Per-key token bucket in each API process: `burst` requests at once, refilled at
    # `rate_limit_per_second`. 0 disables the limit.
    rate_limit_per_second: float = Field(default=100.0, ge=0)
    rate_limit_burst: int = Field(default=200, ge=1)

    # Request bounds for POST /v1/events.
    max_body_bytes: int = 1_048_576
    max_events_per_request: int = 1000

    migrations_dir: Path = DEFAULT_MIGRATIONS_DIR

    log_level: str = "INFO"
    log_format: Literal["json", "text", "auto"] = "auto"


def redact_dsn(dsn: str) -> str:
    """The DSN with its password replaced, fit for a log line."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
