"""Prometheus metrics, one registry per process, served at /metrics by the API and the
consumer alike.

A `tally consume` that folds with several processes (service/cli/processes.py) runs them in
prometheus_client's multiprocess mode: each process writes its values to files in the
directory PROMETHEUS_MULTIPROC_DIR names (set before this module is imported), and the one
that serves /metrics reads them all: counters and histograms summed, each gauge as its
``multiprocess_mode`` says (summed over the live processes, which for a gauge only one
process sets is its value; the broker's connection state, the minimum)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.domain.events import EVENT_TYPES, Rejection

REGISTRY = CollectorRegistry(auto_describe=True)
# Decided once, as prometheus_client decides it when first imported (values.get_value_class).
MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ
# Gauges that only one process sets (the API, or the consumer process that serves /metrics):
# summed, the others add their 0. (A "mostrecent" mode would drop a gauge no process has set
# yet from /metrics, and refuses inc().)
ONE_WRITER: Final = "livesum"

HTTP_REQUESTS = Counter(
    "tally_http_requests_total", "HTTP requests served.", ["route", "method", "status"], registry=REGISTRY
)
HTTP_LATENCY = Histogram(
    "tally_http_request_duration_seconds",
    "HTTP request latency.",
    ["route", "method"],
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
# What API requests cost, in seconds: event-loop CPU of their handlers and database connection
# time (the two parts of an organization's share, service/api/fairness.py).
REQUEST_COST = Counter(
    "tally_http_request_cost_seconds_total",
    "Work API requests took: 'loop' CPU, 'database' time.",
    ["part"],
    registry=REGISTRY,
)
API_REPLICAS = Gauge(
    "tally_api_replicas",
    "Live API processes this one divides its limits by.",
    registry=REGISTRY,
    multiprocess_mode=ONE_WRITER,
)
# Requests tally refused to protect itself or others, by a closed set of reasons:
# db_org_busy, db_pool_timeout (503: fair sharing of the database), ip_rate_limited (429:
# unauthenticated requests), key_rate_limited (429), org_share_used (429: an organization's
# share of the work), body_too_large (413 before reading), header_timeout (408), bad_request
# (malformed or oversized head).
HTTP_REFUSED = Counter(
    "tally_http_refused_total", "Requests refused to protect the service, by reason.", ["reason"], registry=REGISTRY
)
EVENTS = Counter(
    "tally_events_total",
    "Events seen by the consumer, by type and outcome (applied, duplicate, stale, rejected, invalid).",
    ["type", "outcome"],
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    "tally_dead_letters_total",
    "Messages or events the consumer dead-lettered, by reason.",
    ["reason"],
    registry=REGISTRY,
)

# Label values come from closed sets, never from a message: every distinct label value is a
# new time series kept for the life of the process, so a label copied from an untrusted
# event (a `type` of 300 random bytes, a new one per event) would grow memory and every
# scrape without bound.
EVENT_TYPE_LABELS = frozenset(EVENT_TYPES)
OTHER_TYPE = "other"
# The codes of tally_dead_letters_total{reason}: the closed set of rejection codes.
DEAD_LETTER_REASONS = tuple(code.value for code in Rejection)


def event_type_label(value: object) -> str:
    """The `type` label for an event: one of the known event types, else ``other``."""
    return value if isinstance(value, str) and value in EVENT_TYPE_LABELS else OTHER_TYPE


BATCH_SIZE = Histogram(
    "tally_batch_events",
    "Events per folded batch.",
    registry=REGISTRY,
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
)
BATCH_SECONDS = Histogram(
    "tally_batch_apply_seconds",
    "Time to fold and commit one batch.",
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
EVENT_LAG = Histogram(
    "tally_event_lag_seconds",
    "Apply time minus event time, per applied event.",
    registry=REGISTRY,
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400),
)
IN_FLIGHT = Gauge(
    "tally_messages_in_flight", "Messages received and not yet acked.", registry=REGISTRY, multiprocess_mode="livesum"
)
BROKER_CONNECTED = Gauge(
    "tally_broker_connected",
    "1 while connected to RabbitMQ (every folding process of a `tally consume`).",
    registry=REGISTRY,
    multiprocess_mode="livemin",
)
BROKER_RECONNECTS = Counter("tally_broker_reconnects_total", "Reconnections to RabbitMQ.", registry=REGISTRY)
DB_POOL_IN_USE = Gauge(
    "tally_db_pool_in_use", "Database connections checked out.", registry=REGISTRY, multiprocess_mode="livesum"
)
DB_POOL_SIZE = Gauge("tally_db_pool_size", "Database connections open.", registry=REGISTRY, multiprocess_mode="livesum")
QUEUE_MESSAGES = Gauge(
    "tally_queue_messages",
    "Messages ready in a queue (polled by the consumer).",
    ["queue"],
    registry=REGISTRY,
    multiprocess_mode=ONE_WRITER,
)
QUEUE_CONSUMERS = Gauge(
    "tally_queue_consumers",
    "Consumers on a queue (polled by the consumer).",
    ["queue"],
    registry=REGISTRY,
    multiprocess_mode=ONE_WRITER,
)
# Webhooks (consumers/webhooks.py). Outcomes: delivered (a 2xx), retry (a failed attempt that
# will be retried), failed (the last attempt of a delivery whose retry period is over),
# refused (the address is not public, so nothing was sent; retried like any failure).
WEBHOOK_DELIVERIES = Counter(
    "tally_webhook_deliveries_total",
    "Webhook delivery attempts, by outcome: delivered, retry, failed, refused.",
    ["outcome"],
    registry=REGISTRY,
)
WEBHOOK_YIELDING = Gauge(
    "tally_webhook_yielding",
    "1 while this process's webhook dispatcher yields to a fold with a backlog (TALLY_WEBHOOK_YIELD_RATE), else 0.",
    registry=REGISTRY,
    multiprocess_mode=ONE_WRITER,
)
WEBHOOK_OLDEST_PENDING = Gauge(
    "tally_webhook_oldest_pending_seconds",
    "Age of the oldest pending webhook delivery of an enabled endpoint (0 when none; every consumer exports it).",
    registry=REGISTRY,
    multiprocess_mode=ONE_WRITER,
)
WEBHOOK_ENDPOINTS_DISABLED = Gauge(
    "tally_webhook_endpoints_disabled",
    "Webhook endpoints disabled after failing continuously (every consumer exports it).",
    registry=REGISTRY,
    multiprocess_mode=ONE_WRITER,
)
WEBHOOK_DISABLED = Counter(
    "tally_webhook_disabled_total", "Webhook endpoints this process disabled.", registry=REGISTRY
)
REPLICA_UP = Gauge(
    "tally_db_replica_up",
    "1 while the read standby answers (reads go to it), else 0.",
    registry=REGISTRY,
    multiprocess_mode=ONE_WRITER,
)
REPLICA_LAG = Gauge(
    "tally_db_replica_lag_seconds",
    "Age of the last transaction the standby replayed while it has more to replay (0 when caught up).",
    registry=REGISTRY,
    multiprocess_mode=ONE_WRITER,
)
REPLICA_FALLBACKS = Counter(
    "tally_db_replica_fallbacks_total",
    "Reads served by the primary although a standby is configured: 'down' (standby unreachable), "
    "'behind' (it had not replayed the read's consistency token in time).",
    ["reason"],
    registry=REGISTRY,
)
READ_CACHE = Counter(
    "tally_read_cache_total",
    "Cacheable reads by outcome: 'hit' (served from memory), 'shared' (answered by the same read, under way for "
    "another request), 'miss' (read and kept), 'uncacheable' (read, not kept: too large, or a standby behind the "
    "last change heard), 'bypass' (read: a consistency token, or no change listener).",
    ["outcome"],
    registry=REGISTRY,
)
READ_CACHE_BYTES = Gauge(
    "tally_read_cache_bytes",
    "Bytes of responses held by the read cache.",
    registry=REGISTRY,
    multiprocess_mode=ONE_WRITER,
)
CHANGE_LISTENER_UP = Gauge(
    "tally_change_listener_up",
    "1 while the API process listens for commits (its read cache works), else 0.",
    registry=REGISTRY,
    multiprocess_mode=ONE_WRITER,
)
CHANGE_STREAMS_OPEN = Gauge(
    "tally_change_streams_open",
    "Change feed event streams open on this API process.",
    registry=REGISTRY,
    multiprocess_mode=ONE_WRITER,
)
CHANGE_STREAMS_ENDED = Counter(
    "tally_change_streams_ended_total",
    "Change feed event streams ended, by reason: 'client' (it went away), 'resync' (its position was older than the "
    "change log keeps), 'slow' (it did not take what was sent in time: sent resync and dropped), 'shutdown', "
    "'error' (the database failed under it).",
    ["reason"],
    registry=REGISTRY,
)
CHANGE_STREAMS_REFUSED = Counter(
    "tally_change_streams_refused_total",
    "Change feed event streams refused because their key held TALLY_CHANGE_STREAMS_PER_KEY already.",
    registry=REGISTRY,
)
CHANGE_FEED_LAG = Histogram(
    "tally_change_feed_lag_seconds",
    "From a change's changed_at (logged just before its commit) to its event being sent on a stream: "
    "commit, notification and read together.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
DB_RETRIES = Counter("tally_db_retries_total", "Batches retried after a transient database error.", registry=REGISTRY)
PUBLISHED = Counter(
    "tally_events_published_total",
    "Events accepted by POST /v1/events and confirmed by the broker.",
    registry=REGISTRY,
)


# Gauges read from a function when sampled: in multiprocess mode, values live in files, so
# each process writes them at every refresh() (the serving one on every scrape, the others
# every second) instead of the collector calling the function.
_SAMPLED: list[tuple[Gauge, Callable[[], float]]] = []


def sample(gauge: Gauge, read: Callable[[], float]) -> None:
    """``gauge`` reads ``read()``: when scraped, or (multiprocess) at every :func:`refresh`."""
    if MULTIPROCESS:
        _SAMPLED.append((gauge, read))
    else:
        gauge.set_function(read)


def sample_pool(pool: Any) -> None:
    """The pool gauges read from ``pool`` (an asyncpg pool)."""
    sample(DB_POOL_IN_USE, lambda: pool.get_size() - pool.get_idle_size())
    sample(DB_POOL_SIZE, pool.get_size)


def refresh() -> None:
    for gauge, read in _SAMPLED:
        gauge.set(read())


def render() -> tuple[bytes, str]:
    if not MULTIPROCESS:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    refresh()
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
    return generate_latest(merged), CONTENT_TYPE_LATEST
