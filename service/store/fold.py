"""The fold: apply changes to the read model exactly once, with a result that does not depend
on the order in which they arrive.

The rules (DESIGN.md, "Order independence"; ``tests/test_order_independence.py`` checks them
against a reference model on random histories, orders, batch splits and consumers):

- **Usage** adds its amounts once per dedupe key ``(organization, environment, source, id)``; first_seen is
  the minimum event time, last_active the maximum, each UTC day counted once.
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

One transaction per batch, in this order:

1. resolve organizations (a UUID is an id, never a name); refuse unknown ones and events older
   than the retention window;
2. record dedupe keys together with the journal; only events whose key is new apply;
3. make sure a row exists for every customer the new events touch and lock all of them in one
   global order (:func:`lock_customers`). The customer row is the per-customer mutex between
   folds and deletions, also for a customer that does not exist yet: a provisional row,
   inserted here and removed at step 6 if nothing lives in it;
4. read the tombstones — after locking, so a deletion committed before the lock is seen;
5. fold the live changes per customer in memory (:func:`plan`, pure), then write daily rows,
   aggregates, per-field versions, subscriptions and raised tombstones;
6. remove customers with nothing newer than their tombstone, recompute those whose tombstone
   rose past older content, record budget alerts.

Deadlock freedom: dedupe keys and provisional rows are inserted in sorted key order, rows are
locked in ``(organization_id, id)`` order before any is written, and a tombstone is written only
by the holder of its customer's row lock; two folds (or a fold and an API write) wait for each
other but never cycle.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal
from uuid import UUID

import orjson

from service.domain.changes import HINT_COLUMNS, Change, Delta, Key, plan
from service.domain.events import Event, Rejection, UsageData, too_old_reason
from service.domain.vocabulary import PROFILE_COLUMNS
from service.store import failpoints
from service.store.auth import resolve_organizations
from service.store.db import Connection

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

# What a field goes back to when the write that set it is undone by a later-arriving deletion.
_RESET = {"status": "'active'", "metadata": "'{}'::jsonb"}


def _patch_value(column: str) -> str:
    kind = PROFILE_COLUMNS[column]
    if kind == "jsonb":
        return f"u.patch->'{column}'"
    if kind == "text":
        return f"u.patch->>'{column}'"
    return f"(u.patch->>'{column}')::{kind}"


def _newer(column: str) -> str:
    return f"(u.versions->>'{column}') COLLATE \"C\" > coalesce(c.profile_versions->>'{column}', '') COLLATE \"C\""


INSERT_PROCESSED = """
INSERT INTO processed_events (organization_id, environment, source, event_id, event_time, subject, requests,
                              prompt_tokens, completion_tokens, total_tokens, cost, latency, ttft)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[], $7::int8[],
                     $8::int8[], $9::int8[], $10::int8[], $11::numeric[], $12::float8[], $13::float8[])
ON CONFLICT DO NOTHING
RETURNING organization_id, environment, source, event_id
"""

# last_event_at NULL (with an empty usage row, made by the insert trigger) marks the row
# provisional (the column's default is the insert time, so a row written by anything else is
# never taken for one).
# Only the keys no committed row holds are inserted (an existing one is skipped by a plain
# index probe, cheaper than an insert's conflict check: measured 2.7 s of a 21 s fold run).
# A row another transaction is inserting is invisible here and conflicts below: the insert
# waits for that transaction, exactly as if every key were inserted.
INSERT_CUSTOMERS = """
INSERT INTO customers (organization_id, environment, customer_identifier, last_event_at)
SELECT k.*, NULL FROM unnest($1::uuid[], $2::text[], $3::text[]) AS k(organization_id, environment, customer_identifier)
WHERE NOT EXISTS (
    SELECT 1 FROM customers c WHERE c.organization_id = k.organization_id AND c.environment = k.environment
    AND c.customer_identifier = k.customer_identifier)
