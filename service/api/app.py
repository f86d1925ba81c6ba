"""The API application factory: no I/O here; resources open in cleanup contexts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

from aiohttp import web

from service import __version__
from service.api import (
    appkeys,
    changefeed,
    changewatch,
    customers,
    dbaccess,
    events,
    export,
    fairness,
    keycache,
    openapi,
    ops,
    routing,
    usage,
    webhooks,
)
from service.api.changewatch import ChangeWatch, StreamSlots
from service.api.compat import flexprice, public, respan, v0
from service.api.dbaccess import DatabaseGate
from service.api.fairness import CpuSlot, LoopLag, OrgShares, Replicas, Tarpit
from service.api.keycache import KeyCache
from service.api.models import Health
from service.api.ratelimit import RateLimiter
from service.api.readcache import ReadCache
from service.api.routing import OPERATIONS_TAG, Endpoint, add_endpoints, plain
from service.domain.listing import CursorCodec
from service.infra.broker import Names
from service.infra.migrate import NotMigrated
from service.infra.publisher import Publisher
from service.infra.settings import Settings
from service.infra.standby import standby_context
from service.web import health
from service.web.app import base_app
from service.web.observability import metrics_endpoint

log = logging.getLogger("tally.api")

TAGS = {
    customers.TAG: "tally's own customer API: list (paged, sorted, filtered), retrieve, create, update, delete, "
    "usage series.",
    webhooks.TAG: "Signed outbound webhooks (the admin scope): endpoints, their secrets, the delivery log and "
    "redelivery.",
    events.TAG: "Publish usage and customer events (CloudEvents 1.0); tally folds each exactly once.",
    respan.TAG: "For clients of Respan's users API (Respan's API reference, Users): change only the base URL to "
    "<this server>/compat/respan.",
    v0.TAG: "For clients of Devdraft's customers API (https://docs.devdraft.ai/developers/customers/list-customers): "
    "base URL <this server>/compat/v0; authenticate with the x-client-key and x-client-secret headers.",
    flexprice.TAG: "For clients of Flexprice's customers API (Flexprice's API reference, Customers): change only the "
    "base URL to <this server>/compat/flexprice.",
    public.TAG: "For clients of SnapRefund's customers API (https://snaprefund.readme.io/docs/get-customers): base "
    "URL <this server>/compat/public.",
    OPERATIONS_TAG: "Health, readiness, metrics, queue statistics and this API description.",
}

OPERATIONS = [
    Endpoint(
        "GET",
        "/healthz",
        plain(health.healthz),
        "Process is alive",
        OPERATIONS_TAG,
        response=Health,
        address_limited=False,
    ),
    Endpoint(
        "GET",
        "/readyz",
        plain(health.readyz),
        "Database and broker reachable ('degraded' with 200 when only the read standby is not)",
        OPERATIONS_TAG,
        response=Health,
        errors=(503,),
        address_limited=False,
    ),
    Endpoint(
        "GET", "/metrics", plain(metrics_endpoint), "Prometheus metrics", OPERATIONS_TAG, content_type="text/plain"
    ),
]
DOCS = [
    Endpoint("GET", "/openapi.json", openapi.openapi_json, "This document", OPERATIONS_TAG),
    Endpoint("GET", "/docs", openapi.docs_page, "Interactive API docs", OPERATIONS_TAG, content_type="text/html"),
]

# Every route the API serves, as declared: the route table and the OpenAPI document alike.
ENDPOINTS = [
    *OPERATIONS,
    *ops.ENDPOINTS,
    *changefeed.ENDPOINTS,
    *export.ENDPOINTS,
    *customers.ENDPOINTS,
    *usage.ENDPOINTS,
    *events.ENDPOINTS,
    *webhooks.ENDPOINTS,
    *respan.ENDPOINTS,
    *v0.ENDPOINTS,
    *flexprice.ENDPOINTS,
    *public.ENDPOINTS,
    *DOCS,
]

SELECT_CURSOR_SECRET = "SELECT value FROM instance_secrets WHERE name = 'cursor_hmac'"


async def api_resources(app: web.Application) -> AsyncIterator[None]:
    """The read standby (if configured, with its health checks), the cursor key and the live keys."""
    settings = app[appkeys.SETTINGS]
    pool = app[appkeys.POOL]
    async with AsyncExitStack() as stack:
        if settings.database_read_url:
            app[dbaccess.STANDBY] = await stack.enter_async_context(
                standby_context(settings, settings.database_read_url)
            )
        secret = await pool.fetchval(SELECT_CURSOR_SECRET)
        if secret is None:
            raise NotMigrated("the database is not migrated: run 'tally migrate' first")
        app[appkeys.CURSORS] = CursorCodec(secret)
        app[appkeys.KEY_CACHE] = await stack.enter_async_context(
            keycache.listening(
                KeyCache(settings.auth_cache_seconds), settings.database_url, settings.db_connect_timeout
            )
        )
        await stack.enter_async_context(
            changewatch.listening(settings.database_url, settings.db_connect_timeout, app[appkeys.CHANGE_WATCH])
        )
        await stack.enter_async_context(
            fairness.running_heartbeat(app[appkeys.REPLICAS], pool, settings.api_heartbeat_seconds)
        )
        lag = asyncio.create_task(app[routing.LOOP_LAG].run(), name="tally-loop-lag")
        try:
            yield
        finally:
            lag.cancel()
            await asyncio.gather(lag, return_exceptions=True)


async def publisher(app: web.Application) -> AsyncIterator[None]:
    """A lazily connecting publisher: the API starts and serves reads without the broker."""
    settings = app[appkeys.SETTINGS]
    app[appkeys.PUBLISHER] = Publisher(settings.amqp_url, Names(settings.amqp_namespace))
    yield
    await app[appkeys.PUBLISHER].close()


async def broker_check(app: web.Application) -> None:
    await app[appkeys.PUBLISHER].topology()


async def replica_check(app: web.Application) -> None:
    """The standby down degrades the API (reads go to the primary); it does not stop it."""
    standby = app.get(dbaccess.STANDBY)
    if standby is None or not standby.up:
        raise health.Degraded("standby unreachable: reads go to the primary")


async def end_streams(app: web.Application) -> None:
    """Live change streams end when shutdown begins (their clients resume elsewhere), so that
    the drain waits only for requests that end by themselves."""
    app[appkeys.CHANGE_STREAMS].stopping.set()
    app[appkeys.CHANGE_WATCH].wake()  # the streams waiting for a commit see it now


def create_app(settings: Settings) -> web.Application:
    """The HTTP API; no I/O until it starts."""
    # API statements stop in PostgreSQL too when the client gives up on them: a request shed
    # after TALLY_DB_COMMAND_TIMEOUT must not leave its query burning a backend.
    app = base_app(settings, statement_timeout=settings.db_command_timeout)
    replicas = app[appkeys.REPLICAS] = Replicas()
    app[appkeys.RATE_LIMITER] = RateLimiter(
        settings.rate_limit_per_second, settings.rate_limit_burst, replicas=replicas
    )
    app[routing.SHARES] = OrgShares(
        settings.org_share_seconds, settings.org_share_burst, replicas, concurrency=settings.org_concurrency
    )
    app[routing.TARPIT] = Tarpit(settings.shed_delay)
    app[routing.CPU_SLOT] = CpuSlot()
    app[routing.LOOP_LAG] = LoopLag()
    app[appkeys.IP_RATE_LIMITER] = RateLimiter(
        settings.ip_rate_limit_per_second, settings.ip_rate_limit_burst, policy="per-ip"
    )
    app[dbaccess.GATE] = DatabaseGate(settings.db_org_limit, settings.db_acquire_timeout)
    app[appkeys.CHANGE_WATCH] = ChangeWatch()
    app[appkeys.READ_CACHE] = ReadCache(settings.read_cache_mb * 2**20, settings.read_cache_entry_kb * 2**10)
    app[appkeys.CHANGE_STREAMS] = StreamSlots(settings.change_streams_per_key, changefeed.stream_reads(app))
    app.on_shutdown.append(end_streams)
    app.cleanup_ctx.append(api_resources)
    app.cleanup_ctx.append(publisher)
    app[appkeys.READINESS_CHECKS]["broker"] = broker_check
    if settings.database_read_url:
        app[appkeys.READINESS_CHECKS]["replica"] = replica_check
    app.on_response_prepare.append(dbaccess.consistency_header)
    add_endpoints(app, ENDPOINTS)
    app.router.add_get("/", openapi.root)
    app.router.add_static("/docs-assets", openapi.swagger_ui_static())
    app[appkeys.OPENAPI] = openapi.build_openapi(
        ENDPOINTS, title="tally", version=__version__, tags=TAGS, server=settings.public_url or "/"
    )
    return app
