"""The application base both processes build on (the API adds its routes and resources, the
consumer its consumer): middlewares, protocol limits, settings, the primary database pool,
and health, readiness and metrics. The factory does no I/O; the pool opens in a cleanup
context."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

from service.infra import metrics
from service.infra.db import pool_context
from service.infra.settings import Settings
from service.web import health, server
from service.web.appkeys import POOL, READINESS_CHECKS, SETTINGS, ReadinessCheck
from service.web.observability import metrics_endpoint, metrics_middleware
from service.web.problems import problem_middleware, request_id_middleware


def primary_pool(statement_timeout: float | None) -> Callable[[web.Application], AsyncIterator[None]]:
    """The cleanup context of the primary pool; ``statement_timeout`` (seconds) is set on
    its sessions if given, so PostgreSQL itself stops a statement the client gave up on."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        async with pool_context(settings.database_url, settings, statement_timeout=statement_timeout) as pool:
            app[POOL] = pool
            metrics.sample_pool(pool)
            yield

    return context


def base_app(settings: Settings, *, statement_timeout: float | None = None) -> web.Application:
    """An application with tally's middlewares, protocol limits, settings and primary pool,
    whose readiness checks the database; no routes, no I/O yet."""
    app = web.Application(
        middlewares=[request_id_middleware, metrics_middleware, problem_middleware],
        client_max_size=settings.max_body_bytes,
        # Request line, header and keep-alive limits (service/web/server.py says why each).
        handler_args=server.handler_args(settings),
    )
    app[SETTINGS] = settings
    checks: dict[str, ReadinessCheck] = {"database": health.database_check}
    app[READINESS_CHECKS] = checks
    app.cleanup_ctx.append(primary_pool(statement_timeout))
    return app


def add_operations(app: web.Application) -> None:
    """``/healthz``, ``/readyz`` and ``/metrics`` without authentication (the API declares
    the same handlers as documented endpoints instead)."""
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/metrics", metrics_endpoint)
