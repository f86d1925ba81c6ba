"""Webhook endpoints and deliveries in PostgreSQL (migration 0012).

Materialising. The fold writes nothing for webhooks: :func:`materialize` reads, after the
commit, what the fold already committed — the change log through the change feed's own reader
(service/store/changefeed.py: positions below the snapshot's xmin, so no change is skipped or
read twice), and ``budget_alerts`` and ``budget_recoveries`` (which housekeeping records) by
the id of the transaction that recorded them (read below the xmin alike) — and inserts one
delivery per event in the transaction that moves the endpoint's cursors: each event becomes
exactly one delivery per endpoint. A delivery's body is fixed then, so every attempt sends
(and signs) the same bytes.

Sending. :func:`claim` takes due deliveries with ``FOR UPDATE SKIP LOCKED`` and leases each
one (its ``next_attempt_at`` moves to the lease's end, its ``attempts`` up by one) in a short
transaction of its own, so no transaction stays open while a receiver answers. Another
dispatcher skips a leased delivery until the lease ends, and the lease outlasts an attempt's
timeout: two attempts of one delivery never overlap. An outcome is recorded only by the
attempt that holds the lease (``attempts`` unchanged since the claim). A delivery waits while
an earlier one of the same customer to the same endpoint is pending: in order per customer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import cast
from uuid import UUID

import asyncpg
import orjson

from service.domain.errors import Conflict
from service.domain.webhooks import ALERT_BUDGET, ALERT_BUDGET_RECOVERED, CHANGE_TYPES, CUSTOMER_TYPES, change_event_id
from service.store.alerts import alert_event, recovery_event
from service.store.changefeed import Cursor, FeedPage, read_feed
from service.store.changelog import Position, horizon
from service.store.db import Connection
from service.store.rendering import Shape

# What an endpoint shows (its secret only when created or rotated).
ENDPOINT_COLUMNS = "id, environment, url, events, created_at, failing_since, disabled_at, previous_expires_at"

COUNT_ENDPOINTS = "SELECT count(*) FROM webhook_endpoints WHERE organization_id = $1 AND environment = $2"
# Its cursors start at the horizon: an endpoint gets the events committed after its creation.
INSERT_ENDPOINT = f"""
INSERT INTO webhook_endpoints (organization_id, environment, url, events, secret, changes_xid, alerts_xid)
VALUES ($1, $2, $3, $4, $5, pg_snapshot_xmin(pg_current_snapshot()), pg_snapshot_xmin(pg_current_snapshot()))
RETURNING {ENDPOINT_COLUMNS}
"""
SELECT_ENDPOINTS = f"""
SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints
WHERE organization_id = $1 AND environment = $2 ORDER BY created_at, id
"""
SELECT_ENDPOINT = f"""
SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE organization_id = $1 AND environment = $2 AND id = $3
"""
DELETE_ENDPOINT = "DELETE FROM webhook_endpoints WHERE organization_id = $1 AND environment = $2 AND id = $3"
# The current secret becomes the previous one, signing beside the new one until $5.
ROTATE_SECRET = f"""
UPDATE webhook_endpoints SET previous_secret = secret, secret = $4, previous_expires_at = $5
WHERE organization_id = $1 AND environment = $2 AND id = $3
RETURNING {ENDPOINT_COLUMNS}
"""


async def create_endpoint(
    conn: Connection,
    organization_id: UUID,
    environment: str,
    url: str,
    events: Sequence[str],
    secret: str,
    *,
    most: int,
) -> asyncpg.Record:
    """A new endpoint; Conflict when the environment has ``most`` already (two creations at
    once may both pass the count: the bound is about cost, not exactness)."""
    if await conn.fetchval(COUNT_ENDPOINTS, organization_id, environment) >= most:
        raise Conflict(f"this environment has {most} webhook endpoints already (the most it may have): delete one")
    row = await conn.fetchrow(INSERT_ENDPOINT, organization_id, environment, url, list(events), secret)
    assert row is not None
    return row


async def endpoints(conn: Connection, organization_id: UUID, environment: str) -> list[asyncpg.Record]:
    return list(await conn.fetch(SELECT_ENDPOINTS, organization_id, environment))


async def endpoint(
    conn: Connection, organization_id: UUID, environment: str, endpoint_id: UUID
) -> asyncpg.Record | None:
    return await conn.fetchrow(SELECT_ENDPOINT, organization_id, environment, endpoint_id)


async def delete_endpoint(conn: Connection, organization_id: UUID, environment: str, endpoint_id: UUID) -> bool:
    """Delete an endpoint and its deliveries; False if there was none."""
    return str(await conn.execute(DELETE_ENDPOINT, organization_id, environment, endpoint_id)) != "DELETE 0"


async def rotate_secret(
    conn: Connection, organization_id: UUID, environment: str, endpoint_id: UUID, secret: str, overlap_until: datetime
) -> asyncpg.Record | None:
    return await conn.fetchrow(ROTATE_SECRET, organization_id, environment, endpoint_id, secret, overlap_until)


# ---- the delivery log --------------------------------------------------------------------------

SELECT_DELIVERIES = """
SELECT id, event_id, event_type, state AS status, attempts, created_at, next_attempt_at, give_up_at, last_attempt_at,
       last_status_code, last_error, delivered_at
