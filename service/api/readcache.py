"""Conditional and cached reads: ``ETag``/``If-None-Match`` on every list and retrieve, and an
exact in-memory cache of their responses.

A response is kept with the data version of its organization and environment that this
process knew when the read began (service/api/changewatch.py), and served again only while
that version is still current: the first notification of a commit that may change it, from
any process, makes every response of that organization and environment a miss. So the cache
is never staler than the last commit the process has been told of; this process's own writes
bump the version before they answer; a request that carries a consistency token (it wants at
least its own write, made perhaps through another replica) bypasses the cache; and a read a
standby served is not kept (how new its data is is known only after the read).
Responses also hold for a bounded time at most (they show budget periods, which turn at
midnight in some zone: entries end at the next quarter hour), and the cache a bounded size
(least recently used out first).

Reads that miss together share one read: while a response is being read for a version, the
same request for the same version waits for that read instead of starting its own, and is
answered with what it read (from the primary, the response it would have found in memory a
moment later; from a standby, which is never kept, what its own read could have returned).
After a commit, every dashboard polling a view misses at once; without this, each of them
would run the same statement. A read that fails (an error, a cancelled request) leaves each
waiting request to read for itself, one after another.

``ETag`` is a hash of the body (less a list's ``as_of``, which moves with every transaction on
the server), so it is the same on every replica and across restarts while the data is;
``If-None-Match`` with it is a 304 — from memory, without touching the database, when the
response is cached. ``Cache-Control: private, no-cache``: a client (or a browser) may keep a
response, and must revalidate it before each use; shared caches must not keep it (it is one
key's view).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web

from service.api.changewatch import ChangeWatch, Scope
from service.infra import metrics

CACHE_CONTROL = "private, no-cache"
# Entries end at the next quarter hour: every zone's midnight (offsets are whole quarter hours)
# is on one, and a budget period turns only at a midnight.
QUARTER_HOUR = 900


# A response's bytes that say when it was read rather than what it shows (a list's as_of):
# left out of its ETag, so the tag changes only when the data does.
VOLATILE = web.ResponseKey("tally_volatile", bytes)


def etag(body: bytes, volatile: bytes = b"") -> str:
    if volatile:
        body = body.replace(volatile, b"", 1)
    return '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'


def matches(if_none_match: str | None, tag: str) -> bool:
    """Whether an If-None-Match header names ``tag`` (RFC 9110: weak comparison, ``*`` matches)."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    return any(t.strip().removeprefix("W/") == tag for t in if_none_match.split(","))


@dataclass(frozen=True)
class Entry:
    version: tuple[int, int]  # (epoch, version) of the scope when the read began
    body: bytes
    content_type: str
    tag: str
    headers: tuple[tuple[str, str], ...]  # the response's own headers worth keeping (as-of, consistency)
    expires: float  # epoch seconds


