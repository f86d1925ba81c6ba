"""Endpoints declared once: the route table, the auth guard and the OpenAPI document all
come from the same :class:`Endpoint` list."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from aiohttp import web
from pydantic import BaseModel

from service.api import appkeys
from service.auth import Principal, authenticate, split_bearer
from service.errors import RateLimited, TallyError, Unauthenticated

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PRINCIPAL = web.RequestKey("principal", Principal)


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    scope: str | None = None  # None: public (health, docs)
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    errors: tuple[int, ...] = ()
    path_params: dict[str, str] = field(default_factory=dict)
    query_aliases: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    description: str = ""
    # Regular expressions for path variables where the default [^/]+ would be ambiguous.
    path_patterns: dict[str, str] = field(default_factory=dict)

    @property
    def route_path(self) -> str:
        path = self.path
        for name, pattern in self.path_patterns.items():
            path = path.replace("{" + name + "}", "{" + name + ":" + pattern + "}")
        return path


async def principal_for(request: web.Request) -> Principal:
    """Resolve the caller from ``Authorization: Bearer <key>`` or the header pair
    ``x-client-key`` + ``x-client-secret``; Unauthenticated otherwise."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("Authorization must be 'Bearer <key>'")
        client_key, secret = split_bearer(token.strip())
    elif "x-client-key" in request.headers:
        client_key = request.headers["x-client-key"]
        secret = request.headers.get("x-client-secret", "")
        if not secret:
            raise Unauthenticated("x-client-key needs its x-client-secret")
    else:
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
    cache = request.app[appkeys.KEY_CACHE]
    principal = cache.get(client_key, secret)
    if principal is None:
        async with request.app[appkeys.POOL].acquire() as conn:
            principal = await authenticate(conn, client_key, secret)
        cache.put(client_key, secret, principal)
    return principal


def _guarded(endpoint: Endpoint) -> Handler:
    if endpoint.scope is None:
        return endpoint.handler
    scope = endpoint.scope

    async def handler(request: web.Request) -> web.StreamResponse:
        principal = await principal_for(request)
        limiter = request.app[appkeys.RATE_LIMITER]
        if not limiter.enabled:
            principal.require(scope)
            request[PRINCIPAL] = principal
            return await endpoint.handler(request)
        decision = limiter.take(principal.client_key)
        headers = limiter.headers(decision)
        if not decision.allowed:
            raise RateLimited(
                f"rate limit of {limiter.burst} requests per {limiter.window} s for this key exceeded; "
                f"retry in {decision.retry_after} s",
                headers={**headers, "Retry-After": str(decision.retry_after)},
            )
        try:
            principal.require(scope)
            request[PRINCIPAL] = principal
            response = await endpoint.handler(request)
        except TallyError as exc:
            exc.headers = {**headers, **exc.headers}
            raise
        response.headers.update(headers)
        return response

    handler.__name__ = endpoint.handler.__name__
    return handler


def add_endpoints(app: web.Application, endpoints: Sequence[Endpoint], prefix: str = "") -> None:
    for endpoint in endpoints:
        app.router.add_route(endpoint.method, prefix + endpoint.route_path, _guarded(endpoint))