FROM webhook_deliveries
WHERE endpoint_id = $1 AND organization_id = $2 AND ($3::int8 IS NULL OR id < $3)
  AND ($4::text IS NULL OR state = $4)
ORDER BY id DESC
LIMIT $5
"""


async def deliveries(
    conn: Connection, organization_id: UUID, endpoint_id: UUID, before: int | None, status: str | None, limit: int
) -> list[asyncpg.Record]:
    """Up to ``limit`` deliveries of the endpoint, newest first, below the id ``before``."""
    return list(await conn.fetch(SELECT_DELIVERIES, endpoint_id, organization_id, before, status, limit))


# A redelivered delivery is pending again at once, retried for a new period; it keeps its
# place (its id) among the customer's deliveries.
REDELIVER = """
UPDATE webhook_deliveries SET state = 'pending', next_attempt_at = $3, give_up_at = $4
WHERE organization_id = $2 AND (endpoint_id, id) IN (
    SELECT endpoint_id, id FROM webhook_deliveries
    WHERE endpoint_id = $1 AND organization_id = $2 AND ($5::int8 IS NULL OR id = $5)
      AND ($6::timestamptz IS NULL OR created_at >= $6) AND ($7::timestamptz IS NULL OR created_at < $7)
      AND state <> 'pending'
    ORDER BY id
    LIMIT $8
)
"""


async def redeliver(
    conn: Connection,
    organization_id: UUID,
    endpoint_id: UUID,
    now: datetime,
    give_up_at: datetime,
    *,
    delivery_id: int | None = None,
    created_from: datetime | None = None,
    created_to: datetime | None = None,
    most: int = 1,
) -> int:
    """Make finished deliveries (the one ``delivery_id``, or those created in the range) pending
    again, at most ``most`` of them, oldest first; how many."""
    status = await conn.execute(
        REDELIVER, endpoint_id, organization_id, now, give_up_at, delivery_id, created_from, created_to, most
    )
    return int(str(status).rsplit(" ", 1)[-1])


DELIVERY_EXISTS = """
SELECT EXISTS (SELECT 1 FROM webhook_deliveries WHERE endpoint_id = $1 AND organization_id = $2 AND id = $3)
"""


async def delivery_exists(conn: Connection, organization_id: UUID, endpoint_id: UUID, delivery_id: int) -> bool:
    return bool(await conn.fetchval(DELIVERY_EXISTS, endpoint_id, organization_id, delivery_id))


# ---- materialising -----------------------------------------------------------------------------

# Endpoints with something to materialise: a change-log row after their cursor (the oldest,
# ``first``), or an alert or a recovery recorded by a transaction at or after theirs (a row not yet below the
# horizon counts too: the next round takes it) — unless the endpoint has $1 deliveries pending
# already and its oldest change not yet made was logged after $2: a receiver slower than the
# changes gets deliveries made as it takes them, not the whole backlog at once (writes
# competing with the fold for nothing: they wait all the same); a backlog older than $2 is made
# at once, so that the change log's retention never runs out under it.
ENDPOINTS_WITH_WORK = """
SELECT e.organization_id, e.id FROM webhook_endpoints e
LEFT JOIN LATERAL (
    SELECT c.changed_at FROM customer_changes c
    WHERE c.organization_id = e.organization_id AND c.environment = e.environment
      AND (c.xid, c.seq) > (e.changes_xid, e.changes_seq - (e.changes_given > 0)::int)
    ORDER BY c.xid, c.seq LIMIT 1
) first ON true
WHERE e.disabled_at IS NULL
  AND (first.changed_at IS NOT NULL
       OR EXISTS (SELECT 1 FROM budget_alerts a WHERE a.organization_id = e.organization_id AND a.xid >= e.alerts_xid)
       OR EXISTS (SELECT 1 FROM budget_recoveries r
                  WHERE r.organization_id = e.organization_id AND r.xid >= e.alerts_xid))
  AND ((SELECT count(*) FROM (
            SELECT 1 FROM webhook_deliveries d
            WHERE d.organization_id = e.organization_id AND d.endpoint_id = e.id AND d.state = 'pending'
            LIMIT $1) p) < $1
       OR first.changed_at < $2)