ON CONFLICT (organization_id, environment, customer_identifier) DO NOTHING
RETURNING organization_id, environment, customer_identifier
"""

# ORDER BY then FOR UPDATE: rows are locked in key order (the lock node sits above the sort).
LOCK_CUSTOMERS = """
SELECT c.organization_id, c.environment, c.customer_identifier, c.id
FROM customers c
JOIN unnest($1::uuid[], $2::text[], $3::text[]) AS k(organization_id, environment, customer_identifier)
  ON c.organization_id = k.organization_id AND c.environment = k.environment
 AND c.customer_identifier = k.customer_identifier
ORDER BY c.organization_id, c.id
FOR UPDATE OF c
"""

SELECT_TOMBSTONES = """
SELECT t.organization_id, t.environment, t.customer_identifier, t.deleted_at
FROM customer_tombstones t
JOIN unnest($1::uuid[], $2::text[], $3::text[]) AS k(organization_id, environment, customer_identifier)
  ON t.organization_id = k.organization_id AND t.environment = k.environment
 AND t.customer_identifier = k.customer_identifier
"""

UPSERT_TOMBSTONES = """
INSERT INTO customer_tombstones AS t (organization_id, environment, customer_identifier, deleted_at)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[])
ON CONFLICT (organization_id, environment, customer_identifier)
DO UPDATE SET deleted_at = greatest(t.deleted_at, excluded.deleted_at)
"""

UPSERT_DAILY = """
INSERT INTO daily_usage AS d (organization_id, customer_id, day, requests, prompt_tokens, completion_tokens,
                              total_tokens, cost, latency_sum, latency_count, ttft_sum, ttft_count)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::date[], $4::int8[], $5::int8[], $6::int8[], $7::int8[],
                     $8::numeric[], $9::float8[], $10::int8[], $11::float8[], $12::int8[])
ON CONFLICT (organization_id, customer_id, day) DO UPDATE SET
    requests = d.requests + excluded.requests,
    prompt_tokens = d.prompt_tokens + excluded.prompt_tokens,
    completion_tokens = d.completion_tokens + excluded.completion_tokens,
    total_tokens = d.total_tokens + excluded.total_tokens,
    cost = d.cost + excluded.cost,
    latency_sum = d.latency_sum + excluded.latency_sum,
    latency_count = d.latency_count + excluded.latency_count,
    ttft_sum = d.ttft_sum + excluded.ttft_sum,
    ttft_count = d.ttft_count + excluded.ttft_count
RETURNING customer_id, (xmax = 0) AS inserted
"""

# Usage goes to customer_usage (migration 0007): its own narrow row and sort indexes.
UPDATE_USAGE = """
UPDATE customer_usage c SET
    number_of_requests = c.number_of_requests + u.requests,
    prompt_tokens = c.prompt_tokens + u.prompt_tokens,
    completion_tokens = c.completion_tokens + u.completion_tokens,
    total_tokens = c.total_tokens + u.total_tokens,
    total_cost = c.total_cost + u.cost,
    latency_sum = c.latency_sum + u.latency_sum,
    latency_count = c.latency_count + u.latency_count,
    ttft_sum = c.ttft_sum + u.ttft_sum,
    ttft_count = c.ttft_count + u.ttft_count,
    first_seen = least(c.first_seen, u.first_seen),
    last_active = greatest(c.last_active, u.last_active),
    active_days = c.active_days + u.new_days
