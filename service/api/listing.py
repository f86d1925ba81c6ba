"""What every list route shares: running the core query on the read pool, page links, and
splicing PostgreSQL-rendered rows into a JSON envelope without parsing them."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import orjson
from aiohttp import web
from yarl import URL

from service.api import appkeys, dbaccess
from service.core import customers as core
from service.core.query import ListQuery, Shape


async def run_list(request: web.Request, q: ListQuery, shape: Shape) -> core.Page:
    async with dbaccess.connection(request, read=True) as conn:
        return await core.list_customers(conn, q, shape)


def link(request: web.Request, **changes: object) -> str:
    """This request's URL with some query parameters replaced (None removes one), as
    :func:`client_link` makes it."""
    query = request.rel_url.query.copy()
    for key, value in changes.items():
        query.popall(key, None)
        if value is not None:
            query[key] = str(value)
    return client_link(request, request.rel_url.with_query(query))


def client_link(request: web.Request, target: URL) -> str:
    """``target`` (a path and query on this API) as a link to hand the client.

    On ``TALLY_PUBLIC_URL`` when it is set (its path is a prefix); else absolute on the
    request's own scheme and Host when that Host is in ``TALLY_ALLOWED_HOSTS``; else
    relative (path and query only). The Host header is the caller's to write: a link that
    followed any Host would point the client, or a cache keyed without Host, at whatever
    host an attacker named. With ``TALLY_TRUST_FORWARDED_HEADERS``, the scheme and host are
    the proxy's ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` where it sent them (the host
    held to the same list).
    """
    settings = request.app[appkeys.SETTINGS]
    if settings.public_url:
        return settings.public_url + str(target)
    scheme, host = request.scheme, request.headers.get("Host", "")
    if settings.trust_forwarded_headers:
        scheme, host = _forwarded(request, scheme, host)
    if host_allowed(host, settings.allowed_hosts):
        # Built from scheme and host (not request.clone(), which a request whose body was
        # read refuses), as request.url is.
        try:
            return str(URL.build(scheme=scheme, authority=host).join(target))
        except ValueError:  # a Host no URL can hold (allowed only under '*')
            pass
    return str(target)


def _forwarded(request: web.Request, scheme: str, host: str) -> tuple[str, str]:
    """The scheme and host a proxy says the client used (the first of a comma-separated
    chain: the client-facing proxy's); the request's own where a header is absent or unusable."""
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    forwarded_host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()
    return (proto if proto in ("http", "https") else scheme), (forwarded_host or host)


def host_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    """Whether a Host header names one of ``patterns`` (ports ignored): an exact name, a
    ``*.example.com`` wildcard (any subdomain, not the apex), or ``*`` (any host)."""
    name = _hostname(host)
    if not name:
        return False
    exact, suffixes, anything = _compiled(patterns)
    return anything or name in exact or any(name.endswith(suffix) for suffix in suffixes)


@lru_cache(maxsize=8)
def _compiled(patterns: tuple[str, ...]) -> tuple[frozenset[str], tuple[str, ...], bool]:
    names = [_hostname(p) for p in patterns]
    exact = frozenset(n for n in names if n and not n.startswith("*"))
    suffixes = tuple(n[1:] for n in names if n.startswith("*.") and len(n) > 2)
    return exact, suffixes, "*" in names


def _hostname(host: str) -> str:
    """The host name of a Host header value or pattern, lower case, without its port."""
    host = host.strip().lower()
    if host.startswith("["):  # an IPv6 literal: [::1]:8080
        end = host.find("]")
        return host[: end + 1] if end != -1 else ""
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() else host


def json_with(envelope: Mapping[str, object], key: str, rows: list[str] | str) -> bytes:
    """``envelope`` plus ``key`` holding ``rows`` (JSON documents, or one JSON array as text),
    spliced in as bytes: the rows PostgreSQL rendered are never parsed back into Python."""
    array = rows if isinstance(rows, str) else "[" + ",".join(rows) + "]"
    head = orjson.dumps(envelope)
    separator = b"," if len(head) > 2 else b""
    return head[:-1] + separator + b'"' + key.encode() + b'":' + array.encode() + b"}"
