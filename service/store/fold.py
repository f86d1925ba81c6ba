"""The fold: apply changes to the read model exactly once, with a result that does not depend
on the order in which they arrive.

The rules (docs/concepts/order-independence.md; ``tests/test_order_independence.py`` checks them
against a reference model on random histories, orders, batch splits and consumers):

- **Usage** adds its amounts once per dedupe key ``(organization, environment, source, id)``; first_seen is
  the minimum event time, last_active the maximum, each day (of the organization's time zone) counted once.
- **Profile fields** are last-writer-wins per field. Every write carries a version (see
  :func:`version`): the newest event time wins, a tie goes to the greater ``(source, id)``, and
  a ``customer.upserted`` or an API write always beats the name/email *hint* of a usage event.
  A late, older write changes only the fields whose versions are older than its own.
- **Subscriptions** are last-writer-wins by the same versions, per customer and subscription id.
- **A deletion at T is a tombstone**: every event for that customer stamped at or before T is
  stale. Stale events that arrive later are counted and ignored (never dead-lettered); events
  after T (re)create the customer. A deletion that arrives after newer changes were applied
  removes only what it predates: usage is recomputed from the journal (the dedupe table keeps
  each event's time and amounts for the whole retention window, and a deletion older than
  the window is refused), older fields are cleared, older subscriptions dropped. With nothing
  newer than T the customer is removed.
- **API writes** are changes stamped with the time of the request (``service/store/customers.py``).

Before a batch's transaction, a fold analyzes `customers` and `customer_usage` where they have
pages and no statistics yet (:func:`ensure_statistics`; once per table in practice). Then one
transaction per batch, in this order:

1. resolve organizations (a UUID is an id, never a name); refuse unknown ones and events older
   than the retention window;
2. record dedupe keys together with the journal; only events whose key is new apply;
3. make sure a row exists for every customer the new events touch and lock all of them in one
   global order (:func:`lock_customers`). The customer row is the per-customer mutex between
   folds and deletions, also for a customer that does not exist yet: a provisional row,
   inserted here and removed at step 6 if nothing lives in it;
4. read the tombstones — after locking, so a deletion committed before the lock is seen;
5. fold the live changes per customer in memory (:func:`plan`, pure), then write daily rows
   (and per-model daily rows, for events that name a model or provider), aggregates,
   per-field versions, subscriptions and raised tombstones;
6. remove customers with nothing newer than their tombstone, recompute those whose tombstone
   rose past older content, record budget alerts.

Deadlock freedom: dedupe keys and provisional rows are inserted in sorted key order, rows are
locked in ``(organization_id, id)`` order before any is written, and a tombstone is written only
by the holder of its customer's row lock; two folds (or a fold and an API write) wait for each
other but never cycle.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Literal
from uuid import UUID
from zoneinfo import ZoneInfo

import asyncpg

from service.domain.changes import Change, Key
from service.domain.events import Event, Rejection, UsageData, too_old_reason
from service.domain.keys import Organization, check_time_zone
from service.store import failpoints
from service.store.apply import KEYS, apply_changes, by_key_order, has_key
from service.store.auth import resolve_organizations
from service.store.db import Connection, columns

log = logging.getLogger("tally.fold")

Status = Literal["applied", "duplicate", "stale", "rejected"]


@dataclass(frozen=True)
class Outcome:
    """What became of one event; a rejected one says why (``code``) and how (``reason``)."""

    status: Status
    code: Rejection | None = None
    reason: str | None = None


@dataclass(frozen=True)
class FoldResult:
    """One Outcome per event, in the batch's order, and the budget alerts the batch recorded."""

    outcomes: list[Outcome]
    alerts: int = 0


APPLIED = Outcome("applied")
DUPLICATE = Outcome("duplicate")
STALE = Outcome("stale")

# ---- SQL ---------------------------------------------------------------------------------

INSERT_PROCESSED = """
INSERT INTO processed_events (organization_id, environment, source, event_id, event_time, subject, requests,
                              prompt_tokens, completion_tokens, total_tokens, cost, latency, ttft, model, provider)
SELECT * FROM unnest($1::uuid[], $2::text::text[], $3::text::text[], $4::text::text[], $5::timestamptz[],
                     $6::text::text[], $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::text::numeric[],
                     $12::float8[], $13::float8[], $14::text::text[], $15::text::text[])
ON CONFLICT DO NOTHING
RETURNING organization_id, environment, source, event_id
"""

