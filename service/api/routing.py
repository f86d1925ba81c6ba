"""Endpoints declared once: the route table, the auth guard, the parsing of query and body,
and the OpenAPI document all come from the same :class:`Endpoint` list. A handler is given a
:class:`Call`: the caller's principal, and the query and body already validated into the
models its Endpoint declares, so what the document says a route takes is what it takes."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from service.api import appkeys, dbaccess, readcache
from service.api.errors import from_domain, payload_too_large, rate_limited
from service.api.fairness import CostMeter, CpuSlot, LoopLag, OrgShares, Tarpit, metered
from service.api.links import link_base
from service.api.params import BODY_LIMIT, parse_body, parse_query, read_body
from service.api.ratelimit import Decision, RateLimiter
from service.domain.errors import DomainError, Unauthenticated
from service.domain.keys import Principal, split_bearer
from service.infra import metrics
from service.store.auth import authenticate
from service.web.problems import Problem

Q = TypeVar("Q")
B = TypeVar("B")
OPERATIONS_TAG = "Operations"
# What the request has cost so far (dbaccess adds database time to it).
COST = dbaccess.COST
SHARES = web.AppKey("org_shares", OrgShares)
TARPIT = web.AppKey("tarpit", Tarpit)
CPU_SLOT = web.AppKey("cpu_slot", CpuSlot)
LOOP_LAG = web.AppKey("loop_lag", LoopLag)
# Ends the request's charge to its organization's share (service/api/fairness.py) early; the
# guard calls it when the request ends, if the handler has not.
SETTLE: web.RequestKey[Callable[[], None]] = web.RequestKey("settle")
# The vendor header that carries a whole key on the routes that name it (Flexprice's SDKs send it).
API_KEY_HEADER = "x-api-key"


class NoQuery(BaseModel):
    """The query of a route that declares none: any parameter is unknown (a 400 naming it)."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Call(Generic[Q, B]):
    """What a route's handler is given: the request, and its query and body validated into
    the models the route's Endpoint declares (``NoQuery`` without a query model; None without
    a body model, or when an optional body was not sent; bytes for a body the handler checks
    itself)."""

    request: web.Request
    query: Q
    body: B
    caller: Principal | None = None  # None on public routes only

    @property
    def principal(self) -> Principal:
        """The caller's principal: every route with a scope has one (checked before its handler runs)."""
        assert self.caller is not None, "a public route has no principal"
        return self.caller


# A handler as an Endpoint declares it, and a route as aiohttp calls it.
Handler = Callable[[Call[Any, Any]], Awaitable[web.StreamResponse]]
Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


def plain(handler: Route) -> Handler:
    """An aiohttp handler as an Endpoint's (health and metrics: the consumer's app serves them
    too, without Endpoints); its name, and so its operationId, stays its own."""

    @functools.wraps(handler)
    async def on_call(call: Call[NoQuery, None]) -> web.StreamResponse:
        return await handler(call.request)

    return on_call


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    scope: str | None = None  # None: public (health, docs)
    # The query's model (None: the route takes no query parameters, and refuses any).
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    # Errors beyond those every route like this one can answer (service/api/openapi.py
    # _answers): a create's 409, a 404 for a customer the query names.
    errors: tuple[int, ...] = ()
    path_params: dict[str, str] = field(default_factory=dict)
    query_aliases: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    # Other media types the route answers with (an export's CSV beside its NDJSON).
    other_content_types: tuple[str, ...] = ()
    description: str = ""
    # Regular expressions for path variables where the default [^/]+ would be ambiguous.
    path_patterns: dict[str, str] = field(default_factory=dict)
    # A header that carries the whole API key on this route as well (a vendor SDK's own way:
    # FlexPrice's sends x-api-key), when no Authorization header is sent.
    api_key_header: str | None = None
    # False: the body may be left out (the handler is then given None).
    body_required: bool = True
    # True: the handler checks the body itself and is given its bytes (the body model only
    # documents it): POST /v1/events checks events with the consumer's own rules, in slices.
    raw_body: bool = False
    # False for liveness and readiness: a probe must never be refused because others, from
    # the same address (a load balancer, an orchestrator's node), sent failed keys.
    address_limited: bool = True
    # The largest body the route takes, in bytes (None: TALLY_MAX_BODY_BYTES). A declared
    # length over it is refused before the body is read, so that a body can cost at most
    # what its route needs (a list filter needs kilobytes, not a megabyte).
    max_body: int | None = None
    # A read whose response depends only on the organization's and environment's customers
    # (and the request's URL): answered from the read cache while nothing it shows can have
    # changed, with an ETag and 304 for If-None-Match (service/api/readcache.py).
    cached: bool = False
    # The OpenAPI operationId; by default the handler's module and name (customers_customer_usage).
    # A route served by a generic handler (one list handler serves every dialect) names its own.
    operation_id: str = ""
    # The route also answers Accept: text/event-stream with a stream of events (the change feed).
    event_stream: bool = False

    @property
    def operation(self) -> str:
        if self.operation_id:
            return self.operation_id
        return f"{self.handler.__module__.rsplit('.', 1)[-1]}_{self.handler.__name__}"

    @property
    def route_path(self) -> str:
        path = self.path
        for name, pattern in self.path_patterns.items():
            path = path.replace("{" + name + "}", "{" + name + ":" + pattern + "}")
        return path