class ReadCache:
    """Least-recently-used entries up to ``max_bytes`` in all, each at most ``max_entry_bytes``."""

    def __init__(self, max_bytes: int, max_entry_bytes: int, clock: Callable[[], float] | None = None) -> None:
        self.max_bytes, self.max_entry_bytes = max_bytes, max_entry_bytes
        self.clock = clock or (lambda: datetime.now(UTC).timestamp())
        self._entries: OrderedDict[tuple[Scope, str], Entry] = OrderedDict()
        self.bytes = 0
        # The reads under way, by what they read: each resolves to the entry it made, or to
        # None when it made none (an error, a response not kept, a cancelled read).
        self._reading: dict[tuple[Scope, str, tuple[int, int]], asyncio.Future[Entry | None]] = {}

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, scope: Scope, key: str, version: tuple[int, int]) -> Entry | None:
        entry = self._entries.get((scope, key))
        if entry is None:
            return None
        if entry.version != version or entry.expires <= self.clock():
            self._drop((scope, key))
            return None
        self._entries.move_to_end((scope, key))
        return entry

    def put(self, scope: Scope, key: str, entry: Entry) -> bool:
        size = len(entry.body) + len(key)
        if not self.enabled or size > self.max_entry_bytes:
            return False
        self._drop((scope, key))
        self._entries[(scope, key)] = entry
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        return True

    def reading(self, scope: Scope, key: str, version: tuple[int, int]) -> asyncio.Future[Entry | None] | None:
        """The read of ``key`` for ``version`` under way, if any."""
        return self._reading.get((scope, key, version))

    def begin(self, scope: Scope, key: str, version: tuple[int, int]) -> asyncio.Future[Entry | None]:
        """A read of ``key`` for ``version`` now under way: others may wait for its entry."""
        future: asyncio.Future[Entry | None] = asyncio.get_running_loop().create_future()
        self._reading[(scope, key, version)] = future
        return future

    def end(self, scope: Scope, key: str, version: tuple[int, int], entry: Entry | None) -> None:
        """The read :meth:`begin` announced is over, with ``entry`` (None: nothing to share)."""
        future = self._reading.pop((scope, key, version), None)
        if future is not None and not future.done():
            future.set_result(entry)

    def expiry(self) -> float:
        now = self.clock()
        return (now // QUARTER_HOUR + 1) * QUARTER_HOUR

    def _drop(self, full_key: tuple[Scope, str]) -> None:
        entry = self._entries.pop(full_key, None)
        if entry is not None:
            self.bytes -= len(entry.body) + len(full_key[1])


# How many reads under way a request waits for before it reads for itself. A read that fails
# (an error, a cancelled request) shares nothing; its first waiter to wake then reads for the
# rest, so that they do not all read at once just after a failure.
WAITS = 2

# The response headers a cached response carries again (what its data reflected).
KEPT_HEADERS = ("Tally-As-Of", "X-Tally-Consistency")


def not_modified(tag: str) -> web.Response:
    return web.Response(status=304, headers={"ETag": tag, "Cache-Control": CACHE_CONTROL})


def _answer(entry: Entry, request: web.Request) -> web.Response:
    if matches(request.headers.get("If-None-Match"), entry.tag):
        return not_modified(entry.tag)
    response = web.Response(body=entry.body, content_type=entry.content_type, headers=dict(entry.headers))
    response.headers["ETag"] = entry.tag
    response.headers["Cache-Control"] = CACHE_CONTROL
    return response


async def conditional(
    request: web.Request,
    scope: Scope,
    key: str,
    cache: ReadCache,
    watch: ChangeWatch,
    read: Callable[[], Awaitable[web.StreamResponse]],
    *,
    bypass: bool,
    storable: Callable[[tuple[int, int]], bool],
) -> web.StreamResponse:
    """The response to a read: from ``cache`` while it is current, else from ``read`` (kept
    when ``storable`` says the read reflects the version it began at); with an ETag, and a
    304 when the client's If-None-Match names it."""
    version = None if bypass or not cache.enabled else watch.version(scope)
    leading = False
    if version is not None:
        for waited in range(WAITS + 1):
            entry = cache.get(scope, key, version)
            if entry is not None:
                metrics.READ_CACHE.labels("hit").inc()
                return _answer(entry, request)
            under_way = cache.reading(scope, key, version)
            if under_way is None:
                cache.begin(scope, key, version)
                leading = True
                break
            if waited == WAITS:
                break  # reads for itself
            # Shielded: this request's cancellation must not cancel the read others wait for.
            entry = await asyncio.shield(under_way)
            if entry is not None and entry.expires > cache.clock():
                metrics.READ_CACHE.labels("shared").inc()
                return _answer(entry, request)
            # Nothing to share (the read failed, or it began before a quarter hour now past):
            # the first waiter to wake reads for the others, who wait for it in turn.
    shared: Entry | None = None
    try:
        # Before the read: a read that began before a quarter hour must not be kept past it.
        expires = cache.expiry()
        response = await read()
        if response.status != 200 or not isinstance(response, web.Response) or not isinstance(response.body, bytes):
            return response
        body = response.body
        tag = etag(body, response.get(VOLATILE, b""))
        if version is None:
            metrics.READ_CACHE.labels("bypass").inc()
        else:
            entry = Entry(
                version,
                body,
                response.content_type,
                tag,
                tuple((h, response.headers[h]) for h in KEPT_HEADERS if h in response.headers),
                expires,
            )
            # Shared with the requests waiting for it even when it is not kept (a standby's read:
            # no version says how new it is). They asked while it was under way, and a read
            # without a consistency token is promised nothing newer from a standby.
            shared = entry
            kept = storable(version) and cache.put(scope, key, entry)
            metrics.READ_CACHE.labels("miss" if kept else "uncacheable").inc()
            metrics.READ_CACHE_BYTES.set(cache.bytes)
    finally:
        if leading:
            assert version is not None
            cache.end(scope, key, version, shared)
    if matches(request.headers.get("If-None-Match"), tag):
        return not_modified(tag)
    response.headers["ETag"] = tag
    response.headers["Cache-Control"] = CACHE_CONTROL
    return response