# A customer's row found by its key, one index probe per key, for the two statements below.
# A join of the keys with `customers` would be planned per batch: for a large batch, a hash or
# merge join over the whole table, so that a batch costs as much as the table is large; for a
# small one on a table never analyzed, a probe of any index that leads with (organization_id,
# environment), which reads all of the organization's customers for every key. The subquery
# keeps the lookup a probe per key: its ORDER BY also keeps the planner from merging it into the
# outer query as a join. Which index it probes is decided by the statistics (see
# ensure_statistics) and, where they are missing, by that order (see by_key_order).
# docs/performance.md ("Finding a batch's customers") has the measurements.
FIND_CUSTOMER = f"""
SELECT e.organization_id, e.id FROM customers e
WHERE {has_key("e")}
{by_key_order("e")}
"""

# last_event_at NULL marks the row provisional (the column's default is the insert time, so a
# row written by anything else is never taken for one); it has no usage row until the changes
# applied to it write one with their first values (migration 0015).
# Only the keys no committed row holds are inserted (an existing one is skipped by a plain
# index probe, cheaper than an insert's conflict check: measured 2.7 s of a 21 s fold run).
# A row another transaction is inserting is invisible here and conflicts below: the insert
# waits for that transaction, exactly as if every key were inserted.
INSERT_CUSTOMERS = f"""
INSERT INTO customers (organization_id, environment, customer_identifier, last_event_at)
SELECT k.*, NULL FROM {KEYS} LEFT JOIN LATERAL ({FIND_CUSTOMER}) found ON true
WHERE found.id IS NULL
ON CONFLICT (organization_id, environment, customer_identifier) DO NOTHING
RETURNING organization_id, environment, customer_identifier
"""

# ORDER BY then FOR UPDATE: rows are locked in (organization_id, id) order (the lock node sits
# above the sort). Each row found is joined by its primary key alone: its key as a join clause
# too would let the planner join the keys with the table directly again.
LOCK_CUSTOMERS = f"""
SELECT c.organization_id, c.environment, c.customer_identifier, c.id
FROM {KEYS} CROSS JOIN LATERAL ({FIND_CUSTOMER}) found
JOIN customers c ON c.organization_id = found.organization_id AND c.id = found.id
ORDER BY c.organization_id, c.id
FOR UPDATE OF c
"""


# The tables whose indexes a lookup by key or by id can confuse without statistics (each has
# sort indexes leading with (organization_id, environment) besides its key): those of them with
# no statistics yet (none on the column every lookup leads with), and of those, the ones with
# pages, with their row count as of their last analyze or vacuum (-1: never). Only the
# catalogue is read: no table is scanned for it, and on Citus the coordinator's empty shells
# never qualify. The first is the one every batch runs (0.3 ms here).
LOOKUP_TABLES = ("customers", "customer_usage")
UNANALYZED = """
SELECT t.name FROM unnest($1::text[]) AS t(name)
WHERE NOT EXISTS (SELECT FROM pg_stats s
                  WHERE s.schemaname = current_schema() AND s.tablename = t.name AND s.attname = 'organization_id')
"""
WITH_PAGES = """
SELECT c.relname AS name, c.reltuples FROM pg_class c
WHERE c.oid = ANY($1::text[]::regclass[]) AND pg_relation_size(c.oid) > 0
"""
# An analyze may read up to 30,000 pages of a large table from disk: longer than a statement's
# usual timeout, and worth waiting for once.
ANALYZE_TIMEOUT = 60.0
# Tables an analyze left without statistics, by this process: not tried again, and said once.
# ANALYZE skips a table with a warning, not an error, when tally's role does not own it, or
# (SKIP_LOCKED) while another process holds its lock: then that process's analyze, or
# housekeeping's, gives it statistics.
_left_unanalyzed: set[str] = set()


