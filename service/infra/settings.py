"""Configuration, read from the environment (prefix ``TALLY_``) by pydantic-settings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The migrations live beside the packages in a source checkout (and in the Docker image,
# which installs the checkout in place); TALLY_MIGRATIONS_DIR overrides it elsewhere.
DEFAULT_MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TALLY_", extra="ignore")

    database_url: str = "postgresql://127.0.0.1:5432/tally"
    database_read_url: str | None = Field(
        default=None, description="Optional read replica; list and retrieve queries go there."
    )
    # Seconds a read carrying a consistency token (X-Tally-Consistency) waits for the standby
    # to replay it; past that it reads the primary (service/infra/standby.py).
    database_read_wait: float = Field(default=0.5, ge=0, le=30)
    # Seconds between the API's checks of the standby (health, replay position, lag).
    database_read_check_interval: float = Field(default=1.0, gt=0, le=60)
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    # Prefix of every exchange and queue name (<ns>.events, <ns>.ingest, <ns>.dlx, <ns>.dead).
    amqp_namespace: str = Field(default="tally", pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    # RabbitMQ management API, for `tally queues` rates; optional.
    amqp_management_url: str = "http://guest:guest@127.0.0.1:15672/"
    # AMQP users bound to the organizations they may publish events for (JSON: user -> list
    # of organization names or ids, or ["*"]); see service/core/publishers.py. Empty: any.
    amqp_publishers: dict[str, list[str]] = Field(default_factory=dict)

    http_host: str = "0.0.0.0"
    http_port: int = 8080
    consumer_http_port: int = 8081
    # Seconds a request's head (request line and headers) may take to arrive, counted from
    # its first byte; past it the connection is closed (408). aiohttp has no such timer of
    # its own, so without it a client trickling headers holds a connection indefinitely.
    http_header_timeout: float = Field(default=10.0, gt=0, le=600)
    # Seconds an idle keep-alive connection stays open (aiohttp's run_app default, said out loud).
    http_keepalive_timeout: float = Field(default=75.0, gt=0, le=3600)

    # The base of the absolute links the API builds (list next/previous, Location), e.g.
    # https://api.example.com/tally; its path is a prefix. Unset: links use the request's
    # Host if it is allowed below, and are relative (path and query) otherwise.
    public_url: str | None = None
    # Hosts a request's Host header may name for links to follow it: exact names,
    # '*.example.com' (any subdomain), or '*' (any host: an explicit opt-in). Comma-separated.
    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = ("localhost", "127.0.0.1", "[::1]")
    # Behind a reverse proxy (TLS terminated there): links follow the proxy's
    # X-Forwarded-Proto and X-Forwarded-Host (the host still checked against allowed_hosts).
    # Only for a proxy that sets (or strips) both on every request: a client reaching tally
    # directly could otherwise choose its links' scheme. Off: the request's own scheme and Host.
    trust_forwarded_headers: bool = False

    # The asyncpg pool: 2 cores serve best with a small pool (more connections only queue
    # inside PostgreSQL). Every statement is bounded so a stuck database never hangs a caller.
    db_pool_min: int = 2
    db_pool_max: int = 8
    db_command_timeout: float = 10.0
    db_connect_timeout: float = 5.0
    # Fair sharing of the API's pool: an organization's requests hold at most this many
    # connections at once in each API process (unset: half the pool, at least 1), so one
    # tenant's slow queries leave the rest of the pool to everyone else.
    db_org_concurrency: int | None = Field(default=None, ge=1)
    # Seconds an API request waits for its organization's turn and a pool connection
    # together; past it the answer is 503 with Retry-After instead of an endless queue.
    db_acquire_timeout: float = Field(default=2.0, gt=0, le=60)

    # Consumer batching (consumers/ingest.py): a batch holds what arrived while the previous
    # one was folded, up to batch_size events, or up to batch_max_events when a backlog is
    # waiting; with no batch in flight it closes batch_max_wait seconds after its first message.
    batch_size: int = Field(default=1000, ge=1, le=10_000)
    batch_max_events: int | None = Field(default=None, ge=1, le=50_000)  # default: 4 x batch_size
    batch_max_wait: float = Field(default=0.05, gt=0, le=10)
    prefetch: int = Field(default=2000, ge=1, le=65_535)
    dedupe_retention_days: int = Field(default=35, ge=1)

    @property
    def largest_batch(self) -> int:
        """Events per consumer transaction at most (under a backlog)."""
        return max(self.batch_size, self.batch_max_events or 4 * self.batch_size)

    # Verified API keys are cached per process; a revocation evicts them at once (NOTIFY),
    # and this bounds an entry's life should a notification ever be missed. 0 disables.
    auth_cache_seconds: float = Field(default=30.0, ge=0, le=3600)

    # Per-key token bucket in each API process: `burst` requests at once, refilled at
    # `rate_limit_per_second`. 0 disables the limit.
    rate_limit_per_second: float = Field(default=100.0, ge=0)
    rate_limit_burst: int = Field(default=200, ge=1)
    # Per-client-IP token bucket for requests no key vouches for: public routes (health,
    # metrics, docs) and requests whose key fails authentication. An empty bucket answers
    # 429 before any database lookup, so guessing keys costs the database nothing. 0 disables.
    ip_rate_limit_per_second: float = Field(default=20.0, ge=0)
    ip_rate_limit_burst: int = Field(default=100, ge=1)

    # Request bounds for POST /v1/events.
    max_body_bytes: int = 1_048_576
    max_events_per_request: int = 1000

    migrations_dir: Path = DEFAULT_MIGRATIONS_DIR

    log_level: str = "INFO"
    log_format: Literal["json", "text", "auto"] = "auto"

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(h.strip().lower() for h in value.split(",") if h.strip())
        return value

    @field_validator("public_url")
    @classmethod
    def _absolute_url(cls, value: str | None) -> str | None:
        from urllib.parse import urlsplit

        if value is None or not value.strip():
            return None
        url = urlsplit(value.strip())
        if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
            raise ValueError("must be an absolute http(s) URL without query or fragment")
        return url.geturl().rstrip("/")

    @property
    def db_org_limit(self) -> int:
        """Connections one organization may hold at once per API process."""
        return self.db_org_concurrency or max(1, self.db_pool_max // 2)


def redact_dsn(dsn: str) -> str:
    """The DSN with its password replaced, fit for a log line."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
