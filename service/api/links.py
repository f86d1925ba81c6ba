"""Links in responses: absolute on the public URL or an allowed Host, else relative — never
on whatever Host a caller writes."""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from urllib.parse import urlsplit

from aiohttp import web
from yarl import URL

from service.api import appkeys


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
    request's own scheme and Host when that Host is exactly an allowed ``host[:port]`` of
    ``TALLY_ALLOWED_HOSTS``; else relative (path and query only). The Host header is the
    caller's to write: a link that followed any Host would point the client, or a cache keyed
    without Host, at whatever host an attacker named — and a Host such as
    ``[::1]@evil.example`` names ``evil.example`` to every URL parser, whatever its first
    characters say. With ``TALLY_TRUST_FORWARDED_HEADERS``, the scheme and host are the proxy's
    ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` where it sent them (the host held to the
    same rule).
    """
    settings = request.app[appkeys.SETTINGS]
    if settings.public_url:
        return settings.public_url + str(target)
    origin = _origin(request)
    return str(target) if origin is None else str(origin.join(target))


def link_base(request: web.Request) -> str:
    """What :func:`client_link` puts before a path: ``TALLY_PUBLIC_URL``, the allowed origin
    the request names, or nothing (links relative). Two requests get the same links for the
    same path exactly when this is the same."""
    settings = request.app[appkeys.SETTINGS]
    if settings.public_url:
        return settings.public_url
    origin = _origin(request)
    return "" if origin is None else str(origin)


def _origin(request: web.Request) -> URL | None:
    settings = request.app[appkeys.SETTINGS]
    scheme, host = request.scheme, request.headers.get("Host", "")
    if settings.trust_forwarded_headers:
        scheme, host = _forwarded(request, scheme, host)
    if len(host) > MEMO_HOST:  # worked out, not kept: the memo's entries stay small
        return _allowed_origin.__wrapped__(scheme, host, settings.allowed_hosts)
    return _allowed_origin(scheme, host, settings.allowed_hosts)


# The longest Host value the memo below keeps (authority() refuses any longer name).
MEMO_HOST = 300


# Every request asks this of its Host (the read cache's key names the link base): parsed once
# per distinct value. A client may send any Host, so the memo is bounded.
@lru_cache(maxsize=256)
def _allowed_origin(scheme: str, host: str, allowed_hosts: tuple[str, ...]) -> URL | None:
    """``scheme://host[:port]`` when ``host`` is exactly an allowed ``host[:port]``, else None.
    Built from the parsed name and port (never the header's text), and not with
    request.clone(), which a request whose body was read refuses."""
    parsed = authority(host)
    if parsed is None or not name_allowed(parsed[0], allowed_hosts):
        return None
    name, port = parsed
    return URL.build(scheme=scheme, host=name.strip("[]"), port=port)


def _forwarded(request: web.Request, scheme: str, host: str) -> tuple[str, str]:
    """The scheme and host a proxy says the client used (the first of a comma-separated
    chain: the client-facing proxy's); the request's own where a header is absent or unusable."""
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    forwarded_host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()
    return (proto if proto in ("http", "https") else scheme), (forwarded_host or host)


# A DNS name (labels of letters, digits and inner hyphens; a trailing dot is not accepted) or
# a dotted IPv4 address, which the same grammar admits.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


def authority(host: str) -> tuple[str, int | None] | None:
    """``(name, port)`` of a Host header value that is exactly ``host[:port]`` — a DNS name, an
    IPv4 address or a bracketed IPv6 address (name lower case, IPv6 in brackets), and a port
    from 1 to 65535 if any — else None. The value is parsed as a URL authority (as any client
    following a link would read it) and must be nothing but the name and port it parses to:
    no user information (``[::1]@evil.example``), path, query or fragment, no empty port."""
    text = host.strip().lower()
    if not text or len(text) > 300:
        return None
    try:
        parts = urlsplit("//" + text)
        port = parts.port
    except ValueError:  # a port out of range, an unbalanced bracket
        return None
    name = parts.hostname
    if name is None or parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    if ":" in name:  # an IPv6 literal: a valid address, without a zone
        if "%" in name:
            return None
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
        name = f"[{name}]"
    elif not _DNS_NAME.match(name) or len(name) > 253:
        return None
    if port == 0:
        return None
    # The whole value, and nothing but it: "localhost:" or "host:080" are not what they parse to.
    if text != (name if port is None else f"{name}:{port}"):
        return None
    return name, port


def host_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    """Whether a Host header value is exactly an allowed ``host[:port]`` (see
    :func:`authority`; ports are not restricted) of ``patterns``."""
    parsed = authority(host)
    return parsed is not None and name_allowed(parsed[0], patterns)


def name_allowed(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a parsed host name matches ``patterns``: an exact name, a ``*.example.com``
    wildcard (any subdomain, not the apex), or ``*`` (any host)."""
    exact, suffixes, anything = _compiled(patterns)
    return anything or name in exact or any(name.endswith(suffix) for suffix in suffixes)


@lru_cache(maxsize=8)
def _compiled(patterns: tuple[str, ...]) -> tuple[frozenset[str], tuple[str, ...], bool]:
    names = [p.strip().lower() for p in patterns]
    exact = frozenset(parsed[0] for n in names if (parsed := authority(n)) is not None)
    suffixes = tuple(n[1:] for n in names if n.startswith("*.") and authority(n[2:]) is not None)
    return exact, suffixes, "*" in names
