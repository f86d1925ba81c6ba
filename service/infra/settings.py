"""Configuration, read from the environment (prefix ``TALLY_``) by pydantic-settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The migrations live beside the packages in a source checkout (and in the Docker image,
# which installs the checkout in place); TALLY_MIGRATIONS_DIR overrides it elsewhere.
DEFAULT_MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


class Settings(BaseSettings):
    """Every setting, read from the environment variable ``TALLY_<NAME>``. Each field's
    description is the documentation's: the configuration reference (docs/configuration.md)
    is generated from this class (``make config-reference``) and tests/test_docs_site.py fails
    when the two disagree. Write descriptions for the operator who reads that page; keep the
    why of a default in them."""

    model_config = SettingsConfigDict(env_prefix="TALLY_", extra="ignore")

    # ---- PostgreSQL
    database_url: str = Field(
        default="postgresql://127.0.0.1:5432/tally",
        description="The primary database: every write, key lookup and fold, and every read unless "
        "`TALLY_DATABASE_READ_URL` is set. `tally migrate` creates the database if it is missing.",
    )
    database_read_url: str | None = Field(
        default=None,
        description="A streaming standby of the primary, for list, retrieve and usage queries (writes, keys and "
        "the fold stay on the primary). Unset: everything reads the primary. See Operating → Scaling out.",
    )
    database_read_wait: float = Field(
        default=0.5,
        ge=0,
        le=30,
        description="Seconds a read carrying a consistency token (`X-Tally-Consistency`) waits for the standby to "
        "replay it; past that it reads the primary.",
    )
    database_read_check_interval: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="Seconds between the API's checks of the standby (health, replay position, lag).",
    )

    # ---- RabbitMQ
    amqp_url: str = Field(
        default="amqp://guest:guest@127.0.0.1:5672/",
        description="RabbitMQ; a cluster's nodes as several URLs separated by commas, each with its credentials "
        "and virtual host (tried in turn).",
    )
    amqp_namespace: str = Field(
        default="tally",
        pattern=r"^[A-Za-z0-9_.-]{1,100}$",
        description="Prefix of every exchange and queue name (`<ns>.events`, `<ns>.ingest`, `<ns>.dlx`, "
        "`<ns>.dead`, `<ns>.alerts`, `<ns>.unroutable`), so that several tallies can share a broker; "
        "`tally namespace delete` removes one.",
    )
    amqp_management_url: str = Field(
        default="http://guest:guest@127.0.0.1:15672/",
        description="The RabbitMQ management API, for the unacknowledged counts and rates of `tally queues` and "
        "`tally status`. Optional: without it they show what AMQP alone can tell and say why.",
    )
    amqp_publishers: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Binds AMQP users to the organizations they may publish events for, as JSON: "
        '`{"billing": ["acme", "globex"], "gateway": ["*"]}` (organization names or ids; `*` for any). '
        "The consumer dead-letters an event whose publisher (the message's `user_id`, which RabbitMQ validates) "
        "may not write its organization, with the reason `forbidden_publisher`; tally's own AMQP users (those "
        "of `TALLY_AMQP_URL`) may write any. Empty (the default): anyone who may publish to the events "
        "exchange writes any organization's events.",
    )

    # ---- HTTP
    http_host: str = Field(default="0.0.0.0", description="The address the API (and `tally dev`) listens on.")
    http_port: int = Field(default=8080, description="The API's port (also the consumer's, in `tally dev`).")
    consumer_http_port: int = Field(
        default=8081,
        description="The port of a `tally consume` process's own `/healthz`, `/readyz` and `/metrics`.",
    )
    http_header_timeout: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="Seconds a request's line and headers may take to arrive, counted from their first byte; past "
        "it the connection is closed with a 408 (aiohttp has no such timer: a client trickling headers would "
        "hold a connection indefinitely).",
    )
    http_keepalive_timeout: float = Field(
        default=75.0,
        gt=0,
        le=3600,
        description="Seconds an idle keep-alive connection stays open (aiohttp's own default, said out loud).",
    )
    public_url: str | None = Field(
        default=None,
        description="The base of the absolute links the API builds (a list's `next` and `previous`, `Location`), "
        "e.g. `https://api.example.com/tally`; its path is a prefix. Unset: links follow the request's `Host` "
        "when `TALLY_ALLOWED_HOSTS` allows it, and are relative otherwise.",
    )
    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("localhost", "127.0.0.1", "[::1]"),
        description="Comma-separated `Host` names links may follow without `TALLY_PUBLIC_URL`: exact names, "
        "`*.example.com` (any subdomain) or `*` (any host). A request naming another host gets relative links, "
        "never links to a host the caller made up.",
    )
    trust_forwarded_headers: bool = Field(
        default=False,
        description="Behind a reverse proxy that terminates TLS: links take their scheme and host from the "
        "proxy's `X-Forwarded-Proto` and `X-Forwarded-Host` (the host still held to `TALLY_ALLOWED_HOSTS`). "
        "Only for a proxy that sets or strips both on every request.",
    )

    # ---- The database pool
    db_pool_min: int = Field(default=2, description="Connections each process's asyncpg pool keeps open.")
    db_pool_max: int = Field(
        default=8,
        description="Connections each process's asyncpg pool holds at most (size PostgreSQL's "
        "`max_connections` for the sum over processes). A small pool serves 2 cores best: more connections "
        "only queue inside PostgreSQL.",
    )
    db_command_timeout: float = Field(
        default=10.0,
        description="Seconds any statement may take (also the API sessions' `statement_timeout`, so PostgreSQL "
        "stops what the client gave up on).",
    )
    db_connect_timeout: float = Field(
        default=5.0,
        description="Seconds to open a database connection, or for the consumer to get a pooled one.",
    )
    db_org_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="Database connections one organization's requests may hold at once in each API process "
        "(unset: half of `TALLY_DB_POOL_MAX`, at least 1), so one tenant's slow queries leave the rest of the "
        "pool to everyone else.",
    )
    db_acquire_timeout: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="Seconds an API request waits for its organization's turn and a pooled connection together; "
        "past it the answer is 503 with `Retry-After` rather than an endless queue.",
    )

    # ---- The consumer
    batch_size: int = Field(
        default=1000,
        ge=1,
        le=10_000,
        description="Events per consumer transaction when no backlog is waiting: a batch holds what arrived "
        "while the previous one was folded, up to this many.",
    )
    batch_max_events: int | None = Field(
        default=None,
        ge=1,
        le=50_000,
        description="Events per consumer transaction at most while a backlog is waiting (unset: 4 × "
        "`TALLY_BATCH_SIZE`): larger batches fold more events per customer per transaction.",
    )
    batch_max_wait: float = Field(
        default=0.05,
        gt=0,
        le=10,
        description="Seconds a batch waits to fill when no batch is in flight, counted from its first message: "
        "a trickle is folded at once.",
    )
    consumer_processes: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Processes `tally consume` folds with, competing on the ingest queue like separate consumers "
        "(unset: one per CPU core, at most 4). One process serves health, readiness, metrics (every process's, "
        "summed), housekeeping and webhooks; the others only fold. A Python process folds on one core at most: "
        "with PostgreSQL and RabbitMQ on the same 2 cores, 2 processes folded 1.13-1.20x the single-event "
        "messages of one, but 0.87-0.90x the batch messages (100 events each; `bench/ingest.py`): with batch "
        "publishers and the database on the consumer's machine, set 1.",
    )
    prefetch: int = Field(
        default=2000,
        ge=1,
        le=65_535,
        description="Unacknowledged messages the broker hands each consumer at most (bounds its memory, and keeps "
        "a full next batch waiting while one is folded).",
    )
    dedupe_retention_days: int = Field(
        default=35,
        ge=1,
        description="Days event ids are remembered for deduplication (and their amounts, for late deletions); an "
        "event older than this is refused (`too_old`), as it could otherwise be counted twice.",
    )
    change_log_retention_hours: int = Field(
        default=72,
        ge=1,
        le=24 * 366,
        description="Hours the change log keeps which customers each commit changed: how far back a change feed "
        "client may resume, and how long changes wait for a webhook endpoint that is down.",
    )

    # ---- Change feed (service/api/changefeed.py)
    change_stream_heartbeat_seconds: float = Field(
        default=15.0,
        gt=0,
        le=300,
        description="Seconds between heartbeats (comment lines) on an idle `GET /v1/customers/changes` event "
        "stream: they keep proxies and load balancers from closing it for idleness, and let a client notice a dead "
        "connection. Keep it under the shortest idle timeout between clients and tally.",
    )
    change_streams_per_key: int = Field(
        default=5,
        ge=1,
        le=10_000,
        description="Event streams of the change feed one API key may hold open at once on each API process; one "
        "more is refused with 429. Each open stream costs a task and a database read per commit of its "
        "organization and environment.",
    )
    change_stream_send_timeout: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="Seconds a change stream waits for its client to take what was sent (its send buffer to "
        "drain); past that the client is sent `resync` and dropped, rather than buffered without bound. It "
        "resumes from its last event id.",
    )

    # ---- Webhooks (consumers/webhooks.py)
    webhook_dispatch: bool = Field(
        default=True,
        description="Whether `tally consume` (and `tally dev`) dispatch webhooks beside folding events. Turn it off "
        "on the consumers and run `tally webhooks` processes instead to keep the dispatch's work (reading what "
        "committed, sending) off the fold's processes.",
    )
    webhook_allow_private: bool = Field(
        default=False,
        description="Let webhook endpoints reach private, loopback, link-local and other non-public addresses. "
        "Off, such an address is refused when an endpoint is created and again at each delivery, against the "
        "address actually connected to (a name that resolves to one is refused too). Turn it on only where every "
        "key with the admin scope is trusted with the network tally runs in (tests, a laptop).",
    )
    webhook_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=60,
        description="Seconds a webhook delivery may take in all (connecting, sending, the answer's head); past it "
        "the attempt failed and is retried.",
    )
    webhook_retry_hours: float = Field(
        default=72.0,
        gt=0,
        le=24 * 30,
        description="Hours a webhook delivery is retried from its creation (or its redelivery) before it is "
        "marked failed.",
    )
    webhook_retry_base_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Seconds before a failed webhook delivery's first retry; each further failure doubles it, up "
        "to `TALLY_WEBHOOK_RETRY_MAX_SECONDS`, with jitter (each delay between half and all of it).",
    )
    webhook_retry_max_seconds: float = Field(
        default=3600.0,
        gt=0,
        le=86_400,
        description="Seconds between retries of a webhook delivery at most.",
    )
    webhook_disable_after_hours: float = Field(
        default=72.0,
        gt=0,
        le=24 * 30,
        description="Hours a webhook endpoint may fail every attempt before it is disabled (a log line, and "
        "`tally_webhook_endpoints_disabled`); one success resets the count. A disabled endpoint gets no more "
        "deliveries: delete it and create it again once it works.",
    )
    webhook_poll_seconds: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="Seconds between a consumer's looks for new webhook events and due retries while idle (a "
        "commit of its own fold wakes it at once).",
    )
    webhook_concurrency: int = Field(
        default=32,
        ge=1,
        le=1000,
        description="Webhook deliveries each consumer process sends at once at most.",
    )
    webhook_yield_rate: float = Field(
        default=50,
        ge=1,
        le=100_000,
        description="Webhook deliveries a second each consumer process sends at most while its fold has a backlog "
        "(more messages ready in the ingest queue than `TALLY_PREFETCH`), and deliveries are made from new events "
        "only about as fast: the fold's events come first. At full speed again once the backlog is folded; "
        "`tally_webhook_yielding` shows when.",
    )
    webhook_delivery_retention_days: int = Field(
        default=30,
        ge=1,
        description="Days delivered and failed webhook deliveries stay in the delivery log (and can be redelivered).",
    )

    @property
    def consumer_process_count(self) -> int:
        """How many processes `tally consume` folds with."""
        if self.consumer_processes is not None:
            return self.consumer_processes
        return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))

    @property
    def largest_batch(self) -> int:
        """Events per consumer transaction at most (under a backlog)."""
        return max(self.batch_size, self.batch_max_events or 4 * self.batch_size)

    # ---- Read cache (service/api/readcache.py)
    read_cache_mb: int = Field(
        default=32,
        ge=0,
        le=65_536,
        description="Megabytes of list and retrieve responses each API process keeps in memory, served again until "
        "it hears of a commit that may change them (every write through tally notifies every process). 0 turns "
        "the cache off (ETag and If-None-Match still work). Rows changed by hand in SQL are not heard of: run "
        "`SELECT pg_notify('tally_changes', '<organization id>:<environment>')` after such a change.",
    )
    read_cache_entry_kb: int = Field(
        default=1024,
        ge=1,
        le=1_048_576,
        description="The largest response, in kilobytes, the read cache keeps (larger ones are read each time).",
    )

    # ---- Keys and rate limits
    auth_cache_seconds: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="Each API process holds every live key in memory (the secrets' hashes only), following "
        "creations and revocations as they commit (PostgreSQL NOTIFY), and reloads them all this often as a "
        "backstop. 0 turns the in-memory keys off: every request looks its key up in the database.",
    )
    rate_limit_per_second: float = Field(
        default=100.0,
        ge=0,
        description="Requests per second each key may make (a token bucket, refilled at this rate), in all: each "
        "API process enforces its part, divided by the live replicas. 0 disables the limit.",
    )
    rate_limit_burst: int = Field(
        default=200, ge=1, description="Requests a key may make at once (the bucket's size), in all replicas."
    )
    ip_rate_limit_per_second: float = Field(
        default=20.0,
        ge=0,
        description="Requests per second per client address for what no key vouches for: the public routes "
        "(metrics, docs; never /healthz or /readyz) and requests whose key fails. A key this process does not "
        "hold is looked up only while its address has tokens left, so guessing keys costs the database "
        "nothing. 0 disables the limit.",
    )
    ip_rate_limit_burst: int = Field(
        default=100, ge=1, description="Such requests a client address may make at once to each process."
    )

    # ---- Fair sharing (service/api/fairness.py)
    org_share_seconds: float = Field(
        default=0.5,
        ge=0,
        le=64,
        description="Seconds of work (event-loop CPU, database time, reading bodies) per second an organization "
        "may use, in all replicas, while another organization within its share (or using less) is active; past "
        "it (and its burst) it is shed with 429 and Retry-After. Alone, an organization may use the whole "
        "machine. 0 turns cost shares off.",
    )
    org_share_burst: float = Field(
        default=2.0, ge=0, le=600, description="Seconds of work an organization may use at once beyond its share."
    )
    org_concurrency: int = Field(
        default=4,
        ge=1,
        le=1000,
        description="Requests one organization may have in progress in each API process while a lighter one is "
        "active (beyond: 429), bounding the work it can queue ahead of others.",
    )
    shed_delay: float = Field(
        default=1.0,
        ge=0,
        le=30,
        description="Seconds a shed request (rate limit, cost share, failed key) is held before its 429 goes out, "
        "so that a client retrying at once cannot turn cheap refusals into a flood.",
    )
    api_heartbeat_seconds: float = Field(
        default=1.0,
        ge=0,
        le=60,
        description="Seconds between an API process's heartbeats (a row in `api_replicas`): the per-key rate and "
        "the organizations' shares are divided by the number of live replicas. 0: no heartbeat, and the "
        "process's limits are its own (one replica).",
    )

    # ---- Request bounds
    max_body_bytes: int = Field(default=1_048_576, description="Bytes a `POST /v1/events` body may hold (413 beyond).")
    max_events_per_request: int = Field(
        default=1000, description="Events one `POST /v1/events` may carry (413 beyond)."
    )

    # ---- Operations
    migrations_dir: Path = Field(
        default=DEFAULT_MIGRATIONS_DIR,
        description="Where `tally migrate` reads its SQL files (default: `migrations/` of the source checkout, "
        "which the Docker image installs in place).",
    )
    log_level: str = Field(default="INFO", description="`DEBUG`, `INFO`, `WARNING` or `ERROR`.")
    log_format: Literal["json", "text", "auto"] = Field(
        default="auto",
        description="`json` (one object per line), `text` (for people), or `auto`: text on a terminal, JSON otherwise.",
    )

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