def credentials(request: web.Request, api_key_header: str | None = None) -> tuple[str, str]:
    """``(client_key, secret)`` from ``Authorization: Bearer <key>``, the header pair
    ``x-client-key`` + ``x-client-secret``, or (where the route names one) ``api_key_header``
    holding the key; Unauthenticated if missing or malformed."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("Authorization must be 'Bearer <key>'")
        client_key, secret = split_bearer(token.strip())
    elif api_key_header is not None and api_key_header in request.headers:
        token = request.headers[api_key_header].strip()
        if not token:
            raise Unauthenticated(f"{api_key_header} is empty")
        client_key, secret = split_bearer(token)
    elif "x-client-key" in request.headers:
        client_key = request.headers["x-client-key"]
        secret = request.headers.get("x-client-secret", "")
        if not secret:
            raise Unauthenticated("x-client-key needs its x-client-secret")
    else:
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
    # Keys are printable ASCII. aiohttp decodes header bytes that are not UTF-8 as lone
    # surrogates, which no hash can encode: refuse them here, as the malformed keys they are.
    if not _printable_ascii(client_key) or not _printable_ascii(secret):
        raise Unauthenticated("malformed API key")
    return client_key, secret


def _printable_ascii(text: str) -> bool:
    return text.isascii() and text.isprintable()


async def principal_for(request: web.Request, api_key_header: str | None = None) -> Principal:
    """The caller's principal: from the live keys this process holds, else from the database.
    Unauthenticated for a missing, malformed, unknown or revoked key; a held key with a wrong
    secret is refused without a lookup. RateLimited (before any database lookup) when a key
    the process does not hold comes from an address with no unauthenticated-request tokens
    left: a flood of failed keys costs the database nothing, and never delays a held key."""
    client_key, secret = credentials(request, api_key_header)
    cache = request.app[appkeys.KEY_CACHE]
    principal = cache.get(client_key, secret)
    if principal is None and cache.holds(client_key):
        raise Unauthenticated("invalid or revoked API key")
    if principal is None:
        limiter = request.app[appkeys.IP_RATE_LIMITER]
        if limiter.enabled:
            decision = limiter.peek(client_address(request))
            if not decision.allowed:
                raise await _ip_limited(request, limiter, decision)
        # Noted before the lookup: if a revocation's notification is handled while the
        # lookup runs, put() declines to cache what may have been read before it committed.
        generation = cache.generation
        async with dbaccess.connection(request) as conn:
            principal = await authenticate(conn, client_key, secret)
        cache.put(client_key, secret, principal, generation)
    return principal


def client_address(request: web.Request) -> str:
    """The peer's address (behind a reverse proxy, the proxy's: X-Forwarded-For is not trusted)."""
    return request.remote or "unknown"


async def _charge_unauthenticated(request: web.Request) -> None:
    """Spend a token of the client address's unauthenticated bucket; RateLimited (after the
    shed delay) if none is left."""
    limiter = request.app[appkeys.IP_RATE_LIMITER]
    if not limiter.enabled:
        return
    decision = limiter.take(client_address(request))
    if not decision.allowed:
        raise await _ip_limited(request, limiter, decision)


async def _ip_limited(request: web.Request, limiter: RateLimiter, decision: Decision) -> Problem:
    metrics.HTTP_REFUSED.labels("ip_rate_limited").inc()
    await request.app[TARPIT].hold(decision.retry_after)
    return rate_limited(
        f"too many unauthenticated requests from this address (at most {limiter.burst} per {limiter.window} s); "
        f"retry in {decision.retry_after} s",
        {**limiter.headers(decision), "Retry-After": str(decision.retry_after)},
    )


# A refused request whose body is at least this large and unread closes its connection:
# aiohttp would otherwise read (and discard) all of it to keep the connection alive.
UNREAD_BODY_CLOSE = 65_536


def _unread_body(request: web.Request) -> bool:
    length = request.content_length
    return length is not None and length >= UNREAD_BODY_CLOSE and not request.content.is_eof()


def _check_body_size(request: web.Request, endpoint: Endpoint) -> None:
    """413 before a byte of the body is read when its declared length is over the route's
    bound (the connection then closes rather than drain the body)."""
    length = request.content_length
    if endpoint.max_body is not None and length is not None and length > endpoint.max_body:
        metrics.HTTP_REFUSED.labels("body_too_large").inc()
        raise payload_too_large(
            f"the body of {endpoint.method} {endpoint.path} is at most {endpoint.max_body} bytes", close=True
        )
    request[BODY_LIMIT] = endpoint.max_body or request.app[appkeys.SETTINGS].max_body_bytes


async def _call(request: web.Request, endpoint: Endpoint, principal: Principal | None) -> web.StreamResponse:
    """The endpoint's handler, given the query and the body its declaration names: a 400
    naming any parameter or field the models refuse, before the handler runs."""
    query = parse_query(request, endpoint.query or NoQuery, aliases=endpoint.query_aliases)
    body: object = None
    if endpoint.body is not None and (endpoint.body_required or request.can_read_body):
        body = await read_body(request) if endpoint.raw_body else await parse_body(request, endpoint.body)
    return await endpoint.handler(Call(request, query, body, principal))


async def _cached_call(request: web.Request, endpoint: Endpoint, principal: Principal) -> web.StreamResponse:
    """The endpoint's read through the read cache (service/api/readcache.py)."""
    watch = request.app[appkeys.CHANGE_WATCH]
    scope = (principal.organization_id, principal.environment)
    # Links in a response follow the request's Host (service/api/links.py client_link): a
    # response is the same only for the same URL and the same link base.
    key = f"{request.method} {request.path_qs} {link_base(request)}"

    def storable(version: tuple[int, int]) -> bool:
        # The primary: what it read is at least as new as the version the read began at. A
        # standby's read is not kept: its replay position is known only after the read, which
        # may have begun at an older one, and commits made while the listener reconnected are
        # never heard, so no version says how new a standby's data must be.
        return not request.get(dbaccess.FROM_STANDBY)

    async def read() -> web.StreamResponse:
        response = await _call(request, endpoint, principal)
        # The consistency token is set when the response is prepared; set it now so that a
        # cached copy carries it too (the data it names is the data the copy shows).
        await dbaccess.consistency_header(request, response)
        return response

    return await readcache.conditional(
        request,
        scope,
        key,
        request.app[appkeys.READ_CACHE],
        watch,
        read,
        bypass=dbaccess.CONSISTENCY_HEADER in request.headers,
        storable=storable,
    )


