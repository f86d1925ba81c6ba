"""The change feed: the change log (service/store/changelog.py) read as a sequence of
changes, one per customer, each with the customer as it is when read.

Cursors. A log row is one transaction's changes in one organization and environment; it may
hold thousands of customers (a fold's batch), more than a page. A :class:`Cursor` is a log
position and how many of the next row's changes were already given: ``xid.seq`` (everything
up to and including row ``(xid, seq)``, the form of a list's ``as_of``) or ``xid.seq.n`` (the
rows before ``(xid, seq)``, and that row's first ``n`` changes). Each change's own cursor is
the one that resumes right after it.

What a change shows. The customer is rendered when the page is read, not as it was at the
commit: a client that applies the changes in order ends with the customer's state as of the
read (every commit after the read has a transaction id at or above the read's horizon, so it
follows in the feed). A customer created or updated and deleted since is shown as deleted.

Retention. Housekeeping purges rows past the retention and records, per organization and
environment, the newest position it purged (migration 0011). A cursor below that mark may
have missed changes that are gone: :func:`read_feed` says so (``too_old``), and the client
resyncs by listing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import cast
from uuid import UUID

from service.store.changelog import Kind, Logged, LogRead, Position, read_logs
from service.store.db import Connection, columns
from service.store.rendering import Shape, renders_usage, rows_sql, shape_sql


@dataclass(frozen=True)
class Cursor:
    """After row ``position``; or, with ``given``, after the first ``given`` changes of row
    ``position`` (and every row before it)."""

    position: Position
    given: int = 0

    _FORM = re.compile(r"^(\d{1,19}\.\d{1,19})(?:\.(\d{1,9}))?$")

    def __str__(self) -> str:
        return f"{self.position}.{self.given}" if self.given else str(self.position)

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """``xid.seq`` or ``xid.seq.n`` as :meth:`__str__` writes it; ValueError otherwise."""
        match = cls._FORM.match(text)
        if match is None:
            raise ValueError("a cursor is xid.seq or xid.seq.n, as tally gave it (a change's cursor, or as_of)")
        position = Position.parse(match[1])
        given = int(match[2] or 0)
        if given and position.seq == 0:
            raise ValueError("no change is inside a position whose second number is 0")
        return cls(position, given)

    def order(self) -> tuple[int, int, float]:
        """Where the cursor stands, comparable: after every change of its row when ``given``
        is 0, else after the first ``given`` of them. A change is after a cursor when its own
        cursor's order is greater."""
        return (self.position.xid, self.position.seq, self.given or float("inf"))

    @property
    def floor(self) -> Position:
        """The position the rows still needed come strictly after."""
        if self.given:
            return Position(self.position.xid, self.position.seq - 1)
        return self.position


START = Cursor(Position(0))  # the oldest change retained


@dataclass(frozen=True)
class Thresholds:
    """Lower bounds on a customer's usage aggregates (None: no bound)."""

    total_cost: Decimal | None = None
    number_of_requests: int | None = None
    total_tokens: int | None = None


@dataclass(frozen=True)
class FeedChange:
    cursor: Cursor
    kind: Kind  # "d" also for a customer created or updated and deleted since
    customer_id: UUID
    customer_identifier: str
    changed_at: datetime
    doc: str | None  # the customer as JSON text in the caller's shape; None when deleted
    logged: Kind  # the kind the log holds ("c" or "u" where ``kind`` says the customer is gone since)


@dataclass(frozen=True)
class FeedPage:
    changes: list[FeedChange]  # those the filters kept
    next: Cursor  # resumes after every change examined
    more: bool  # the page stopped at its limit: more changes are there now
    too_old: bool  # changes after the cursor were purged: resync by listing
    # The page took everything it could, but rows of the scope after it have committed that
    # it could not take yet (a transaction with an older id was still running,
    # service/store/changelog.py): a reader polls again rather than wait for a notification
    # that the end of an unrelated transaction never sends.
    held_back: bool = False


# A customer's usage row, when the shape does not render (and so join) it: the thresholds read it.
_USAGE = (
    " CROSS JOIN LATERAL (SELECT * FROM customer_usage t"
    " WHERE t.organization_id = c.organization_id AND t.id = c.id OFFSET 0) u"
)


def _customers_sql(shape: Shape) -> str:
    """The customers ``$1`` (organizations), ``$2`` (environments), ``$3`` (ids), one probe of
    each table by primary key: their organization and id, the usage aggregates the thresholds
    bound, and their document in ``shape``."""
    probe = "SELECT * FROM customers t WHERE t.organization_id = k.organization_id AND t.id = k.id OFFSET 0"
    usage = "" if renders_usage(shape) else _USAGE
    return (
        "SELECT c.organization_id, c.id, u.total_cost, u.number_of_requests, u.total_tokens,"
        f" {shape_sql(shape)}::text AS doc"
        f" FROM unnest($1::uuid[], $2::text[], $3::uuid[]) AS k(organization_id, environment, id)"
        f" CROSS JOIN LATERAL ({probe}) c{rows_sql(shape, 'c')}{usage}"
        " WHERE c.environment = k.environment"
    )


