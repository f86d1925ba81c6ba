"""The API application factory: no I/O here; resources open in cleanup contexts."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

from aiohttp import web

from service import __version__
from service.api import appkeys, customers, health, openapi
from service.api.models import Health
from service.api.problems import problem_middleware, request_id_middleware
from service.api.routing import Endpoint, add_endpoints
from service.db import pool_context
from service.query import CursorCodec
from service.settings import Settings

log = logging.getLogger("tally.api")

TAGS = {
    "customers": "The canonical customer API.",
    "operations": "Health, readiness and the API description.",
}

OPERATIONS = [
    Endpoint("GET", "/healthz", health.healthz, "Process is alive", "operations", response=Health),
    Endpoint("GET", "/readyz", health.readyz, "Database (and broker) reachable", "operations",
             response=Health, errors=(503,)),
    Endpoint("GET", "/openapi.json", openapi.openapi_json, "This document", "operations"),
    Endpoint("GET", "/docs", openapi.docs_page, "Browsable API docs", "operations", content_type="text/html"),
]  # fmt: skip

SELECT_CURSOR_SECRET = "SELECT value FROM instance_secrets WHERE name = 'cursor_hmac'"


async def database(app: web.Application) -> AsyncIterator[None]:
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
        yield


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[request_id_middleware, problem_middleware],
        client_max_size=settings.max_body_bytes,
    )
    app[appkeys.SETTINGS] = settings
    app[health.READINESS_CHECKS] = {"database": health.database_check}
    app.cleanup_ctx.append(database)
    endpoints = [*OPERATIONS, *customers.ENDPOINTS]
    add_endpoints(app, endpoints)
    app[appkeys.OPENAPI] = openapi.build_openapi(endpoints, title="tally", version=__version__, tags=TAGS)
    return app