"""

# SKIP LOCKED: another dispatcher materialising this endpoint now has it; this one moves on.
LOCK_ENDPOINT = """
SELECT environment, events, changes_xid::text AS changes_xid, changes_seq, changes_given, alerts_xid::text AS alerts_xid
FROM webhook_endpoints WHERE organization_id = $1 AND id = $2 AND disabled_at IS NULL
FOR UPDATE SKIP LOCKED
"""

# Alerts and recoveries (``recovered``) of the scope recorded by transactions from $3 on and
# below the horizon, in the order of their transactions (and, with $5, those of the transaction
# $5 only), with the horizon.
READ_ALERTS = """
WITH h AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin)
SELECT h.xmin::text AS horizon, a.* FROM h LEFT JOIN LATERAL (
    SELECT a.recovered, a.organization_id, a.customer_id, a.threshold, a.period_start, a.period_end, a.budget,
           a.usage, a.crossed_at, a.current_start, a.current_end, a.xid::text AS xid, c.customer_identifier,
           c.environment, c.budget_duration
    FROM (
        SELECT false AS recovered, organization_id, customer_id, threshold, period_start, period_end, budget, usage,
               crossed_at, NULL::timestamptz AS current_start, NULL::timestamptz AS current_end, xid
        FROM budget_alerts
        WHERE organization_id = $1 AND xid >= $3::text::xid8 AND xid < h.xmin
          AND ($5::text IS NULL OR xid = $5::text::xid8)
        UNION ALL
        SELECT true, organization_id, customer_id, threshold, period_start, period_end, budget, usage,
               recorded_at, current_start, current_end, xid
        FROM budget_recoveries
        WHERE organization_id = $1 AND xid >= $3::text::xid8 AND xid < h.xmin
          AND ($5::text IS NULL OR xid = $5::text::xid8)
    ) a
    JOIN customers c ON c.organization_id = a.organization_id AND c.id = a.customer_id
    WHERE c.environment = $2
    ORDER BY a.xid, a.recovered, a.customer_id, a.threshold, a.period_start
    LIMIT $4
) a ON true
"""

# ON CONFLICT: an event already materialised for the endpoint is not again (a redelivered
# alert read, or a cursor moved back by hand); ids follow the order given.
INSERT_DELIVERIES = """
INSERT INTO webhook_deliveries (organization_id, endpoint_id, event_id, event_type, customer_id, body, created_at,
                                next_attempt_at, give_up_at)