async def ensure_statistics(conn: Connection) -> list[str]:
    """ANALYZE each of LOOKUP_TABLES that has pages but no statistics yet (a
    new install, or a bulk load: the server's autovacuum may be off, and tally's housekeeping
    analyzes only every 30 s); returns the names of those it gave statistics.

    Without statistics, every index leading with (organization_id, environment) is estimated
    to find one row for a key or an id, and which one a lookup probes comes down to the
    indexes' heights: a fold whose lookups probed customers_sort_period_budget read all of the
    organization's customers for every key (14–32 s a batch of 4,000 events from 17,700
    customers on), and a retrieve by id walked a sort index of `customer_usage` over the
    organization (16 ms at 200,000 customers, 0.8 ms analyzed). With them, those indexes are
    estimated at the whole organization, and the key's or the primary key's wins.

    Best effort: a table another process is analyzing is left to it (SKIP_LOCKED), and an
    analyze that fails or runs past ANALYZE_TIMEOUT is logged and the fold goes on (its
    lookups' order still breaks the planner's tie where the indexes are as tall). Runs in a
    transaction of its own, never inside a fold's: ANALYZE's table lock held until a fold
    commits would order folds against each other's journal inserts."""
    if conn.is_in_transaction():
        return []
    done = []
    for table in await _without_statistics(conn, [t for t in LOOKUP_TABLES if t not in _left_unanalyzed]):
        if table not in LOOKUP_TABLES:  # only names written above reach the SQL
            raise ValueError(table)
        try:
            await conn.execute(f"ANALYZE (SKIP_LOCKED) {table}", timeout=ANALYZE_TIMEOUT)
        except (asyncpg.PostgresError, TimeoutError) as exc:
            log.warning("ANALYZE %s failed, folding without its statistics: %s", table, exc)
            continue
        done.append(table)
    # Still without statistics: skipped, unless the analyze found no live row (reltuples 0: the
    # rows come with a fold's commit, and the next batch analyzes them).
    still = await _without_statistics(conn, done)
    if left := {table for table, rows in still.items() if rows != 0}:
        log.warning(
            "ANALYZE skipped %s (locked by another process, or not owned by tally's role); not retried by this process",
            ", ".join(sorted(left)),
        )
        _left_unanalyzed.update(left)
    return [table for table in done if table not in still]


async def _without_statistics(conn: Connection, tables: list[str]) -> dict[str, float]:
    """Of ``tables``, those with pages and no statistics, with their reltuples."""
    missing = [r["name"] for r in await conn.fetch(UNANALYZED, tables)] if tables else []
    return {r["name"]: r["reltuples"] for r in await conn.fetch(WITH_PAGES, missing)} if missing else {}


# ---- the fold ----------------------------------------------------------------------------


