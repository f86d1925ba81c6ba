"""Customer reads and writes: the one implementation behind every HTTP route.

Reads return JSON text built by PostgreSQL in the caller's chosen :class:`Shape`, so rows
are never turned into Python objects on the hot path; the edge splices the text into its
envelope.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from uuid import UUID

import asyncpg

from service.domain.changes import Change, from_micros
from service.domain.errors import Conflict, InvalidInput, NotFound
from service.domain.listing import MULTI_VALUE_OPERATORS, ListQuery, Position
from service.domain.vocabulary import WRITABLE_COLUMNS
from service.store.apply import apply_changes, by_key_order
from service.store.changelog import HORIZON
from service.store.changelog import Position as LogPosition
from service.store.db import Connection
from service.store.listing import export_sql, list_sql
from service.store.rendering import Shape, rows_sql, shape_sql
from service.store.usage import DEFAULT_TOP, UsageQuery, by_dimension, zero_filled


@dataclass(frozen=True)
class Page:
    docs: list[str]  # one JSON object per customer, in order
    count: int | None
    next_position: Position | None  # set when rows follow this page
    previous_position: Position | None  # set when rows precede it
    as_of: str  # the change-log position the page reflects (service/store/changelog.py)


async def export_page(conn: Connection, q: ListQuery, shape: Shape, after: UUID | None) -> list[tuple[str, UUID]]:
    """The next ``q.limit`` customers of an export after ``after`` (id order): (doc, id) each."""
    sql, args = export_sql(q, shape, after)
    return [(r["doc"], r["id"]) for r in await conn.fetch(sql, *args)]


async def list_customers(conn: Connection, q: ListQuery, shape: Shape) -> Page:
    """One page of ``q`` rendered in ``shape``, with the total count when ``q.count``
    (one statement, one round trip; a filter with lists of values is planned for its values)."""
    sql, args = list_sql(q, shape)
    if any(c.operator in MULTI_VALUE_OPERATORS and len(c.values) > 1 for c in q.filter.conditions):
        # A generic plan (which a prepared statement gets after a few runs) tests `x = ANY($n)`
        # against every element of the list for every customer; a plan made for the actual
        # values hashes them: 2.3 s against 0.8 s for a filter of 1,000 values over 300k
        # customers. Planning costs ~0.5 ms, so only such filters pay it.
        async with conn.transaction():
            await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
            result = await conn.fetch(sql, *args)
    else:
        result = await conn.fetch(sql, *args)
    count = result[0]["total"] if result else None
    rows = [r for r in result if r["doc"] is not None]
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    backwards = bool(q.position and q.position.backwards)
    if backwards:
        rows.reverse()
    has_next = more if not backwards else True
    has_previous = more if backwards else (q.position is not None or q.offset > 0)
    return Page(
        docs=[r["doc"] for r in rows],
        count=count,
        next_position=Position(rows[-1]["k"], rows[-1]["kid"]) if rows and has_next else None,
        previous_position=Position(rows[0]["k"], rows[0]["kid"], backwards=True) if rows and has_previous else None,
        as_of=str(LogPosition(int(result[0]["as_of"]))),
    )


def storable(identifier: str) -> bool:
    """False for an identifier no customer can have (PostgreSQL text cannot hold U+0000), so
    a lookup by it is simply not found instead of a database error."""
    return "\x00" not in identifier


# The customer named by its key ($1, $2, $3), probed by an index on that key (see by_key_order).
BY_KEY = " WHERE c.organization_id = $1 AND c.environment = $2 AND c.customer_identifier = $3 " + by_key_order("c")


def _get_sql(shape: Shape) -> str:
    """The customer named by its identifier: one probe of an index on its key, and one of each
    other table the shape renders, by primary key; and the change-log position the read
    reflects."""
    return f"SELECT {shape_sql(shape)}::text AS doc, {HORIZON} AS as_of FROM customers c{rows_sql(shape, 'c')}{BY_KEY}"


async def read_customer(
    conn: Connection, organization_id: UUID, environment: str, identifier: str, shape: Shape
) -> tuple[str, str]:
    """The customer as JSON text in ``shape``, and the change-log position the read reflects;
    NotFound (also for other organizations')."""
    row = None
    if storable(identifier):
        row = await conn.fetchrow(_get_sql(shape), organization_id, environment, identifier)
    if row is None:
        raise NotFound(f"no customer '{identifier}' in environment '{environment}'")
    return row["doc"], str(LogPosition(int(row["as_of"])))


async def get_customer(conn: Connection, organization_id: UUID, environment: str, identifier: str, shape: Shape) -> str:
    """The customer as JSON text in ``shape``; NotFound (also for other organizations')."""
    doc, _ = await read_customer(conn, organization_id, environment, identifier, shape)
    return doc


def _check_columns(values: dict[str, object]) -> None:
    unknown = set(values) - WRITABLE_COLUMNS
    if unknown:  # the edge validates first; this guards the SQL text itself
        raise ValueError(f"not writable: {sorted(unknown)}")


@contextmanager
def _write_errors() -> Iterator[None]:
    try:
        yield
    except asyncpg.UniqueViolationError:
        raise Conflict("a customer with this customer_identifier already exists in this environment") from None
    except asyncpg.ForeignKeyViolationError:
        raise InvalidInput("parent_customer_id", "no such customer in this organization") from None


# API writes are changes stamped with the request's time and folded by the same code as
# events (service/store/fold.py), under the same per-customer row lock: so a deletion event stamped
# before a POST or PATCH leaves what they wrote, and a DELETE racing a fold loses nothing.
INSERT_CUSTOMER = """
INSERT INTO customers (organization_id, environment, customer_identifier, last_event_at)
VALUES ($1, $2, $3, NULL)
ON CONFLICT (organization_id, environment, customer_identifier) DO NOTHING
RETURNING id
"""
LOCK_CUSTOMER = f"SELECT c.id FROM customers c{BY_KEY} FOR UPDATE"

# The newest instant any change applied to a customer was stamped with, as a version's
# microseconds (service/domain/changes.py): its fields' versions and hints, its newest profile or
# subscription change, its newest usage, its tombstone. Read under the customer's row lock.
NEWEST_STAMP = """
SELECT greatest(
    (SELECT max(tally_version_micros(v.value)) FROM jsonb_each_text(c.profile_versions) v),
    (SELECT max(tally_version_micros(h.value ->> 0)) FROM jsonb_each(c.profile_hints) h),
    tally_micros(c.last_event_at),
    tally_micros(u.last_active),
    (SELECT tally_micros(t.deleted_at) FROM customer_tombstones t
     WHERE t.organization_id = c.organization_id AND t.environment = c.environment
       AND t.customer_identifier = c.customer_identifier))
FROM customers c LEFT JOIN customer_usage u ON u.organization_id = c.organization_id AND u.id = c.id
WHERE c.organization_id = $1 AND c.id = $2
"""


async def write_time(conn: Connection, organization_id: UUID, customer_id: UUID, at: datetime) -> datetime:
    """The time an API write to a locked customer is stamped with: its request time, or just
    after the newest change it replaces if that is later (a hybrid logical clock). An upstream
    whose clock runs ahead stamps events minutes in the future; a write a person makes after
    seeing them must still take effect, not lose to them silently. Events are refused more than
    five minutes ahead, so a write is never stamped further ahead than that."""
    newest: int | None = await conn.fetchval(NEWEST_STAMP, organization_id, customer_id)
    if newest is None:
        return at
    return max(at, from_micros(newest + 1))


async def _write(
    conn: Connection,
    key: tuple[UUID, str, str],
    customer_id: UUID,
    at: datetime,
    request_id: str | None,
    *,
    profile: dict[str, object] | None = None,
    delete: bool = False,
    created: bool = False,
) -> None:
    """Fold one API write into the customer (its row locked by the caller, or ``created`` by
    it): a change stamped ``at``, or just after the newest change the customer holds
    (:func:`write_time`)."""
    at = await write_time(conn, key[0], customer_id, at)
    change = Change(key, at, "api", request_id or uuid.uuid4().hex, profile=profile, delete=delete)
    with _write_errors():
        result = await apply_changes(conn, [change], {key: customer_id}, made=frozenset([key]) if created else None)
    assert not result.stale[0], "a write stamped after the customer's tombstone is never stale"


async def create_customer(
    conn: Connection,
    organization_id: UUID,
    environment: str,
    identifier: str,
    values: dict[str, object],
    shape: Shape,
    *,
    at: datetime,
    request_id: str | None = None,
) -> str:
    """Create a customer whose fields are written at ``at`` (or just after a tombstone stamped
    later: :func:`write_time`); Conflict if the identifier exists in that environment."""
    _check_columns(values)
    key = (organization_id, environment, identifier)
    async with conn.transaction():
        with _write_errors():
            customer_id = await conn.fetchval(INSERT_CUSTOMER, *key)
            if customer_id is None:
                raise Conflict("a customer with this customer_identifier already exists in this environment")
        await _write(conn, key, customer_id, at, request_id, profile=values, created=True)
        return await get_customer(conn, organization_id, environment, identifier, shape)


async def update_customer(
    conn: Connection,
    organization_id: UUID,
    environment: str,
    identifier: str,
    values: dict[str, object],
    shape: Shape,
    *,
    at: datetime,
    request_id: str | None = None,
) -> str:
    """Write the given columns at ``at``, or just after the newest change the customer holds
    if that is later (:func:`write_time`): the write always takes effect, and the document
    returned is what is stored. NotFound if there is no such customer."""
    _check_columns(values)
    if not storable(identifier):
        raise NotFound(f"no customer '{identifier}' in environment '{environment}'")
    key = (organization_id, environment, identifier)
    async with conn.transaction():
        customer_id = await conn.fetchval(LOCK_CUSTOMER, *key)
        if customer_id is None:
            raise NotFound(f"no customer '{identifier}' in environment '{environment}'")
        if values.get("parent_customer_id") == customer_id:
            raise InvalidInput("parent_customer_id", "a customer cannot be its own parent")
        if values:
            await _write(conn, key, customer_id, at, request_id, profile=values)
        return await get_customer(conn, organization_id, environment, identifier, shape)


async def delete_customer(
    conn: Connection,
    organization_id: UUID,
    environment: str,
    identifier: str,
    *,
    at: datetime,
    request_id: str | None = None,
) -> None:
    """Delete the customer as of ``at``, or just after the newest change it holds if that is
    later (:func:`write_time`) — a tombstone, as a ``customer.deleted`` event stamped then: the
    customer goes with its usage history, fields and subscriptions, and later-arriving events
    stamped before the tombstone are stale. NotFound if there is no such customer."""
    key = (organization_id, environment, identifier)
    async with conn.transaction():
        customer_id = await conn.fetchval(LOCK_CUSTOMER, *key) if storable(identifier) else None
        if customer_id is None:
            raise NotFound(f"no customer '{identifier}' in environment '{environment}'")
        await _write(conn, key, customer_id, at, request_id, delete=True)


# A customer named by its uuid (as Flexprice's routes name it): found on the primary inside the
# write's own transaction, and locked there, so that the customer written is the one named —
# not missed because a standby has not replayed its creation yet, nor replaced meanwhile by
# another customer with the same identifier.
LOCK_CUSTOMER_BY_ID = (
    "SELECT customer_identifier FROM customers WHERE organization_id = $1 AND environment = $2 AND id = $3 FOR UPDATE"
)


async def _lock_by_id(conn: Connection, organization_id: UUID, environment: str, customer_id: UUID) -> str:
    """The identifier of the customer whose uuid is ``customer_id``, its row locked until the
    transaction ends; NotFound if there is none."""
    identifier: str | None = await conn.fetchval(LOCK_CUSTOMER_BY_ID, organization_id, environment, customer_id)
    if identifier is None:
        raise NotFound(f"no customer '{customer_id}' in environment '{environment}'")
    return identifier


async def update_customer_by_id(
    conn: Connection,
    organization_id: UUID,
    environment: str,
    customer_id: UUID,
    values: dict[str, object],
    shape: Shape,
    *,
    at: datetime,
    request_id: str | None = None,
    check: Callable[[str], None] | None = None,
) -> str:
    """:func:`update_customer` of the customer whose uuid is ``customer_id``, found in the
    same transaction as the write, under its row lock. ``check`` is given the customer's
    identifier before anything is written (what it raises aborts the write). NotFound if there
    is no such customer."""
    async with conn.transaction():
        identifier = await _lock_by_id(conn, organization_id, environment, customer_id)
        if check is not None:
            check(identifier)
        return await update_customer(
            conn, organization_id, environment, identifier, values, shape, at=at, request_id=request_id
        )


async def delete_customer_by_id(
    conn: Connection,
    organization_id: UUID,
    environment: str,
    customer_id: UUID,
    *,
    at: datetime,
    request_id: str | None = None,
) -> None:
    """:func:`delete_customer` of the customer whose uuid is ``customer_id``, found in the
    same transaction as the delete, under its row lock. NotFound if there is no such customer."""
    async with conn.transaction():
        identifier = await _lock_by_id(conn, organization_id, environment, customer_id)
        await delete_customer(conn, organization_id, environment, identifier, at=at, request_id=request_id)


# A series is one row per bucket in [from, to], zero-filled, so a chart needs no gap logic.
MAX_SERIES_DAYS = 400
# Days a series may cover: asyncpg sends date.min and date.max as -infinity and infinity (a
# series over them never ends), and a month bucket past 9999-12 overflows.
FIRST_SERIES_DAY, LAST_SERIES_DAY = date(1900, 1, 1), date(9998, 12, 31)
GRANULARITIES = ("day", "week", "month")

SELECT_CUSTOMER_ID = f"SELECT c.id FROM customers c{BY_KEY}"

# The customer's daily rows in range (a primary-key range scan), summed per bucket.
USAGE_SERIES = zero_filled(
    "FROM daily_usage d WHERE d.organization_id = $1 AND d.customer_id = $2 AND d.day BETWEEN $3::date AND $4::date"
)


# The same, of the models named ($6): the customer's per-model rows in range.
USAGE_SERIES_OF_MODELS = zero_filled(
    "FROM daily_model_usage d WHERE d.organization_id = $1 AND d.customer_id = $2"
    " AND d.day BETWEEN $3::date AND $4::date AND d.model = ANY($6::text[])"
)


async def usage_series(
    conn: Connection,
    organization_id: UUID,
    environment: str,
    identifier: str,
    start: date,
    end: date,
    granularity: str = "day",
    *,
    models: tuple[str, ...] = (),
    group_by: str | None = None,
    top: int = DEFAULT_TOP,
) -> str:
    """Usage per bucket from ``start`` to ``end`` inclusive, as a JSON array (text): of the
    ``models`` named (all usage when none); with ``group_by`` (model or provider), the
    buckets with usage per name (service/store/usage.py ``by_dimension``)."""
    if granularity not in GRANULARITIES:
        raise InvalidInput("granularity", f"must be one of {', '.join(GRANULARITIES)}")
    for name, day in (("from", start), ("to", end)):
        if not FIRST_SERIES_DAY <= day <= LAST_SERIES_DAY:
            raise InvalidInput(name, f"must be between {FIRST_SERIES_DAY} and {LAST_SERIES_DAY}")
    if end < start:
        raise InvalidInput("to", "must not be before 'from'")
    if end - start > timedelta(days=MAX_SERIES_DAYS):
        raise InvalidInput("to", f"a series spans at most {MAX_SERIES_DAYS} days")
    if not storable(identifier):
        raise NotFound(f"no customer '{identifier}' in environment '{environment}'")
    customer_id = await conn.fetchval(SELECT_CUSTOMER_ID, organization_id, environment, identifier)
    if customer_id is None:
        raise NotFound(f"no customer '{identifier}' in environment '{environment}'")
    if group_by is not None:
        q = UsageQuery(organization_id, environment, start, end, granularity, (identifier,), models)
        return await by_dimension(conn, q, group_by, top)
    if models:
        of_models: str = await conn.fetchval(
            USAGE_SERIES_OF_MODELS, organization_id, customer_id, start, end, granularity, list(models)
        )
        return of_models
    series: str = await conn.fetchval(USAGE_SERIES, organization_id, customer_id, start, end, granularity)
    return series