SELECT $1, $2, u.event_id, u.event_type, u.customer_id, u.body, $7, $7, $8
FROM unnest($3::text[], $4::text[], $5::uuid[], $6::text[])
     WITH ORDINALITY AS u(event_id, event_type, customer_id, body, n)
ORDER BY u.n
ON CONFLICT (endpoint_id, event_id) DO NOTHING
"""

MOVE_CURSORS = """
UPDATE webhook_endpoints SET changes_xid = $3::text::xid8, changes_seq = $4, changes_given = $5,
                             alerts_xid = $6::text::xid8
WHERE organization_id = $1 AND id = $2
"""


@dataclass(frozen=True)
class Materialized:
    deliveries: int  # inserted
    more: bool  # the round stopped at its limit: more is there now
    too_old: bool  # changes after the endpoint's cursor were purged from the change log


@dataclass(frozen=True)
class Event:
    event_id: str
    event_type: str
    customer_id: UUID
    body: str


# A change's event id and body, built once per dispatcher turn for all the endpoints that take
# it (the same for each: a receiver dedupes on the id), keyed by organization, environment and
# cursor; with the customer document they were built from (a page read again may show newer).
Rendered = dict[tuple[UUID, str, str], tuple[str | None, str, str]]


def event_body(
    event_id: str, event_type: str, created_at: datetime, organization_id: UUID, environment: str, data: bytes
) -> bytes:
    """A delivery's JSON body; ``data`` (JSON, a customer rendered by PostgreSQL) is spliced unparsed."""
    head = orjson.dumps(
        {
            "id": event_id,
            "type": event_type,
            "created_at": created_at,
            "organization_id": str(organization_id),
            "environment": environment,
        }
    )
    return head[:-1] + b',"data":' + data + b"}"


async def endpoints_with_work(conn: Connection, ahead: int, young_since: datetime) -> list[tuple[UUID, UUID]]:
    """Endpoints with events to make into deliveries, but those with ``ahead`` deliveries
    pending whose backlog logged after ``young_since`` (see ENDPOINTS_WITH_WORK)."""
    return [(r["organization_id"], r["id"]) for r in await conn.fetch(ENDPOINTS_WITH_WORK, ahead, young_since)]