def _guarded(endpoint: Endpoint) -> Route:
    """The endpoint's handler behind its guards (unauthenticated-request limit for public
    routes; key, per-key rate limit and scope for the others), with the domain's errors
    turned into problems (an invalid field in the body if the body model has it)."""
    body_fields = frozenset(endpoint.body.model_fields) if endpoint.body else frozenset()

    async def public_handler(request: web.Request) -> web.StreamResponse:
        if endpoint.address_limited:
            await _charge_unauthenticated(request)
        try:
            return await _call(request, endpoint, None)
        except DomainError as exc:
            raise from_domain(exc, body_fields) from None

    async def handler(request: web.Request) -> web.StreamResponse:
        assert endpoint.scope is not None
        headers: dict[str, str] = {}
        try:
            try:
                principal = await principal_for(request, endpoint.api_key_header)
            except Unauthenticated:
                await _charge_unauthenticated(request)
                raise
            organization = principal.organization_id
            request[dbaccess.ORGANIZATION] = organization
            limiter = request.app[appkeys.RATE_LIMITER]
            if limiter.enabled:
                decision = limiter.take(principal.client_key)
                headers = limiter.headers(decision)
                if not decision.allowed:
                    metrics.HTTP_REFUSED.labels("key_rate_limited").inc()
                    await request.app[TARPIT].hold(decision.retry_after)
                    raise rate_limited(
                        f"rate limit of {limiter.burst} requests per {limiter.window} s for this key exceeded; "
                        f"retry in {decision.retry_after} s",
                        {**headers, "Retry-After": str(decision.retry_after)},
                    )
            principal.require(endpoint.scope)
            shares = request.app[SHARES]
            admission = shares.admit(organization, endpoint.path)
            if not admission.admitted:
                metrics.HTTP_REFUSED.labels("org_share_used").inc()
                await request.app[TARPIT].hold(admission.retry_after)
                raise rate_limited(
                    "this organization has used its share of the API's work (event-loop and database time) while "
                    f"others wait; retry in {admission.retry_after} s",
                    {**headers, "Retry-After": str(admission.retry_after)},
                )
            meter = request[COST] = CostMeter(request.app[LOOP_LAG], body_bytes=request.content_length or 0)
            settled = False

            def settle() -> None:
                nonlocal settled
                if not settled:
                    settled = True
                    shares.settle(organization, admission, meter.total)
                    metrics.REQUEST_COST.labels("loop").inc(meter.cpu)
                    metrics.REQUEST_COST.labels("database").inc(meter.db)

            request[SETTLE] = settle
            try:
                _check_body_size(request, endpoint)  # refused unread, and charged
                if endpoint.cached:
                    response = await metered(_cached_call(request, endpoint, principal), meter)
                else:
                    response = await metered(_call(request, endpoint, principal), meter)
                    # Only writes of customers (a vendor's POST list is a read; key and ops
                    # routes change no customer).
                    if endpoint.scope == "write" and request.method in dbaccess.WRITE_METHODS and response.status < 400:
                        # Its commit, before the answer: this process's next read sees it.
                        request.app[appkeys.CHANGE_WATCH].bump((organization, principal.environment))
            finally:
                settle()
        except DomainError as exc:
            problem = from_domain(exc, body_fields)
            problem.headers = {**headers, **problem.headers}
            problem.close = problem.close or _unread_body(request)
            raise problem from None
        except Problem as exc:
            exc.headers = {**headers, **exc.headers}
            exc.close = exc.close or _unread_body(request)
            raise
        response.headers.update(headers)
        return response

    chosen = handler if endpoint.scope is not None else public_handler
    chosen.__name__ = endpoint.operation
    return chosen


def settle_now(request: web.Request) -> None:
    """End the request's charge to its organization's share now: a long-lived response (an
    event stream) is charged for its opening like any request; what it costs afterwards is
    bounded by its own cap (streams per key), and charging hours of it at its end would shed
    the organization's next requests for the work of one that no longer runs."""
    request[SETTLE]()


def add_endpoints(app: web.Application, endpoints: Sequence[Endpoint], prefix: str = "") -> None:
    for endpoint in endpoints:
        app.router.add_route(endpoint.method, prefix + endpoint.route_path, _guarded(endpoint))
