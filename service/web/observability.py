"""HTTP metrics middleware and the /metrics endpoint."""

from __future__ import annotations

import logging
import time

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import Counter, Histogram

from service.infra import metrics

access_log = logging.getLogger("tally.access")


# Each (route, method, status)'s counter and latency series, looked up once: ``labels()``
# validates its arguments and takes a lock on every call. Bounded as the label sets are
# (route templates, the methods the front door admits, statuses tally answers).
_series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}


def _series_of(route: str, method: str, status: int) -> tuple[Counter, Histogram]:
    series = _series.get((route, method, status))
    if series is None:
        series = _series[(route, method, status)] = (
            metrics.HTTP_REQUESTS.labels(route, method, str(status)),
            metrics.HTTP_LATENCY.labels(route, method),
        )
    return series


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        resource = request.match_info.route.resource
        # The route template, never the raw path: identifiers would explode the label set.
        route = resource.canonical if resource is not None else "unmatched"
        elapsed = time.perf_counter() - started
        requests, latency = _series_of(route, request.method, status)
        requests.inc()
        latency.observe(elapsed)
        if access_log.isEnabledFor(logging.INFO):
            # The path, never the query string or headers: those may carry secrets.
            access_log.info(
                "request",
                extra={
                    "method": request.method,
                    "path": request.path,
                    "route": route,
                    "status": status,
                    "ms": round(elapsed * 1000, 2),
                },
            )


async def metrics_endpoint(request: web.Request) -> web.Response:
    body, content_type = metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response