def _passes(thresholds: Thresholds, total_cost: Decimal, number_of_requests: int, total_tokens: int) -> bool:
    return (
        (thresholds.total_cost is None or total_cost >= thresholds.total_cost)
        and (thresholds.number_of_requests is None or number_of_requests >= thresholds.number_of_requests)
        and (thresholds.total_tokens is None or total_tokens >= thresholds.total_tokens)
    )


Entry = tuple[Cursor, Kind, UUID, str, datetime]  # cursor, kind, customer id, identifier, changed_at


def _entries(rows: Sequence[Logged], after: Cursor, limit: int) -> tuple[list[Entry], bool]:
    """The changes of ``rows`` after ``after``, at most ``limit``, each with its own cursor;
    and whether the limit cut them short."""
    out: list[Entry] = []
    for row in rows:
        skip = after.given if row.position == after.position else 0
        last = len(row.kinds) - 1
        for i in range(skip, last + 1):
            if len(out) == limit:
                return out, True
            cursor = Cursor(row.position) if i == last else Cursor(row.position, i + 1)
            out.append(
                (cursor, cast(Kind, row.kinds[i]), row.customer_ids[i], row.customer_identifiers[i], row.changed_at)
            )
    return out, False


@dataclass(frozen=True)
class FeedAsk:
    """One page to read: the changes of an organization and environment after ``after``, at
    most ``limit`` examined, those of customers named in ``identifiers`` (all when empty) and,
    unless deleted, meeting ``thresholds``."""

    organization_id: UUID
    environment: str
    after: Cursor
    limit: int
    identifiers: frozenset[str] = frozenset()
    thresholds: Thresholds = Thresholds()


async def read_feed(
    conn: Connection,
    organization_id: UUID,
    environment: str,
    after: Cursor,
    limit: int,
    shape: Shape,
    *,
    identifiers: frozenset[str] = frozenset(),
    thresholds: Thresholds = Thresholds(),
) -> FeedPage:
    """:func:`read_feeds` for one page."""
    ask = FeedAsk(organization_id, environment, after, limit, identifiers, thresholds)
    return (await read_feeds(conn, [ask], shape))[0]


async def read_feeds(conn: Connection, asks: Sequence[FeedAsk], shape: Shape) -> list[FeedPage]:
    """A page for each ask, in log order (so in commit order per customer), and where to
    resume; two statements for all of them (one reads the log, one renders the customers).
    Every change examined counts toward the limit, kept or not: a filtered page may hold
    fewer, even none, and still move on. :data:`START` is never too old: it means the oldest
    change retained."""
    # Each row holds at least one change: ``limit`` rows hold at least ``limit`` of them.
    reads = await read_logs(conn, [(a.organization_id, a.environment, a.after.floor, a.limit) for a in asks])
    pages = [_examined(ask, read) for ask, read in zip(asks, reads, strict=True)]
    live = sorted(
        {
            (a.organization_id, a.environment, e[2])
            for a, (_, entries) in zip(asks, pages, strict=True)
            for e in entries
            if e[1] != "d"
        }
    )
    found: dict[tuple[UUID, UUID], tuple[Decimal, int, int, str]] = {}
    if live:
        for r in await conn.fetch(_customers_sql(shape), *columns(live)):
            found[(r["organization_id"], r["id"])] = (
                r["total_cost"],
                r["number_of_requests"],
                r["total_tokens"],
                r["doc"],
            )
    return [_shown(ask, page, entries, found) for ask, (page, entries) in zip(asks, pages, strict=True)]


def _examined(ask: FeedAsk, read: LogRead) -> tuple[FeedPage, list[Entry]]:
    """The page of ``read`` without its changes yet (where it resumes, whether there is more,
    too old, held back), and the entries the ask's identifiers keep."""
    after, reached = ask.after, read.reached
    entries, cut = _entries(read.rows, after, ask.limit)
    # Cut short: after the last change given; else after every row read (the reader's reach).
    nxt = entries[-1][0] if cut else (Cursor(reached) if reached > after.floor else after)
    if ask.identifiers:
        entries = [e for e in entries if e[3] in ask.identifiers]
    # The purge mark and the rows come from one snapshot: a purge that removed rows the read
    # needed committed before it, and shows.
    too_old = after != START and read.purged
    more = cut or len(read.rows) == ask.limit
    return FeedPage([], nxt, more, too_old, read.held_back and not more and not too_old), entries


def _shown(
    ask: FeedAsk, page: FeedPage, entries: list[Entry], found: dict[tuple[UUID, UUID], tuple[Decimal, int, int, str]]
) -> FeedPage:
    """``page`` with its changes: each live customer's document, those below a threshold left out."""
    for cursor, kind, customer_id, identifier, changed_at in entries:
        doc = None
        if kind != "d":
            customer = found.get((ask.organization_id, customer_id))
            if customer is not None:
                if not _passes(ask.thresholds, *customer[:3]):
                    continue  # below a threshold
                doc = customer[3]
        page.changes.append(
            FeedChange(cursor, "d" if doc is None else kind, customer_id, identifier, changed_at, doc, kind)
        )
    return page
