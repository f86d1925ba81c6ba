"""The API application factory: no I/O here; resources open in cleanup contexts."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

from aiohttp import web

from consumers.broker import Names
from consumers.publisher import Publisher
from service import __version__, metrics
from service.api import appkeys, customers, events, health, keycache, openapi, ops
from service.api.compat import flexprice, public, respan, v0
from service.api.keycache import KeyCache
from service.api.ratelimit import RateLimiter
from service.api.models import Health
from service.api.observability import metrics_endpoint, metrics_middleware
from service.api.problems import problem_middleware, request_id_middleware
from service.api.routing import Endpoint, add_endpoints
from service.db import pool_context
from service.query import CursorCodec

log = logging.getLogger("tally.api")

TAGS = {
    "customers": "The canonical customer API.",
    "events": "Publishing events into tally.",
    respan.TAG: "Drop-in for Respan's users API (seeds 000, 001): base URL /compat/respan.",
    v0.TAG: "Drop-in for the v0 customers API (seed 002): base URL /compat/v0, x-client-key/x-client-secret.",
    flexprice.TAG: "Drop-in for Flexprice's customers API (seed 003): base URL /compat/flexprice.",
    public.TAG: "Drop-in for the public customers API (seed 004): base URL /compat/public.",
    "operations": "Health, readiness, metrics and the API description.",
}

OPERATIONS = [
    Endpoint("GET", "/healthz", health.healthz, "Process is alive", "operations", response=Health),
    Endpoint("GET", "/readyz", health.readyz, "Database and broker reachable", "operations",
             response=Health, errors=(503,)),
    Endpoint("GET", "/metrics", metrics_endpoint, "Prometheus metrics", "operations",
             content_type="text/plain"),
]  # fmt: skip
DOCS = [
    Endpoint("GET", "/openapi.json", openapi.openapi_json, "This document", "operations"),
    Endpoint("GET", "/docs", openapi.docs_page, "Browsable API docs", "operations", content_type="text/html"),
]  # fmt: skip

MAX_REQUEST_LINE = 1_048_576

SELECT_CURSOR_SECRET = "SELECT value FROM instance_secrets WHERE name = 'cursor_hmac'"


async def database(app: web.Application) -> AsyncIterator[None]:
    """The primary pool (and the read replica's, if configured) and the cursor key."""
    settings = app[appkeys.SETTINGS]
    async with AsyncExitStack() as stack:
        pool = await stack.enter_async_context(pool_context(settings.database_url, settings))
        app[appkeys.POOL] = pool
        if settings.database_read_url:
            app[appkeys.READ_POOL] = await stack.enter_async_context(
                pool_context(settings.database_read_url, settings, name="replica")
            )
        else:
            app[appkeys.READ_POOL] = pool
        secret = await pool.fetchval(SELECT_CURSOR_SECRET)
        if secret is None:
            raise RuntimeError("the database is not migrated: run 'tally migrate' first")
        app[appkeys.CURSORS] = CursorCodec(secret)
        app[appkeys.KEY_CACHE] = await stack.enter_async_context(
            keycache.listening(KeyCache(settings.auth_cache_seconds), settings.database_url, settings.db_connect_timeout)
        )
        metrics.DB_POOL_IN_USE.set_function(lambda: pool.get_size() - pool.get_idle_size())
        metrics.DB_POOL_SIZE.set_function(pool.get_size)
        yield


async def publisher(app: web.Application) -> AsyncIterator[None]:
    """A lazily connecting publisher: the API starts and serves reads without the broker."""
    settings = app[appkeys.SETTINGS]
    app[appkeys.PUBLISHER] = Publisher(settings.amqp_url, Names(settings.amqp_namespace))
    yield
    await app[appkeys.PUBLISHER].close()


async def broker_check(app: web.Application) -> None:
    await app[appkeys.PUBLISHER].topology()


def base_app(settings, endpoints: list[Endpoint]) -> web.Application:  # type: ignore[no-untyped-def]
    """An application with tally's middlewares, settings and database; no I/O yet."""
    app = web.Application(
        middlewares=[request_id_middleware, metrics_middleware, problem_middleware],
        client_max_size=settings.max_body_bytes,
        # Request lines up to 1 MiB (aiohttp's default is 8 KiB): the documented bounds of a list
        # filter (1000 identifiers of up to 255 characters, percent-encoded) must fit.
        handler_args={"max_line_size": MAX_REQUEST_LINE, "max_field_size": MAX_REQUEST_LINE},
    )
    app[appkeys.SETTINGS] = settings
    app[appkeys.RATE_LIMITER] = RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
    app[health.READINESS_CHECKS] = {"database": health.database_check}
    app.cleanup_ctx.append(database)
    add_endpoints(app, endpoints)
    return app


def create_app(settings) -> web.Application:  # type: ignore[no-untyped-def]
    endpoints = [
        *OPERATIONS, *ops.ENDPOINTS, *customers.ENDPOINTS, *events.ENDPOINTS,
        *respan.ENDPOINTS, *v0.ENDPOINTS, *flexprice.ENDPOINTS, *public.ENDPOINTS,
    ]  # fmt: skip
    app = base_app(settings, [*endpoints, *DOCS])
    app.cleanup_ctx.append(publisher)
    app[health.READINESS_CHECKS]["broker"] = broker_check
    app[appkeys.OPENAPI] = openapi.build_openapi([*endpoints, *DOCS], title="tally", version=__version__, tags=TAGS)
    return app
