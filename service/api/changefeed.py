"""``GET /v1/customers/changes``: the change feed, one resource in two representations.

- JSON (the default): a page of changes after a cursor, each with the customer in the
  canonical shape, and ``next_cursor`` to continue (service/store/changefeed.py says what a
  cursor and a change are).
- ``Accept: text/event-stream``: the same changes pushed as Server-Sent Events as they
  commit, resumable with ``Last-Event-ID``.

Why this design. The change log is a table written in each write's own transaction
(service/store/changelog.py), so a change is in the feed exactly when it committed, in an
order every reader agrees on, and it survives restarts for the retention — durable and
ordered with no new infrastructure. A stream is woken by this process's ChangeWatch
(service/api/changewatch.py: LISTEN on the channel every commit notifies, whichever process
made it) and then reads the rows from the table: a notification carries no data and may be
lost while the listener reconnects, and the table is the same for every API replica, so a
stream on any replica sees a commit made through any other, and a missed notification costs
latency (the heartbeat's next read, or the listener's reconnection), never a change.

Streams read the primary: a notification is sent at the primary's commit, and a standby that
has not replayed it yet would answer "nothing new" to the wake-up meant for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import orjson
from aiohttp import web

from service.api import appkeys, dbaccess
from service.api.changewatch import ChangeWatch, Scope, SharedReads
from service.api.customers import TAG, canonical_shape
from service.api.errors import invalid, rate_limited
from service.api.listing import JSON, key_environment
from service.api.models import ChangeParams, CustomerChanges
from service.api.routing import Call, Endpoint, settle_now
from service.infra import metrics
from service.infra.errors import is_transient
from service.store.changefeed import START, Cursor, FeedAsk, FeedChange, FeedPage, Thresholds, read_feed, read_feeds
from service.web.problems import Problem, ProblemField

log = logging.getLogger("tally.changes")

EVENT_STREAM = "text/event-stream"
KINDS = {"c": "created", "u": "updated", "d": "deleted"}
RESYNC = "resync"
LAST_EVENT_ID = "Last-Event-ID"
# How soon a stream reads again when rows of its scope have committed that its read could not
# take yet (a transaction with an older id still ran: service/store/changelog.py), or when its
# process is not listening: the end of that transaction, or a commit unheard, notifies nothing.
POLL_SECONDS = 0.25
# How long a slow client's resync may wait for room in its send buffer before the connection closes.
RESYNC_SEND_SECONDS = 1.0


def wants_stream(request: web.Request) -> bool:
    """Whether the request's Accept names text/event-stream (with a weight above 0)."""
    for part in request.headers.get("Accept", "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media.lower() != EVENT_STREAM:
            continue
        weights = [p.partition("=")[2].strip() for p in params if p.partition("=")[0].strip().lower() == "q"]
        try:
            return not weights or float(weights[0]) > 0
        except ValueError:
            return True
    return False


def change_json(change: FeedChange) -> bytes:
    """One change as JSON: the customer's document (rendered by PostgreSQL) spliced in unparsed."""
    if change.doc is None:
        customer = orjson.dumps({"id": str(change.customer_id), "customer_identifier": change.customer_identifier})
    else:
        customer = change.doc.encode()
    head = orjson.dumps({"cursor": str(change.cursor), "kind": KINDS[change.kind], "changed_at": change.changed_at})
    return head[:-1] + b',"customer":' + customer + b"}"


def too_old(name: str, location: str = "query") -> Problem:
    return Problem(
        410,
        "Gone",
        "changes after this cursor are older than the change log keeps (TALLY_CHANGE_LOG_RETENTION_HOURS): list "
        "the customers again (GET /v1/customers) and follow the feed from the list's as_of",
        slug="cursor-too-old",
        errors=[ProblemField(name, "older than the change log keeps: resync by listing", location)],
    )


def start_cursor(call: Call[ChangeParams, None], *, streaming: bool) -> tuple[Cursor, str, str]:
    """Where the request resumes, and the parameter (and where it is) that said so: an event
    stream's Last-Event-ID (what EventSource sends when it reconnects), else ``after``."""
    header = call.request.headers.get(LAST_EVENT_ID)
    if header and not streaming:
        _parse(header, LAST_EVENT_ID, "header")  # refused if it is not a cursor, though a page ignores it
    resumed = header if streaming else None
    name, location, text = (LAST_EVENT_ID, "header", resumed) if resumed else ("after", "query", call.query.after)
    if not text:
        return START, name, location
    return _parse(text, name, location), name, location


def _parse(text: str, name: str, location: str) -> Cursor:
    try:
        return Cursor.parse(text)
    except ValueError as exc:
        raise invalid(
            name, f"{exc}; to start again, list the customers and follow from the list's as_of", location
        ) from None


async def _read(call: Call[ChangeParams, None], scope: Scope, cursor: Cursor) -> FeedPage:
    """A page after ``cursor`` (its ``held_back``: whether rows of the scope after it have
    committed that it could not take yet)."""
    params = call.query
    async with dbaccess.connection(call.request) as conn:
        page = await read_feed(
            conn,
            *scope,
            cursor,
            params.limit,
            canonical_shape(False, False),
            identifiers=params.identifiers,
            thresholds=_thresholds(params),
        )
    return page


def _thresholds(params: ChangeParams) -> Thresholds:
    return Thresholds(params.min_total_cost, params.min_number_of_requests, params.min_total_tokens)


# A stream's read: its scope, the change-watch version it saw before asking, its cursor, limit,
# identifiers and thresholds (service/api/changewatch.py SharedReads says why the version).
ReadKey = tuple[Scope, tuple[int, int] | None, Cursor, int, frozenset[str], Thresholds]
# At most this many pages per pair of statements: a batch of streams far behind, each at its
# own cursor, stays a bounded statement.
BATCH_PAGES = 100


def stream_reads(app: web.Application) -> SharedReads[ReadKey, tuple[FeedPage, bytes]]:
    """The reads of this process's streams: those asked together run together, on one
    connection of the primary, each page rendered once as Server-Sent Events for every stream
    that shares it. They take no organization's turn of the pool: a commit wakes them, not a
    request, and each key holds at most TALLY_CHANGE_STREAMS_PER_KEY streams."""

    async def run(keys: list[ReadKey]) -> list[tuple[FeedPage, bytes]]:
        asks = [
            FeedAsk(*scope, cursor, limit, identifiers, thresholds)
            for scope, _, cursor, limit, identifiers, thresholds in keys
        ]
        pages: list[FeedPage] = []
        async with app[dbaccess.GATE].connection(app[appkeys.POOL], None) as conn:
            for i in range(0, len(asks), BATCH_PAGES):
                pages += await read_feeds(conn, asks[i : i + BATCH_PAGES], canonical_shape(False, False))
        return [
            (page, b"".join(event(KINDS[c.kind], change_json(c), str(c.cursor)) for c in page.changes))
            for page in pages
        ]

    return SharedReads(run)


async def _shared_read(
    call: Call[ChangeParams, None], scope: Scope, cursor: Cursor, since: tuple[int, int] | None
) -> tuple[FeedPage, bytes]:
    """:func:`_read`, shared with every stream of this process that asks the same read after
    the same notification, and read together with the others asked meanwhile (:func:`stream_reads`)."""
    params = call.query
    key: ReadKey = (scope, since, cursor, params.limit, params.identifiers, _thresholds(params))
    result: tuple[FeedPage, bytes] = await call.request.app[appkeys.CHANGE_STREAMS].reads.read(key)
    return result


async def changes(call: Call[ChangeParams, None]) -> web.StreamResponse:
    principal = call.principal
    scope = (principal.organization_id, key_environment(principal, call.query))
    streaming = wants_stream(call.request)
    cursor, name, location = start_cursor(call, streaming=streaming)
    if streaming:
        return await stream(call, scope, cursor)
    page = await _read(call, scope, cursor)
    if page.too_old:
        raise too_old(name, location)
    tail = orjson.dumps({"next_cursor": str(page.next), "has_more": page.more, "limit": call.query.limit})
    body = b'{"results":[' + b",".join(change_json(c) for c in page.changes) + b"]," + tail[1:]
    return web.Response(body=body, content_type=JSON)


class SlowClient(Exception):
    """The client did not take what was sent within TALLY_CHANGE_STREAM_SEND_TIMEOUT."""


def event(kind: str, data: bytes, event_id: str | None = None) -> bytes:
    """One Server-Sent Event (data is one line: JSON without raw newlines)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\n".encode() + b"data: " + data + b"\n\n"


async def stream(call: Call[ChangeParams, None], scope: Scope, cursor: Cursor) -> web.StreamResponse:
    """Changes after ``cursor`` as they commit, until the client goes, falls too far behind
    (``resync``), stops taking them (``resync``, then closed), or the process shuts down."""
    request, principal = call.request, call.principal
    slots, settings = request.app[appkeys.CHANGE_STREAMS], request.app[appkeys.SETTINGS]
    if not slots.take(principal.client_key):
        metrics.CHANGE_STREAMS_REFUSED.inc()
        raise rate_limited(
            f"this key holds {slots.per_key} change streams open on this server already "
            "(TALLY_CHANGE_STREAMS_PER_KEY); close one, or page the feed with JSON",
            {"Retry-After": "5"},
        )
    reason = "error"
    try:
        response = web.StreamResponse(headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        response.content_type = EVENT_STREAM
        settle_now(request)
        await response.prepare(request)

        async def send(data: bytes) -> None:
            try:
                # (asyncio.timeout, not wait_for: no task per write, which a thousand streams felt)
                async with asyncio.timeout(settings.change_stream_send_timeout):
                    await response.write(data)
            except TimeoutError:
                raise SlowClient from None

        try:
            reason = await _follow(call, scope, cursor, send)
        except SlowClient:
            reason = "slow"
            await _drop(request, response)
        except ConnectionError:
            reason = "client"
        except asyncio.CancelledError:
            reason = "shutdown"  # the server's drain gave up on it
            raise
        except Exception as exc:
            if not is_transient(exc):
                raise
            # The database failed under a stream that already answered 200: it ends, and its
            # client resumes from its last event id (EventSource by itself) when it comes back.
            log.warning("change stream ended by a database error", extra={"error": repr(exc)})
        return response
    finally:
        slots.give_back(principal.client_key)
        metrics.CHANGE_STREAMS_ENDED.labels(reason).inc()


def _resync(detail: str, cursor: Cursor | None = None) -> bytes:
    """A ``resync`` event: its ``after`` is the position too old to resume from, when that is why."""
    return event(
        RESYNC, orjson.dumps({"detail": detail} if cursor is None else {"after": str(cursor), "detail": detail})
    )


async def _drop(request: web.Request, response: web.StreamResponse) -> None:
    """Queue ``resync`` behind what the slow client has not taken, and close the connection:
    its buffer holds what it held, never more."""
    detail = "this client did not take the changes sent in time: resume from the last event id received"
    with contextlib.suppress(TimeoutError, ConnectionError):
        await asyncio.wait_for(response.write(_resync(detail)), RESYNC_SEND_SECONDS)
    if request.transport is not None:
        request.transport.close()


async def _follow(
    call: Call[ChangeParams, None], scope: Scope, cursor: Cursor, send: Callable[[bytes], Awaitable[None]]
) -> str:
    """Send changes after ``cursor`` until the stream must end; why it ended."""
    request = call.request
    watch: ChangeWatch = request.app[appkeys.CHANGE_WATCH]
    slots, settings = request.app[appkeys.CHANGE_STREAMS], request.app[appkeys.SETTINGS]
    heartbeat = settings.change_stream_heartbeat_seconds
    loop = asyncio.get_running_loop()
    last_sent = loop.time()
    while not slots.stopping.is_set():
        # Noted before the read: a commit heard while it runs makes the wait below return at once.
        since = watch.version(scope)
        page, rendered = await _shared_read(call, scope, cursor, since)
        if page.too_old:
            await send(
                _resync(
                    "changes after this position are older than the change log keeps: list "
                    "the customers again and follow from the list's as_of",
                    cursor,
                )
            )
            return RESYNC
        if page.changes:
            # The page in one write: a write per event cost a system call each, per stream.
            await send(rendered)
            now = datetime.now(UTC)
            for change in page.changes:
                metrics.CHANGE_FEED_LAG.observe(max(0.0, (now - change.changed_at).total_seconds()))
            last_sent = loop.time()
        cursor = page.next
        if page.more:
            continue
        polling = page.held_back or since is None
        while not slots.stopping.is_set():
            wait = heartbeat - (loop.time() - last_sent)
            if polling:
                wait = min(wait, POLL_SECONDS)
            # The shutdown's end_streams wakes this wait (service/api/app.py), and nothing awaits
            # between the loop's check of ``stopping`` and the wait's start.
            if wait > 0 and (await watch.changed(scope, since, wait) or slots.stopping.is_set()):
                break
            if loop.time() - last_sent >= heartbeat:
                await send(b": heartbeat\n\n")
                last_sent = loop.time()
            if polling:
                break
    return "shutdown"


ENDPOINTS = [
    Endpoint(
        "GET",
        "/v1/customers/changes",
        changes,
        "Customer change feed",
        TAG,
        "read",
        query=ChangeParams,
        response=CustomerChanges,
        errors=(410,),
        description="The customers created, updated or deleted after a cursor, in commit order per customer, each "
        "with the customer as it is now (deleted: id and identifier). JSON by default: a page and next_cursor. "
        "With Accept: text/event-stream, the same changes pushed as Server-Sent Events as they commit (id: the "
        "cursor, event: the kind, data: the change), resumable with Last-Event-ID; an event 'resync' when the "
        "position is older than the change log keeps (then list again and follow from the list's as_of), comment "
        "heartbeats, at most TALLY_CHANGE_STREAMS_PER_KEY open streams per key (429 beyond). A cursor older than "
        "the change log keeps is a 410 on JSON pages.",
        operation_id="customers_customer_changes",
        event_stream=True,
    ),
]