async def materialize(
    conn: Connection,
    organization_id: UUID,
    endpoint_id: UUID,
    shape: Shape,
    now: datetime,
    give_up_at: datetime,
    *,
    limit: int,
    pages: dict[tuple[UUID, str], tuple[Cursor, FeedPage]] | None = None,
    rendered: Rendered | None = None,
) -> Materialized:
    """Turn the endpoint's events committed since its cursors into deliveries (at most about
    ``limit`` changes and ``limit`` alerts), and move the cursors past them, in one
    transaction. A change whose customer is deleted since is left to the deletion's own change
    (the customer is no longer there to show); a customer's updates in one round are one
    delivery. Nothing when another dispatcher holds the endpoint.

    ``pages``: the feed page this round read for the organization and environment, and the
    cursor it was read after. An endpoint whose cursor lies inside that page takes the page's
    changes after its cursor rather than reading and rendering them again: endpoints of one
    environment stand close together (their cursors differ by the dispatcher's own
    transactions), so a round reads the feed once per environment, not once per endpoint.
    Every change of the page committed below its read's horizon, and shows the customer as
    read after the commit, so the page is as true for the later endpoint as for the first."""
    async with conn.transaction():
        endpoint = await conn.fetchrow(LOCK_ENDPOINT, organization_id, endpoint_id)
        if endpoint is None:
            return Materialized(0, False, False)
        environment, subscribed = endpoint["environment"], frozenset(endpoint["events"])
        events: list[Event] = []
        cursor = Cursor(Position(int(endpoint["changes_xid"]), endpoint["changes_seq"]), endpoint["changes_given"])
        if subscribed & CUSTOMER_TYPES:
            page = _shared_page(pages, (organization_id, environment), cursor)
            if page is None:
                page = await read_feed(conn, organization_id, environment, cursor, limit, shape)
                if pages is not None and not page.too_old:
                    pages.setdefault((organization_id, environment), (cursor, page))
        else:  # nothing of the change log is sent: the cursor moves to the horizon
            page = FeedPage([], Cursor(max(cursor.floor, await horizon(conn))), False, False)
        # An update shows the customer as read now, so the page's last update of a customer
        # says all its earlier ones do: they are coalesced into it (under a backlog, a busy
        # customer's updates cost one delivery per round, not one per commit).
        last_update = {c.customer_id: i for i, c in enumerate(page.changes) if c.kind == "u"}
        for i, change in enumerate(page.changes):
            if change.kind == "d" and change.logged != "d":
                continue  # deleted since: its deletion follows in the log
            if change.kind == "u" and last_update[change.customer_id] != i:
                continue
            event_type = CHANGE_TYPES[change.kind]
            if event_type not in subscribed:
                continue
            key = (organization_id, environment, str(change.cursor))
            done = rendered.get(key) if rendered is not None else None
            if done is not None and done[0] is change.doc:
                event_id, body = done[1], done[2]
            else:
                event_id = change_event_id(organization_id, environment, key[2])
                if change.doc is None:
                    data = orjson.dumps(
                        {"id": str(change.customer_id), "customer_identifier": change.customer_identifier}
                    )
                else:
                    data = change.doc.encode()
                body = event_body(event_id, event_type, change.changed_at, organization_id, environment, data).decode()
                if rendered is not None:
                    rendered[key] = (change.doc, event_id, body)
            events.append(Event(event_id, event_type, change.customer_id, body))
        alerts, alerts_next, alerts_more = await _alerts(
            conn, organization_id, environment, endpoint["alerts_xid"], limit
        )
        for row in alerts:
            if row["recovered"]:
                event_type, alert = ALERT_BUDGET_RECOVERED, recovery_event(row)
            else:
                event_type, alert = ALERT_BUDGET, alert_event(row)
            if event_type not in subscribed:
                continue
            about = {"customer_id": str(row["customer_id"]), "customer_identifier": row["customer_identifier"]}
            about |= cast(dict[str, object], alert["data"])
            at = row["period_end"] if row["recovered"] else row["crossed_at"]
            alert_body = event_body(str(alert["id"]), event_type, at, organization_id, environment, orjson.dumps(about))
            events.append(Event(str(alert["id"]), event_type, row["customer_id"], alert_body.decode()))
        inserted = 0
        if events:
            status = await conn.execute(
                INSERT_DELIVERIES,
                organization_id,
                endpoint_id,
                [e.event_id for e in events],
                [e.event_type for e in events],
                [e.customer_id for e in events],
                [e.body for e in events],
                now,
                give_up_at,
            )
            inserted = int(str(status).rsplit(" ", 1)[-1])
        nxt = page.next
        await conn.execute(
            MOVE_CURSORS, organization_id, endpoint_id, str(nxt.position.xid), nxt.position.seq, nxt.given, alerts_next
        )
    return Materialized(inserted, page.more or alerts_more, page.too_old)


def _shared_page(
    pages: dict[tuple[UUID, str], tuple[Cursor, FeedPage]] | None, scope: tuple[UUID, str], cursor: Cursor
) -> FeedPage | None:
    """The round's page of ``scope`` seen from ``cursor``: its changes after the cursor, when
    the cursor lies between where the page was read from and where it ends; else None."""
    if pages is None or scope not in pages:
        return None
    start, page = pages[scope]
    if not start.order() <= cursor.order() <= page.next.order():
        return None
    after = [c for c in page.changes if c.cursor.order() > cursor.order()]
    return FeedPage(after, page.next, page.more, page.too_old)