FROM unnest($1::uuid[], $2::uuid[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::numeric[], $8::float8[],
            $9::int8[], $10::float8[], $11::int8[], $12::timestamptz[], $13::timestamptz[], $14::int4[])
     AS u(organization_id, id, requests, prompt_tokens, completion_tokens, total_tokens, cost, latency_sum,
          latency_count, ttft_sum, ttft_count, first_seen, last_active, new_days)
WHERE c.organization_id = u.organization_id AND c.id = u.id
"""

# Profile fields, hints and the time of the newest profile or subscription change: only for
# the customers whose batch holds one (a usage-only batch does not touch customers at all).
_FIELD_SETS = ",\n    ".join(
    f"{col} = CASE WHEN {_newer(col)} THEN {_patch_value(col)} ELSE c.{col} END" for col in PROFILE_COLUMNS
)
_MERGED = "tally_merge_versions(c.profile_versions, u.versions)"
UPDATE_PROFILES = f"""
UPDATE customers c SET
    {_FIELD_SETS},
    profile_versions = CASE WHEN u.versions IS NULL THEN c.profile_versions ELSE {_MERGED} END,
    profile_hints = CASE WHEN u.hints IS NULL THEN c.profile_hints ELSE tally_merge_hints(c.profile_hints, u.hints) END,
    last_event_at = greatest(c.last_event_at, u.last_event_at),
    updated_at = CASE WHEN u.versions IS NOT NULL AND {_MERGED} <> c.profile_versions THEN now() ELSE c.updated_at END
FROM (
    -- Patches travel as JSON text: the fold must not depend on a connection's jsonb codec.
    SELECT k.*, k.patch_json::jsonb AS patch, k.versions_json::jsonb AS versions, k.hints_json::jsonb AS hints
    FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::timestamptz[])
         AS k(organization_id, id, patch_json, versions_json, hints_json, last_event_at)
) u
WHERE c.organization_id = u.organization_id AND c.id = u.id
"""

UPSERT_SUBSCRIPTIONS = """
INSERT INTO subscriptions AS s (organization_id, customer_id, id, status, current_period_start, current_period_end,
                                plan_stripe_price_id, plan_name, plan_amount, plan_currency, plan_interval,
                                source_time, source_version)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[],
                     $7::text[], $8::text[], $9::int8[], $10::text[], $11::text[], $12::timestamptz[], $13::text[])
ON CONFLICT (organization_id, customer_id, id) DO UPDATE SET
    status = excluded.status,
    current_period_start = excluded.current_period_start,
    current_period_end = excluded.current_period_end,
    plan_stripe_price_id = excluded.plan_stripe_price_id,
    plan_name = excluded.plan_name,
    plan_amount = excluded.plan_amount,
    plan_currency = excluded.plan_currency,
    plan_interval = excluded.plan_interval,
    source_time = excluded.source_time,
    source_version = excluded.source_version,
    updated_at = now()
WHERE coalesce(s.source_version, '') COLLATE "C" < excluded.source_version COLLATE "C"
"""

# A customer lives while something newer than its tombstone was applied to it: a profile or
# subscription change (last_event_at) or usage (last_active). A provisional row (step 3) that
# received nothing has neither and goes too.
REMOVE_DEAD = """
DELETE FROM customers c
USING unnest($1::uuid[], $2::uuid[], $3::timestamptz[]) AS k(organization_id, id, deleted_at), customer_usage u
WHERE c.organization_id = k.organization_id AND c.id = k.id AND u.organization_id = k.organization_id AND u.id = k.id
  AND (greatest(c.last_event_at, u.last_active) IS NULL OR greatest(c.last_event_at, u.last_active) <= k.deleted_at)
RETURNING c.organization_id, c.id
"""

# A tombstone rose past older content of a customer that lives on: rebuild its usage from the
# journal rows after the tombstone (every one of them is inside the retention window).
CLEAR_DAILY = """
DELETE FROM daily_usage d USING unnest($1::uuid[], $2::uuid[]) AS k(organization_id, id)
WHERE d.organization_id = k.organization_id AND d.customer_id = k.id
"""

_JOURNAL_SINCE = """
p.organization_id = k.organization_id AND p.event_time > k.deleted_at
AND p.environment = k.environment AND p.subject = k.customer_identifier AND p.requests IS NOT NULL
"""

REBUILD_DAILY = f"""
INSERT INTO daily_usage (organization_id, customer_id, day, requests, prompt_tokens, completion_tokens,
                         total_tokens, cost, latency_sum, latency_count, ttft_sum, ttft_count)
