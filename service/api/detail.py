"""The single-customer routes of every dialect (tally's own, Respan's, Flexprice's), served by
one set of handlers: retrieve, create, update and delete. A :class:`CustomerAdapter` says what
a dialect means: which customer a request names, how the customer is shown, what a body
writes. Writes go to the primary, each in one transaction that also finds the customer (by
its identifier or its uuid), so what a write acts on cannot change under it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypedDict, TypeVar
from urllib.parse import quote
from uuid import UUID

from aiohttp import web
from yarl import URL

from service.api import dbaccess
from service.api.links import client_link
from service.api.listing import AS_OF_HEADER, JSON, key_environment, run_list
from service.api.routing import Call
from service.domain.errors import NotFound
from service.domain.keys import as_uuid
from service.domain.listing import CustomerFilter, ListQuery
from service.store import customers as core
from service.store.rendering import Shape
from service.web.problems import REQUEST_ID

Q = TypeVar("Q")


class WriteStamp(TypedDict):
    at: datetime
    request_id: str | None


def write_stamp(request: web.Request) -> WriteStamp:
    """An API write is a change at the time of its request (ties broken by its request id),
    ordered against events by the same rules (service/store/fold.py)."""
    return {"at": datetime.now(UTC), "request_id": request.get(REQUEST_ID)}


def _same(identifier: str) -> None:
    """Any customer found is the one meant (a request that names it once)."""


@dataclass(frozen=True)
class ByIdentifier:
    """A customer a request names by the client's identifier."""

    identifier: str
    # Given the identifier before an update writes; raises if the request named another
    # customer elsewhere (Flexprice's PUT may name it twice, and its body names it too).
    check: Callable[[str], None] = _same


@dataclass(frozen=True)
class ById:
    """A customer a request names by tally's uuid, as the client wrote it (text that is no
    uuid names no customer)."""

    id: str
    # Given the customer's identifier once an update finds it, under its row lock.
    check: Callable[[str], None] = _same


Named = ByIdentifier | ById


def in_path(variable: str, *, by_id: bool = False) -> Callable[[Call[Any, Any]], Named]:
    """The customer the path variable names: by its identifier (or, ``by_id``, its uuid)."""

    def named(call: Call[Any, Any]) -> Named:
        text = call.request.match_info[variable]
        return ById(text) if by_id else ByIdentifier(text)

    return named


@dataclass(frozen=True)
class NewCustomer:
    """What a create body asks for: the identifier, the environment it names (None: the
    key's) and the writable columns it sets."""

    identifier: str
    values: dict[str, object]
    environment: str | None = None


@dataclass(frozen=True)
class CustomerAdapter(Generic[Q]):
    """One dialect's single-customer routes, as data for the handlers below."""

    # How a read shows the customer (its query may expand it), and how a write's response does.
    shape: Callable[[Q], Shape]
    written: Shape
    named: Callable[[Call[Any, Any]], Named] = in_path("customer_identifier")
    # An update body as tally's writable columns (only the fields sent), and a create body.
    columns: Callable[[Any], dict[str, object]] | None = None
    new: Callable[[Any], NewCustomer] | None = None
    # A created customer's Location: this path, then its identifier as one segment.
    location: str | None = None

    async def retrieve(self, call: Call[Q, None]) -> web.Response:
        named, principal = self.named(call), call.principal
        environment = key_environment(principal, call.query)
        shape = self.shape(call.query)
        if isinstance(named, ById):
            doc, as_of = await _by_id(call, environment, named.id, shape)
        else:
            async with dbaccess.connection(call.request, read=True) as conn:
                doc, as_of = await core.read_customer(
                    conn, principal.organization_id, environment, named.identifier, shape
                )
        return web.Response(text=doc, content_type=JSON, headers={AS_OF_HEADER: as_of})

    async def create(self, call: Call[Any, Any]) -> web.Response:
        assert self.new is not None, "a create route's adapter says what its body creates"
        new = self.new(call.body)
        principal = call.principal
        environment = principal.environment_for(new.environment)
        async with dbaccess.connection(call.request) as conn:
            doc = await core.create_customer(
                conn,
                principal.organization_id,
                environment,
                new.identifier,
                new.values,
                self.written,
                **write_stamp(call.request),
            )
        headers = {}
        if self.location is not None:
            # The identifier is one path segment whatever it contains ('/', '?', '#', '%').
            target = URL(self.location + quote(new.identifier, safe=""), encoded=True)
            headers["Location"] = client_link(call.request, target)
        return web.Response(text=doc, status=201, content_type=JSON, headers=headers)

    async def update(self, call: Call[Q, Any]) -> web.Response:
        assert self.columns is not None, "an update route's adapter says what its body writes"
        named, principal = self.named(call), call.principal
        organization, environment = principal.organization_id, key_environment(principal, call.query)
        values = self.columns(call.body)
        if isinstance(named, ById):
            # Found on the primary, in the write's own transaction (never on a standby that
            # may lag, nor in a statement of its own that another write could follow).
            customer_id = _uuid(named, environment)
            async with dbaccess.connection(call.request) as conn:
                doc = await core.update_customer_by_id(
                    conn,
                    organization,
                    environment,
                    customer_id,
                    values,
                    self.written,
                    check=named.check,
                    **write_stamp(call.request),
                )
        else:
            named.check(named.identifier)
            async with dbaccess.connection(call.request) as conn:
                doc = await core.update_customer(
                    conn, organization, environment, named.identifier, values, self.written, **write_stamp(call.request)
                )
        return web.Response(text=doc, content_type=JSON)

    async def delete(self, call: Call[Q, None]) -> web.Response:
        named, principal = self.named(call), call.principal
        organization, environment = principal.organization_id, key_environment(principal, call.query)
        if isinstance(named, ById):
            customer_id = _uuid(named, environment)
            async with dbaccess.connection(call.request) as conn:
                await core.delete_customer_by_id(
                    conn, organization, environment, customer_id, **write_stamp(call.request)
                )
        else:
            async with dbaccess.connection(call.request) as conn:
                await core.delete_customer(
                    conn, organization, environment, named.identifier, **write_stamp(call.request)
                )
        return web.Response(status=204)


def _uuid(named: ById, environment: str) -> UUID:
    """The uuid a request names; NotFound for text that is none (no customer has it)."""
    customer_id = as_uuid(named.id)
    if customer_id is None:
        raise NotFound(f"no customer '{named.id}' in environment '{environment}'")
    return customer_id


async def _by_id(call: Call[Any, Any], environment: str, text: str, shape: Shape) -> tuple[str, str]:
    """The customer whose tally uuid is ``text``, in ``shape`` (a read: the standby's when
    it may serve it), and the position the read reflects; NotFound otherwise."""
    customer_id = as_uuid(text)
    if customer_id is not None:
        q = ListQuery(
            organization_id=call.principal.organization_id,
            environment=environment,
            filter=CustomerFilter(ids=(customer_id,)),
            limit=1,
            count=False,
        )
        page = await run_list(call.request, q, shape)
        if page.docs:
            return page.docs[0], page.as_of
    raise NotFound(f"no customer '{text}' in environment '{environment}'")