async def _alerts(
    conn: Connection, organization_id: UUID, environment: str, after: str, limit: int
) -> tuple[list[asyncpg.Record], str, bool]:
    """Alerts recorded by transactions from ``after`` on and below the horizon — up to
    ``limit``, then the rest of the last transaction's — where the next read starts, and
    whether the limit cut them short."""
    rows = await conn.fetch(READ_ALERTS, organization_id, environment, after, limit, None)
    found = [r for r in rows if r["xid"] is not None]
    if len(found) < limit:
        return found, max(after, rows[0]["horizon"], key=int), False
    # Cut at the limit: the last transaction's alerts are taken whole, and the next read
    # starts after it (an alert is read once: a transaction's alerts all commit together).
    last = found[-1]["xid"]
    whole = await conn.fetch(READ_ALERTS, organization_id, environment, last, 2**31 - 1, last)
    return [r for r in found if r["xid"] != last] + list(whole), str(int(last) + 1), True


# ---- sending -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    organization_id: UUID
    endpoint_id: UUID
    delivery_id: int
    attempt: int  # the attempts count this claim set: the outcome is recorded only while it holds
    event_type: str
    body: bytes
    url: str
    signing: tuple[str, ...]  # the secrets that sign it: the current one, and the previous while it overlaps


# Due deliveries of enabled endpoints, none of which waits on an earlier pending delivery of
# its customer to its endpoint, leased until $3 in the claim's own short transaction.
CLAIM = """
WITH due AS (
    SELECT d.endpoint_id, d.id FROM webhook_deliveries d
    JOIN webhook_endpoints e ON e.organization_id = d.organization_id AND e.id = d.endpoint_id
    WHERE d.state = 'pending' AND d.next_attempt_at <= $1 AND e.disabled_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p
                      WHERE p.endpoint_id = d.endpoint_id AND p.customer_id = d.customer_id
                        AND p.state = 'pending' AND p.id < d.id)
    ORDER BY d.next_attempt_at, d.id
    LIMIT $2
    FOR UPDATE OF d SKIP LOCKED
)
UPDATE webhook_deliveries d SET next_attempt_at = $3, attempts = d.attempts + 1, last_attempt_at = $1
FROM due, webhook_endpoints e
WHERE d.endpoint_id = due.endpoint_id AND d.id = due.id AND e.organization_id = d.organization_id
  AND e.id = d.endpoint_id
RETURNING d.organization_id, d.endpoint_id, d.id, d.attempts, d.event_type, d.body, e.url, e.secret,
          CASE WHEN e.previous_expires_at > $1 THEN e.previous_secret END AS previous_secret
"""


async def claim(conn: Connection, now: datetime, lease_until: datetime, limit: int) -> list[Claimed]:
    """Lease up to ``limit`` due deliveries until ``lease_until``, oldest due first."""
    rows = await conn.fetch(CLAIM, now, limit, lease_until)
    return sorted(
        (
            Claimed(
                r["organization_id"],
                r["endpoint_id"],
                r["id"],
                r["attempts"],
                r["event_type"],
                r["body"].encode(),
                r["url"],
                (r["secret"], r["previous_secret"]) if r["previous_secret"] else (r["secret"],),
            )
            for r in rows
        ),
        key=lambda c: c.delivery_id,
    )


RECORD_SUCCESS = """
WITH d AS (
    UPDATE webhook_deliveries SET state = 'delivered', delivered_at = $5, next_attempt_at = $5,
                                  last_status_code = $6, last_error = NULL
    WHERE organization_id = $1 AND endpoint_id = $2 AND id = $3 AND attempts = $4 AND state = 'pending'
    RETURNING endpoint_id
)
UPDATE webhook_endpoints e SET failing_since = NULL
FROM d WHERE e.organization_id = $1 AND e.id = d.endpoint_id AND e.failing_since IS NOT NULL
"""

