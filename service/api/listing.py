"""The one list handler every customer list is served by (tally's own and each vendor's: a
:class:`ListAdapter` says what its dialect means), and what it shares: running the core query
on the read pool, page links, and splicing PostgreSQL-rendered rows into a JSON envelope
without parsing them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

import orjson
from aiohttp import web

from service.api import appkeys, dbaccess, readcache
from service.api.routing import Call
from service.domain.errors import InvalidInput
from service.domain.keys import Principal
from service.domain.listing import CustomerFilter, ListQuery, Sort
from service.infra.errors import is_overrun
from service.store import customers as core
from service.store.listing import maintained_window
from service.store.rendering import Shape

P = TypeVar("P")
JSON = "application/json"
# The change-log position a read reflects (service/store/changelog.py): a client that lists,
# then follows the change feed from here, misses no change.
AS_OF_HEADER = "Tally-As-Of"
# The order of every dialect that names none: the customers created last come first.
NEWEST_FIRST = Sort("created_at", descending=True)


class Window(NamedTuple):
    limit: int
    offset: int


@dataclass(frozen=True)
class Listed(Generic[P]):
    """A list request answered: what its envelope is made of."""

    call: Call[Any, Any]
    params: P
    query: ListQuery
    page: core.Page


def query_parameters(call: Call[Any, Any]) -> Any:
    return call.query


def key_environment(principal: Principal, params: object) -> str:
    """The key's environment; parameters with an ``environment`` may name it, and naming the
    other one is a 403 (a key reaches its own environment only)."""
    return principal.environment_for(getattr(params, "environment", None))


@dataclass(frozen=True)
class ListAdapter(Generic[P]):
    """One dialect's customer list, as data for the one list handler (:meth:`handle`): where
    its parameters are and what they mean to the core (environment, filter, sort, window), the
    shape each customer is rendered in, and the envelope around them."""

    rows: str  # the envelope's key holding the customers
    window: Callable[[P], Window]
    shape: Callable[[P], Shape]
    envelope: Callable[[Listed[P]], Mapping[str, object]]
    sort: Callable[[P], Sort] = lambda _: NEWEST_FIRST
    filter: Callable[[P], CustomerFilter] = lambda _: CustomerFilter()
    # The query string's model (by default); Flexprice's search reads its body.
    params: Callable[[Call[Any, Any]], P] = query_parameters
    environment: Callable[[Principal, P], str] = key_environment
    # Continues the query from where a cursor the parameters carry left off.
    resume: Callable[[Call[Any, Any], P, ListQuery], ListQuery] | None = None

    async def handle(self, call: Call[Any, Any]) -> web.Response:
        """The list: the dialect's parameters as one core query, run on the read pool, its
        rows spliced into the dialect's envelope unparsed."""
        params = self.params(call)
        window = self.window(params)
        q = ListQuery(
            organization_id=call.principal.organization_id,
            environment=self.environment(call.principal, params),
            filter=self.filter(params),
            sort=self.sort(params),
            limit=window.limit,
            offset=window.offset,
        )
        if self.resume is not None:
            q = self.resume(call, params, q)
        page = await run_list(call.request, q, self.shape(params))
        envelope = self.envelope(Listed(call, params, q, page))
        response = web.Response(
            body=json_with(envelope, self.rows, page.docs), content_type=JSON, headers={AS_OF_HEADER: page.as_of}
        )
        if "as_of" in envelope:
            # When it was read, not what it shows: not part of the ETag.
            response[readcache.VOLATILE] = orjson.dumps({"as_of": envelope["as_of"]})[1:-1]
        return response


class _WindowOverrun(Exception):
    """A windowed list's statement ran past its time (carried out of the connection's block)."""


async def run_list(request: web.Request, q: ListQuery, shape: Shape) -> core.Page:
    """The list's page. A window that is not one of the kept ones adds up the organization's
    daily rows in it: one that runs past the statement timeout is a 400 naming usage_from and
    the limit (the request asks too much; asking again would not help), not a 503."""
    try:
        async with dbaccess.connection(request, read=True) as conn:
            try:
                return await core.list_customers(conn, q, shape)
            except Exception as exc:
                # A kept window (read from kept sums, or adding up only until they are rolled)
                # that overran met a busy server: a 503, tried again.
                if q.filter.windowed and is_overrun(exc) and maintained_window(q.filter, q.sort.field) is None:
                    raise _WindowOverrun from exc
                raise
    except _WindowOverrun:
        limit = request.app[appkeys.SETTINGS].db_command_timeout
        raise InvalidInput(
            "usage_from",
            f"adding up this window's usage took longer than the {limit:g} s a statement may take: ask fewer days, "
            "or one of the windows tally keeps sums for (the last 7 or 30 days, or the month so far, ending today, "
            "sorted by total_cost)",
        ) from None


def json_with(envelope: Mapping[str, object], key: str, rows: list[str] | str) -> bytes:
    """``envelope`` plus ``key`` holding ``rows`` (JSON documents, or one JSON array as text),
    spliced in as bytes: the rows PostgreSQL rendered are never parsed back into Python."""
    array = rows if isinstance(rows, str) else "[" + ",".join(rows) + "]"
    head = orjson.dumps(envelope)
    separator = b"," if len(head) > 2 else b""
    return head[:-1] + separator + b'"' + key.encode() + b'":' + array.encode() + b"}"
