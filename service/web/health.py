"""Liveness and readiness."""

from __future__ import annotations

import asyncio

from aiohttp import web

from service.web.appkeys import POOL, READINESS_CHECKS
from service.web.problems import Problem, json_response

# A readiness probe must answer fast even when a dependency hangs.
CHECK_TIMEOUT = 2.0


class Degraded(Exception):
    """Raised by a readiness check whose dependency is optional: the process serves without it."""


async def database_check(app: web.Application) -> None:
    await app[POOL].fetchval("SELECT 1", timeout=CHECK_TIMEOUT)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    results: dict[str, str] = {}
    for name, check in request.app[READINESS_CHECKS].items():
        try:
            await asyncio.wait_for(check(request.app), CHECK_TIMEOUT)
            results[name] = "ok"
        except Degraded as exc:
            results[name] = f"degraded: {exc}"
        except Exception as exc:  # any failure means "not ready"; the reason goes in the body
            results[name] = f"down: {type(exc).__name__}"
    down = [name for name, state in results.items() if state.startswith("down")]
    if not down:
        degraded = any(state != "ok" for state in results.values())
        return json_response({"status": "degraded" if degraded else "ok", "checks": results})
    return Problem(
        503,
        "Service Unavailable",
        f"not ready: {', '.join(down)} unreachable",
        slug="unavailable",
        headers={"Retry-After": "1"},
        extra={"checks": results},
    ).response(request)