# A failed attempt: retried at $6 unless the delivery's time is up ($5 past give_up_at); the
# endpoint failing since its first failure after a success, disabled once that is before $9.
RECORD_FAILURE = """
WITH d AS (
    UPDATE webhook_deliveries SET state = CASE WHEN $5 >= give_up_at THEN 'failed' ELSE 'pending' END,
                                  next_attempt_at = $6, last_status_code = $7, last_error = $8
    WHERE organization_id = $1 AND endpoint_id = $2 AND id = $3 AND attempts = $4 AND state = 'pending'
    RETURNING endpoint_id, state
), e AS (
    UPDATE webhook_endpoints e SET failing_since = coalesce(e.failing_since, $5),
        disabled_at = CASE WHEN e.disabled_at IS NULL AND coalesce(e.failing_since, $5) <= $9 THEN $5
                           ELSE e.disabled_at END
    FROM d WHERE e.organization_id = $1 AND e.id = d.endpoint_id
    RETURNING e.disabled_at = $5 AS disabled_now
)
SELECT d.state, coalesce((SELECT disabled_now FROM e), false) AS disabled_now FROM d
"""


async def record_success(conn: Connection, claimed: Claimed, now: datetime, status_code: int) -> None:
    c = claimed
    await conn.execute(RECORD_SUCCESS, c.organization_id, c.endpoint_id, c.delivery_id, c.attempt, now, status_code)


@dataclass(frozen=True)
class Failure:
    gave_up: bool  # the delivery's retry period is over: it failed for good
    disabled: bool  # this failure disabled the endpoint


async def record_failure(
    conn: Connection,
    claimed: Claimed,
    now: datetime,
    retry_at: datetime,
    status_code: int | None,
    error: str,
    disable_if_failing_since: datetime,
) -> Failure:
    """Record a failed attempt (nothing if the lease was lost to another attempt)."""
    async with conn.transaction():
        row = await conn.fetchrow(
            RECORD_FAILURE,
            claimed.organization_id,
            claimed.endpoint_id,
            claimed.delivery_id,
            claimed.attempt,
            now,
            retry_at,
            status_code,
            error[:500],
            disable_if_failing_since,
        )
    if row is None:
        return Failure(False, False)
    return Failure(row["state"] == "failed", bool(row["disabled_now"]))


# ---- what operators watch ----------------------------------------------------------------------

# The oldest pending delivery of an enabled endpoint, and the endpoints disabled.
BACKLOG = """
SELECT (SELECT min(d.created_at) FROM webhook_deliveries d
        JOIN webhook_endpoints e ON e.organization_id = d.organization_id AND e.id = d.endpoint_id
        WHERE d.state = 'pending' AND e.disabled_at IS NULL) AS oldest,
       (SELECT count(*) FROM webhook_endpoints WHERE disabled_at IS NOT NULL) AS disabled
"""


async def backlog(conn: Connection) -> tuple[datetime | None, int]:
    row = await conn.fetchrow(BACKLOG)
    assert row is not None
    return row["oldest"], int(row["disabled"])


PURGE_FINISHED = """
DELETE FROM webhook_deliveries WHERE (endpoint_id, id) IN (
    SELECT endpoint_id, id FROM webhook_deliveries WHERE state <> 'pending' AND created_at < $1 LIMIT $2)
"""


async def purge_finished(conn: Connection, before: datetime, *, chunk: int = 10_000) -> int:
    """Forget delivered and failed deliveries created before ``before``, in chunks; how many."""
    total = 0
    while True:
        deleted = int(str(await conn.execute(PURGE_FINISHED, before, chunk)).rsplit(" ", 1)[-1])
        total += deleted
        if deleted < chunk:
            return total