async def fold(
    conn: Connection,
    events: Sequence[Event],
    *,
    retention: timedelta,
    now: datetime | None = None,
) -> FoldResult:
    """Apply ``events`` in one transaction; returns one :class:`Outcome` per event, in order.

    An event applies at most once per (organization, environment, source, id): duplicates within the
    batch, redeliveries and replays come back ``duplicate``; an event at or before a deletion
    of its customer comes back ``stale``. Unknown organizations and events older than
    ``retention`` (whose dedupe record may have been purged) come back ``rejected`` with a
    reason and change nothing. Raises only on database errors, leaving nothing applied: the
    caller retries the whole batch.

    ``now`` is the fold's clock: the retention cutoff and, when given, the instant whose
    budget periods alerts are recorded in (by default the time now, and the transaction's
    time for the periods).
    """
    clock = now
    now = now or datetime.now(UTC)
    await ensure_statistics(conn)
    outcomes: list[Outcome | None] = [None] * len(events)
    alerts = 0
    async with conn.transaction():
        # Plan each statement for this batch's actual arrays and the table's current size:
        # a generic plan cached while the table was small (nested loops over sequential
        # scans) was measured at 70x slower once it had grown.
        await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
        orgs = await resolve_organizations(conn, {e.organization for e in events})
        oldest = now - retention
        # Dedupe keys: (organization, environment, source, id); prod and test never collide.
        fresh: dict[tuple[UUID, str, str, str], tuple[int, Event]] = {}
        for i, e in enumerate(events):
            org = orgs.get(e.organization)
            if org is None:
                reason = f"unknown organization '{e.organization}'"
                outcomes[i] = Outcome("rejected", Rejection.UNKNOWN_ORGANIZATION, reason)
            elif e.time < oldest:
                outcomes[i] = Outcome("rejected", Rejection.TOO_OLD, too_old_reason(retention))
            elif (key := (org.id, e.environment, e.source, e.id)) in fresh:
                outcomes[i] = DUPLICATE
            else:
                fresh[key] = (i, e)

        keys = sorted(fresh)
        journal = columns((_journal_row(k, fresh[k][1]) for k in keys), INSERT_PROCESSED)
        inserted = await conn.fetch(INSERT_PROCESSED, *journal) if keys else []
        new_keys = {(r["organization_id"], r["environment"], r["source"], r["event_id"]) for r in inserted}
        zones = {org.id: zone_of(org) for org in orgs.values()}
        applied: list[tuple[int, Change]] = []
        for key in keys:
            i, e = fresh[key]
            if key in new_keys:
                applied.append((i, Change.of(key[0], e, zones[key[0]])))
            else:
                outcomes[i] = DUPLICATE
        if applied:
            changes = [c for _, c in applied]
            locked = await lock_customers(conn, sorted({c.key for c in changes}))
            # Each organization's local day by this process's clock: the window sums of rows
            # that end on it are added to (recomputed if the database's clock says otherwise).
            wall = datetime.now(UTC)
            today = {org: wall.astimezone(zone).date() for org, zone in zones.items()}
            result = await apply_changes(conn, changes, locked.ids, made=locked.made, now=clock, today=today)
            alerts = result.alerts
            for (i, _), stale in zip(applied, result.stale, strict=True):
                outcomes[i] = STALE if stale else APPLIED
        await failpoints.hit("fold.before_commit")
    return FoldResult([o or DUPLICATE for o in outcomes], alerts)


def zone_of(org: Organization) -> ZoneInfo | timezone:
    """The organization's reporting zone. The database refuses a name PostgreSQL does not
    know and the CLI one Python does not know; a name only PostgreSQL knows (set by hand in
    SQL) counts as UTC, said in the log, rather than stopping the fold."""
    try:
        return check_time_zone(org.time_zone)
    except ValueError:
        log.warning("organization %s: time zone %r unknown to Python; its days are UTC", org.name, org.time_zone)
        return UTC


def _journal_row(key: tuple[UUID, str, str, str], e: Event) -> tuple[object, ...]:
    u = e.data if isinstance(e.data, UsageData) else None
    amounts = (
        (
            *(u.requests, u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cost, u.latency, u.ttft),
            *(u.model, u.provider),
        )
        if u is not None
        else (None,) * 9
    )
    return (*key, e.time, e.subject, *amounts)


@dataclass(frozen=True)
class Locked:
    """The customers a fold holds locked: their ids, and which rows it made (provisional)."""

    ids: dict[Key, UUID]
    made: frozenset[Key]


async def lock_customers(conn: Connection, keys: Sequence[Key]) -> Locked:
    """Make sure each customer in ``keys`` (sorted) has a row and lock every row in
    ``(organization_id, id)`` order. Rows made here are provisional: they hold no change yet
    (``last_event_at`` and usage ``last_active`` NULL) and :func:`apply_changes` removes any
    that receive none."""
    ids: dict[Key, UUID] = {}
    made: set[Key] = set()
    pending = list(keys)
    # A row can vanish between the insert (which saw it) and the lock (which waited for a
    # deleter to commit): insert it again. Each round needs a deletion committed meanwhile.
    while pending:
        arrays = columns(pending, INSERT_CUSTOMERS)  # the same keys for both statements
        for r in await conn.fetch(INSERT_CUSTOMERS, *arrays):
            made.add((r["organization_id"], r["environment"], r["customer_identifier"]))
        for r in await conn.fetch(LOCK_CUSTOMERS, *arrays):
            ids[(r["organization_id"], r["environment"], r["customer_identifier"])] = r["id"]
        pending = [k for k in pending if k not in ids]
    return Locked(ids, frozenset(made))