SELECT k.organization_id, k.id, (p.event_time AT TIME ZONE 'UTC')::date, sum(p.requests), sum(p.prompt_tokens),
       sum(p.completion_tokens), sum(p.total_tokens), sum(p.cost), coalesce(sum(p.latency), 0), count(p.latency),
       coalesce(sum(p.ttft), 0), count(p.ttft)
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[])
     AS k(organization_id, id, environment, customer_identifier, deleted_at)
JOIN processed_events p ON {_JOURNAL_SINCE}
GROUP BY 1, 2, 3
"""

# An undone field falls back to the newest hint that the tombstone leaves (h.hints), else to
# its default.
_RESETS = ",\n    ".join(
    f"{col} = CASE WHEN tally_version_micros(c.profile_versions->>'{col}') <= tally_micros(k.deleted_at)"
    f" THEN {_RESET.get(col, f'h.hints->{chr(39)}{col}{chr(39)}->>1' if col in HINT_COLUMNS else 'NULL')}"
    f" ELSE c.{col} END"
    for col in PROFILE_COLUMNS
)
RECOMPUTE_USAGE = f"""
UPDATE customer_usage c SET
    number_of_requests = coalesce(s.requests, 0),
    prompt_tokens = coalesce(s.prompt_tokens, 0),
    completion_tokens = coalesce(s.completion_tokens, 0),
    total_tokens = coalesce(s.total_tokens, 0),
    total_cost = coalesce(s.cost, 0),
    latency_sum = coalesce(s.latency_sum, 0),
    latency_count = coalesce(s.latency_count, 0),
    ttft_sum = coalesce(s.ttft_sum, 0),
    ttft_count = coalesce(s.ttft_count, 0),
    first_seen = s.first_seen,
    last_active = s.last_active,
    active_days = s.days
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[])
     AS k(organization_id, id, environment, customer_identifier, deleted_at)
CROSS JOIN LATERAL (
    SELECT sum(p.requests) AS requests, sum(p.prompt_tokens) AS prompt_tokens,
           sum(p.completion_tokens) AS completion_tokens, sum(p.total_tokens) AS total_tokens, sum(p.cost) AS cost,
           sum(p.latency) AS latency_sum, count(p.latency) AS latency_count, sum(p.ttft) AS ttft_sum,
           count(p.ttft) AS ttft_count, min(p.event_time) AS first_seen, max(p.event_time) AS last_active,
           count(DISTINCT (p.event_time AT TIME ZONE 'UTC')::date) AS days
    FROM processed_events p WHERE {_JOURNAL_SINCE}
) s
WHERE c.organization_id = k.organization_id AND c.id = k.id
"""

RESET_PROFILES = f"""
UPDATE customers c SET
    {_RESETS},
    profile_versions = h.versions || coalesce((
        SELECT jsonb_object_agg(x.key, x.value->0) FROM jsonb_each(h.hints) x WHERE NOT h.versions ? x.key), '{{}}'),
    profile_hints = h.hints,
    updated_at = now()
FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[]) AS k(organization_id, id, deleted_at)
JOIN customers c0 ON c0.organization_id = k.organization_id AND c0.id = k.id
CROSS JOIN LATERAL (
    SELECT (SELECT coalesce(jsonb_object_agg(v.key, v.value), '{{}}'::jsonb) FROM jsonb_each(c0.profile_versions) v
            WHERE tally_version_micros(v.value #>> '{{}}') > tally_micros(k.deleted_at)) AS versions,
           (SELECT coalesce(jsonb_object_agg(v.key, v.value), '{{}}'::jsonb) FROM jsonb_each(c0.profile_hints) v
            WHERE tally_version_micros(v.value ->> 0) > tally_micros(k.deleted_at)) AS hints
) h
WHERE c.organization_id = k.organization_id AND c.id = k.id
"""

DROP_OLDER_SUBSCRIPTIONS = """
DELETE FROM subscriptions s
USING unnest($1::uuid[], $2::uuid[], $3::timestamptz[]) AS k(organization_id, id, deleted_at)
WHERE s.organization_id = k.organization_id AND s.customer_id = k.id AND s.source_time <= k.deleted_at
"""

# Thresholds reached by customers whose usage this batch changed: recorded once per
# customer, period and threshold (the primary key), in the batch's own transaction. The
# periods are those containing the fold's clock ($3): the transaction's time unless the
# caller gives one (tests pin it, so that no period ends while they run).
RECORD_ALERTS = """
INSERT INTO budget_alerts (organization_id, customer_id, threshold, period_start, period_end, budget, usage)
SELECT c.organization_id, c.id, t.threshold, t.period_start, t.period_end, t.budget, t.usage
FROM unnest($1::uuid[], $2::uuid[]) AS k(organization_id, id)
JOIN customers c ON c.organization_id = k.organization_id AND c.id = k.id
    -- Most customers have no budget: skip them before any period arithmetic.
    AND (c.period_budget IS NOT NULL OR c.total_budget IS NOT NULL)
JOIN customer_usage u ON u.organization_id = k.organization_id AND u.id = k.id
CROSS JOIN LATERAL (
    SELECT coalesce(tally_period_start(c.budget_duration, clock.at), '-infinity'::timestamptz) AS start,
           tally_period_end(c.budget_duration, clock.at) AS stop,
           tally_period_usage(c.organization_id, c.id, c.budget_duration, clock.at, u.total_cost) AS used
    FROM (SELECT coalesce($3::timestamptz, now()) AS at) AS clock
) p
CROSS JOIN LATERAL (VALUES
    ('period_80', p.start, p.stop, c.period_budget, p.used, 0.8),
    ('period_100', p.start, p.stop, c.period_budget, p.used, 1.0),
    ('total_100', '-infinity'::timestamptz, NULL::timestamptz, c.total_budget, u.total_cost, 1.0)
) AS t(threshold, period_start, period_end, budget, usage, share)
WHERE t.budget IS NOT NULL AND t.usage > 0 AND t.usage >= t.budget * t.share
ORDER BY c.organization_id, c.id, t.threshold
ON CONFLICT DO NOTHING
"""


def _columns(rows: Iterable[tuple[object, ...]]) -> list[list[object]]:
    """Rows turned into one list per column: the arrays that unnest() zips back into rows."""
    return [list(column) for column in zip(*rows, strict=True)]


def _json(value: object) -> str:
    return orjson.dumps(value, default=str).decode()


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
            elif (key := (org[0], e.environment, e.source, e.id)) in fresh:
                outcomes[i] = DUPLICATE
            else:
                fresh[key] = (i, e)

        keys = sorted(fresh)
        inserted = (
            await conn.fetch(INSERT_PROCESSED, *_columns(_journal_row(k, fresh[k][1]) for k in keys)) if keys else []
        )
        new_keys = {(r["organization_id"], r["environment"], r["source"], r["event_id"]) for r in inserted}
        applied: list[tuple[int, Change]] = []
        for key in keys:
            i, e = fresh[key]
            if key in new_keys:
                applied.append((i, Change.of(key[0], e)))
            else:
                outcomes[i] = DUPLICATE
        if applied:
            changes = [c for _, c in applied]
            locked = await lock_customers(conn, sorted({c.key for c in changes}))
            result = await apply_changes(conn, changes, locked.ids, made=locked.made, now=clock)
            alerts = result.alerts
            for (i, _), stale in zip(applied, result.stale, strict=True):
                outcomes[i] = STALE if stale else APPLIED
        await failpoints.hit("fold.before_commit")
    return FoldResult([o or DUPLICATE for o in outcomes], alerts)


def _journal_row(key: tuple[UUID, str, str, str], e: Event) -> tuple[object, ...]:
    u = e.data if isinstance(e.data, UsageData) else None
    amounts = (
        (u.requests, u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cost, u.latency, u.ttft)
        if u is not None
        else (None,) * 7
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
        columns = _columns(pending)
        for r in await conn.fetch(INSERT_CUSTOMERS, *columns):
            made.add((r["organization_id"], r["environment"], r["customer_identifier"]))
        for r in await conn.fetch(LOCK_CUSTOMERS, *columns):
            ids[(r["organization_id"], r["environment"], r["customer_identifier"])] = r["id"]
        pending = [k for k in pending if k not in ids]
    return Locked(ids, frozenset(made))


@dataclass(frozen=True)
class Applied:
    stale: list[bool]  # per change
    alerts: int  # budget alerts recorded
    removed: frozenset[UUID]  # customers removed (deleted, or provisional and left empty)


async def apply_changes(
    conn: Connection,
    changes: Sequence[Change],
    ids: Mapping[Key, UUID],
    *,
    made: frozenset[Key] | None = None,
    now: datetime | None = None,
) -> Applied:
    """Apply ``changes`` to customers whose rows the caller holds locked (``ids``), inside the
    caller's transaction: steps 4 to 6 of the module docstring. ``made`` are the rows the
    caller created for this (provisional; by default any row may be). Budget alerts are
    recorded for the periods containing ``now`` (by default the transaction's time)."""
    keys = sorted(ids)
    tombstones = {
        (r["organization_id"], r["environment"], r["customer_identifier"]): r["deleted_at"]
        for r in await conn.fetch(SELECT_TOMBSTONES, *_columns(keys))
    }
    p = plan(changes, tombstones)
    new_days = await _upsert_daily(conn, p.deltas, ids)
    await _update_customers(conn, p.deltas, ids, new_days)
    await _upsert_subscriptions(conn, p.deltas, ids)
    if p.raised:
        raised = sorted(p.raised)
        await conn.execute(UPSERT_TOMBSTONES, *_columns((*k, p.raised[k]) for k in raised))
    final = {k: p.raised.get(k, tombstones.get(k)) for k in keys}
    # Only a customer with a tombstone, or a provisional row that received no live change,
    # can be dead: the rest just received something newer than nothing.
    doubtful = [k for k in keys if final[k] is not None or ((made is None or k in made) and k not in p.deltas)]
    removed = (
        frozenset(r["id"] for r in await conn.fetch(REMOVE_DEAD, *_columns((k[0], ids[k], final[k]) for k in doubtful)))
        if doubtful
        else frozenset()
    )
    survivors = [k for k in sorted(p.raised) if ids[k] not in removed]
    if survivors:
        await _recompute(conn, [(k, ids[k], p.raised[k]) for k in survivors])
    spenders = sorted((k[0], ids[k]) for k, d in p.deltas.items() if d.days and ids[k] not in removed)
    alerts = 0
    if spenders:
        status = await conn.execute(RECORD_ALERTS, *_columns(spenders), now)
        alerts = int(status.split()[-1])
    return Applied(p.stale, alerts, removed)


async def _upsert_daily(conn: Connection, deltas: dict[Key, Delta], ids: Mapping[Key, UUID]) -> dict[UUID, int]:
    rows = sorted((k[0], ids[k], day, *u.sums()) for k, d in deltas.items() for day, u in d.days.items())
    if not rows:
        return {}
    new_days: dict[UUID, int] = defaultdict(int)
    for r in await conn.fetch(UPSERT_DAILY, *_columns(rows)):
        if r["inserted"]:
            new_days[r["customer_id"]] += 1
    return new_days


async def _update_customers(
    conn: Connection, deltas: dict[Key, Delta], ids: Mapping[Key, UUID], new_days: dict[UUID, int]
) -> None:
    usage, profiles = [], []
    for k, d in sorted(deltas.items()):
        cid = ids[k]
        if d.last_active is not None:
            usage.append((k[0], cid, *d.usage.sums(), d.first_seen, d.last_active, new_days.get(cid, 0)))
        if d.fields or d.hints or d.profile_event_at is not None:
            patch = versions = hints = None
            if d.fields:
                patch = _json({column: value for column, (_, value) in d.fields.items()})
                versions = _json({column: stamp for column, (stamp, _) in d.fields.items()})
            if d.hints:
                hints = _json({column: [stamp, value] for column, (stamp, value) in d.hints.items()})
            profiles.append((k[0], cid, patch, versions, hints, d.profile_event_at))
    if usage:
        await conn.execute(UPDATE_USAGE, *_columns(usage))
    if profiles:
        await conn.execute(UPDATE_PROFILES, *_columns(profiles))


async def _upsert_subscriptions(conn: Connection, deltas: dict[Key, Delta], ids: Mapping[Key, UUID]) -> None:
    rows = []
    for k, d in sorted(deltas.items()):
        for sub_id, (stamp, at, s) in sorted(d.subscriptions.items()):
            plan_ = s.plan
            rows.append(
                (
                    k[0],
                    ids[k],
                    sub_id,
                    s.status,
                    s.current_period_start,
                    s.current_period_end,
                    plan_ and plan_.stripe_price_id,
                    plan_ and plan_.name,
                    plan_ and plan_.amount,
                    plan_ and plan_.currency,
                    plan_ and plan_.interval,
                    at,
                    stamp,
                )
            )
    if rows:
        await conn.execute(UPSERT_SUBSCRIPTIONS, *_columns(rows))


async def _recompute(conn: Connection, rows: list[tuple[Key, UUID, datetime]]) -> None:
    """Undo what the new tombstones predate, for customers that keep newer content."""
    orgs, customer_ids = [k[0] for k, _, _ in rows], [cid for _, cid, _ in rows]
    full = [orgs, customer_ids, [k[1] for k, _, _ in rows], [k[2] for k, _, _ in rows], [t for _, _, t in rows]]
    await conn.execute(CLEAR_DAILY, orgs, customer_ids)
    await conn.execute(REBUILD_DAILY, *full)
    await conn.execute(RECOMPUTE_USAGE, *full)
    await conn.execute(RESET_PROFILES, orgs, customer_ids, full[4])
    await conn.execute(DROP_OLDER_SUBSCRIPTIONS, orgs, customer_ids, full[4])


# ---- housekeeping ------------------------------------------------------------------------

PURGE_PROCESSED = """
DELETE FROM processed_events
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM processed_events WHERE organization_id = $1 AND event_time < $2 LIMIT $3))
"""
PURGE_TOMBSTONES = "DELETE FROM customer_tombstones WHERE deleted_at < $1"


async def purge_processed(conn: Connection, retention: timedelta, *, chunk: int = 10_000) -> int:
    """Forget dedupe keys (and their journal) and tombstones of events older than
    ``retention`` plus a day. The fold refuses events older than ``retention``, so a purged
    key can never be applied again and a purged tombstone can never matter again; the day
    covers clock skew between consumers and the database. Deletes in chunks, per
    organization (the index is ``(organization_id, event_time)``), to keep locks short."""
    cutoff = datetime.now(UTC) - retention - timedelta(days=1)
    total = 0
    for org in await conn.fetch("SELECT id FROM organizations"):
        while True:
            status = await conn.execute(PURGE_PROCESSED, org["id"], cutoff, chunk)
            deleted = int(status.split()[-1])
            total += deleted
            if deleted < chunk:
                break
    await conn.execute(PURGE_TOMBSTONES, cutoff)
    return total
