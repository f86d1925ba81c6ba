"""What every list route shares: running the core query on the read pool, page links, and
splicing PostgreSQL-rendered rows into a JSON envelope without parsing them."""

from __future__ import annotations

import orjson
from aiohttp import web

from service import customers as core
from service.api import appkeys
from service.query import ListQuery, Shape


async def run_list(request: web.Request, q: ListQuery, shape: Shape) -> core.Page:
    async with request.app[appkeys.READ_POOL].acquire() as conn:
        return await core.list_customers(conn, q, shape)


def link(request: web.Request, **changes: object) -> str:
    """This request's absolute URL with some query parameters replaced (None removes one)."""
    query = request.rel_url.query.copy()
    for key, value in changes.items():
        query.popall(key, None)
        if value is not None:
            query[key] = str(value)
    return str(request.url.with_query(query))


def json_with(envelope: dict[str, object], key: str, rows: list[str] | str) -> bytes:
    """``envelope`` plus ``key`` holding ``rows`` (JSON documents, or one JSON array as text),
    spliced in as bytes: the rows PostgreSQL rendered are never parsed back into Python."""
    array = rows if isinstance(rows, str) else "[" + ",".join(rows) + "]"
    head = orjson.dumps(envelope)
    separator = b"," if len(head) > 2 else b""
    return head[:-1] + separator + b'"' + key.encode() + b'":' + array.encode() + b"}"
