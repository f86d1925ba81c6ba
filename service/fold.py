"""The event fold: apply a batch of validated events to the read model, exactly once.

One transaction per batch. Its steps, and why they are in this order:

1. resolve organizations; refuse unknown ones and events older than the dedupe window;
2. record each event's dedupe key ``(organization, source, id)``; only keys that were not
   there before are applied (a redelivered or republished event changes nothing);
3. fold the new events per customer in memory (sums, min/max times, per-day sums, the
   newest profile patch), so each customer row is written once per batch;
4. create missing customers, then lock every touched customer row in one ordered
   ``SELECT … ORDER BY … FOR UPDATE``;
5. upsert daily rows (new days raise active_days), update aggregates and profiles,
   upsert subscriptions, apply deletions.

Deadlock freedom: every step touches its rows in one global order (dedupe keys and new
customers in sorted order; existing customers locked in key order before any is written),
so two consumers folding overlapping batches wait for each other but never cycle.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Literal
from uuid import UUID

import asyncpg
import orjson

from service import failpoints
from service.events import Event, ProfileData, SubscriptionData, UsageData

Status = Literal["applied", "duplicate", "rejected"]


@dataclass(frozen=True)
class Outcome:
    status: Status
    reason: str | None = None


class Outcomes(list[Outcome]):
    """One Outcome per event, in order; ``alerts`` counts budget alerts the batch recorded."""

    alerts: int = 0


APPLIED = Outcome("applied")
DUPLICATE = Outcome("duplicate")


@dataclass
class _Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost: Decimal = Decimal(0)
    latency_sum: float = 0.0
    latency_count: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0

    def add(self, u: UsageData) -> None:
        self.requests += u.requests
        self.prompt_tokens += u.prompt_tokens
        self.completion_tokens += u.completion_tokens
        self.total_tokens += u.total_tokens or 0
        self.cost += u.cost
        if u.latency is not None:
            self.latency_sum += u.latency
            self.latency_count += 1
        if u.ttft is not None:
            self.ttft_sum += u.ttft
            self.ttft_count += 1


@dataclass
class _CustomerDelta:
    usage: _Usage = field(default_factory=_Usage)
    days: dict[date, _Usage] = field(default_factory=lambda: defaultdict(_Usage))
    first_seen: datetime | None = None
    last_active: datetime | None = None
    hint_name: str | None = None
    hint_email: str | None = None
    patch: dict[str, object] = field(default_factory=dict)
    patch_time: datetime | None = None
    delete_time: datetime | None = None
    create: bool = False  # False for a customer only named by customer.deleted


# Profile columns an event may set, with the SQL that reads each from the jsonb patch ``u.patch``.
_PATCH_SQL_TYPES = {
    "metadata": "jsonb",
    "last_transaction_amount": "numeric",
    "total_budget": "numeric",
    "period_budget": "numeric",
    "last_purchase_date": "timestamptz",
}
PATCH_COLUMNS = (
    "name", "first_name", "last_name", "email", "phone", "customer_type", "status",
    "address_line1", "address_line2", "address_city", "address_state", "address_postal_code",
    "address_country", "metadata", "stripe_customer_id", "application_id", "last_transaction_amount",
    "last_purchase_date", "total_budget", "period_budget", "budget_duration",
)  # fmt: skip
# Usage events only fill these when the customer has none yet.
_HINT_COLUMNS = {"name": "u.hint_name", "email": "u.hint_email"}


def _patch_value(column: str) -> str:
    kind = _PATCH_SQL_TYPES.get(column, "text")
    if kind == "jsonb":
        return f"u.patch->'{column}'"
    if kind == "text":
        return f"u.patch->>'{column}'"
    return f"(u.patch->>'{column}')::{kind}"


# A profile patch applies only if it is at least as new as the last one applied.
_NEWER = "(u.patch_time IS NOT NULL AND (c.profile_event_time IS NULL OR u.patch_time >= c.profile_event_time))"


def _profile_set(column: str) -> str:
    fallback = f"coalesce(c.{column}, {_HINT_COLUMNS[column]})" if column in _HINT_COLUMNS else f"c.{column}"
    return f"{column} = CASE WHEN {_NEWER} AND u.patch ? '{column}' THEN {_patch_value(column)} ELSE {fallback} END"


SELECT_ORGS = """
SELECT id, name FROM organizations WHERE name = ANY($1::text[]) OR id::text = ANY($1::text[])
"""

INSERT_PROCESSED = """
INSERT INTO processed_events (organization_id, source, event_id)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[])
ON CONFLICT DO NOTHING
RETURNING organization_id, source, event_id
"""

INSERT_CUSTOMERS = """
INSERT INTO customers (organization_id, environment, customer_identifier)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[])
ON CONFLICT (organization_id, environment, customer_identifier) DO NOTHING
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

UPDATE_CUSTOMERS = f"""
UPDATE customers c SET
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
    active_days = c.active_days + u.new_days,
    {", ".join(_profile_set(col) for col in PATCH_COLUMNS)},
    profile_event_time = CASE WHEN {_NEWER} THEN u.patch_time ELSE c.profile_event_time END,
    updated_at = CASE WHEN {_NEWER} THEN now() ELSE c.updated_at END
FROM (
    -- Patches travel as JSON text: the fold must not depend on a connection's jsonb codec.
    SELECT k.*, k.patch_json::jsonb AS patch
    FROM unnest($1::uuid[], $2::uuid[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::numeric[],
                $8::float8[], $9::int8[], $10::float8[], $11::int8[], $12::timestamptz[], $13::timestamptz[],
                $14::int4[], $15::text[], $16::text[], $17::text[], $18::timestamptz[])
         AS k(organization_id, id, requests, prompt_tokens, completion_tokens, total_tokens, cost, latency_sum,
              latency_count, ttft_sum, ttft_count, first_seen, last_active, new_days, hint_name, hint_email,
              patch_json, patch_time)
) u
WHERE c.organization_id = u.organization_id AND c.id = u.id
"""

UPSERT_SUBSCRIPTIONS = """
INSERT INTO subscriptions AS s (organization_id, id, customer_id, status, current_period_start, current_period_end,
                                plan_stripe_price_id, plan_name, plan_amount, plan_currency, plan_interval,
                                source_time)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::timestamptz[], $6::timestamptz[],
                     $7::text[], $8::text[], $9::int8[], $10::text[], $11::text[], $12::timestamptz[])
ON CONFLICT (organization_id, id) DO UPDATE SET
    customer_id = excluded.customer_id,
    status = excluded.status,
    current_period_start = excluded.current_period_start,
    current_period_end = excluded.current_period_end,
    plan_stripe_price_id = excluded.plan_stripe_price_id,
    plan_name = excluded.plan_name,
    plan_amount = excluded.plan_amount,
    plan_currency = excluded.plan_currency,
    plan_interval = excluded.plan_interval,
    source_time = excluded.source_time,
    updated_at = now()
WHERE s.source_time <= excluded.source_time
"""

# A deletion older than the newest usage or profile change applied is void: the customer
# was active again after it.
DELETE_CUSTOMERS = """
DELETE FROM customers c
USING unnest($1::uuid[], $2::uuid[], $3::timestamptz[]) AS d(organization_id, id, deleted_at)
WHERE c.organization_id = d.organization_id AND c.id = d.id
  AND d.deleted_at >= coalesce(greatest(c.last_active, c.profile_event_time), '-infinity'::timestamptz)
"""

# Thresholds reached by customers whose usage this batch changed: recorded once per
# customer, period and threshold (the primary key), in the batch's own transaction.
RECORD_ALERTS = """
INSERT INTO budget_alerts (organization_id, customer_id, threshold, period_start, period_end, budget, usage)
SELECT c.organization_id, c.id, t.threshold, t.period_start, t.period_end, t.budget, t.usage
FROM unnest($1::uuid[], $2::uuid[]) AS k(organization_id, id)
JOIN customers c ON c.organization_id = k.organization_id AND c.id = k.id
    -- Most customers have no budget: skip them before any period arithmetic.
    AND (c.period_budget IS NOT NULL OR c.total_budget IS NOT NULL)
CROSS JOIN LATERAL (
    SELECT coalesce(tally_period_start(c.budget_duration, now()), '-infinity'::timestamptz) AS start,
           tally_period_end(c.budget_duration, now()) AS stop,
           tally_period_usage(c.organization_id, c.id, c.budget_duration, now(), c.total_cost) AS used
) p
CROSS JOIN LATERAL (VALUES
    ('period_80', p.start, p.stop, c.period_budget, p.used, 0.8),
    ('period_100', p.start, p.stop, c.period_budget, p.used, 1.0),
    ('total_100', '-infinity'::timestamptz, NULL::timestamptz, c.total_budget, c.total_cost, 1.0)
) AS t(threshold, period_start, period_end, budget, usage, share)
WHERE t.budget IS NOT NULL AND t.usage > 0 AND t.usage >= t.budget * t.share
ORDER BY c.organization_id, c.id, t.threshold
ON CONFLICT DO NOTHING
"""

PURGE_PROCESSED = """
DELETE FROM processed_events
WHERE ctid = ANY(ARRAY(SELECT ctid FROM processed_events WHERE processed_at < $1 LIMIT $2))
"""


def _columns(rows: Iterable[tuple[object, ...]]) -> list[list[object]]:
    """Rows turned into one list per column: the arrays that unnest() zips back into rows."""
    return [list(column) for column in zip(*rows)]


def _json(value: object) -> str:
    return orjson.dumps(value, default=str).decode()


async def fold(
    conn: asyncpg.Connection,
    events: Sequence[Event],
    *,
    retention: timedelta,
    now: datetime | None = None,
) -> Outcomes:
    """Apply ``events`` in one transaction; returns one :class:`Outcome` per event, in order.

    An event applies at most once per (organization, source, id): duplicates within the
    batch, redeliveries and replays come back as ``duplicate``. Unknown organizations and
    events older than ``retention`` (whose dedupe record may have been purged) come back
    ``rejected`` with a reason and change nothing. Raises only on database errors, leaving
    nothing applied: the caller retries the whole batch.
    """
    now = now or datetime.now(timezone.utc)
    outcomes: list[Outcome | None] = [None] * len(events)
    alerts = 0
    async with conn.transaction():
        # Plan each statement for this batch's actual arrays and the table's current size:
        # a generic plan cached while the table was small (nested loops over sequential
        # scans) was measured at 70x slower once it had grown.
        await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
        orgs = {}
        for row in await conn.fetch(SELECT_ORGS, sorted({e.organization for e in events})):
            orgs[row["name"]] = orgs[str(row["id"])] = row["id"]

        oldest = now - retention
        fresh: dict[tuple[str, str, str], tuple[int, UUID, Event]] = {}
        for i, e in enumerate(events):
            org = orgs.get(e.organization)
            if org is None:
                outcomes[i] = Outcome("rejected", f"unknown organization '{e.organization}'")
            elif e.time < oldest:
                outcomes[i] = Outcome("rejected", f"too old: older than the {retention.days}-day dedupe window")
            elif (key := (str(org), e.source, e.id)) in fresh:
                outcomes[i] = DUPLICATE
            else:
                fresh[key] = (i, org, e)

        keys = sorted(fresh)
        inserted = await conn.fetch(
            INSERT_PROCESSED, [fresh[k][1] for k in keys], [k[1] for k in keys], [k[2] for k in keys]
        )
        new_keys = {(str(r["organization_id"]), r["source"], r["event_id"]) for r in inserted}
        applied: list[tuple[UUID, Event]] = []
        for key in keys:
            i, org, e = fresh[key]
            if key in new_keys:
                outcomes[i] = APPLIED
                applied.append((org, e))
            else:
                outcomes[i] = DUPLICATE
        if applied:
            alerts = await _apply(conn, applied)
        failpoints.hit("fold.before_commit")
    result = Outcomes(o or DUPLICATE for o in outcomes)
    result.alerts = alerts
    return result


async def _apply(conn: asyncpg.Connection, applied: list[tuple[UUID, Event]]) -> int:
    """Write the batch's new events; returns the number of budget alerts recorded."""
    deltas: dict[tuple[str, str, str], _CustomerDelta] = defaultdict(_CustomerDelta)
    org_of: dict[str, UUID] = {}
    subscriptions: dict[tuple[str, str], tuple[tuple[str, str, str], Event]] = {}
    # Profile patches merge oldest first, so the newest value of each field wins.
    for org, e in sorted(applied, key=lambda pair: pair[1].time):
        org_of[str(org)] = org
        key = (str(org), e.environment, e.subject)
        d = deltas[key]
        if isinstance(e.data, UsageData):
            d.create = True
            d.usage.add(e.data)
            d.days[e.time.astimezone(timezone.utc).date()].add(e.data)
            d.first_seen = e.time if d.first_seen is None else min(d.first_seen, e.time)
            d.last_active = e.time if d.last_active is None else max(d.last_active, e.time)
            if e.data.customer:
                d.hint_name = e.data.customer.name or d.hint_name
                d.hint_email = e.data.customer.email or d.hint_email
        elif isinstance(e.data, ProfileData):
            d.create = True
            d.patch.update(e.data.columns())
            d.patch_time = e.time
        elif isinstance(e.data, SubscriptionData):
            d.create = True
            sub_key = (str(org), e.data.id)
            if sub_key not in subscriptions or subscriptions[sub_key][1].time <= e.time:
                subscriptions[sub_key] = (key, e)
        else:  # customer.deleted
            d.delete_time = e.time if d.delete_time is None else max(d.delete_time, e.time)

    keys = sorted(deltas)
    creating = [k for k in keys if deltas[k].create]
    if creating:
        await conn.execute(
            INSERT_CUSTOMERS, [org_of[k[0]] for k in creating], [k[1] for k in creating], [k[2] for k in creating]
        )
    locked = await conn.fetch(LOCK_CUSTOMERS, [org_of[k[0]] for k in keys], [k[1] for k in keys], [k[2] for k in keys])
    ids = {(str(r["organization_id"]), r["environment"], r["customer_identifier"]): r["id"] for r in locked}

    new_days = await _upsert_daily(conn, deltas, ids, org_of)
    await _update_customers(conn, deltas, ids, org_of, new_days)
    spenders = sorted((org_of[k[0]], ids[k]) for k in keys if k in ids and deltas[k].days)
    alerts = 0
    if spenders:
        status = await conn.execute(RECORD_ALERTS, [o for o, _ in spenders], [c for _, c in spenders])
        alerts = int(status.split()[-1])
    if subscriptions:
        await _upsert_subscriptions(conn, subscriptions, ids, org_of)
    deleting = [k for k in keys if deltas[k].delete_time is not None and k in ids]
    if deleting:
        await conn.execute(
            DELETE_CUSTOMERS,
            [org_of[k[0]] for k in deleting], [ids[k] for k in deleting], [deltas[k].delete_time for k in deleting],
        )  # fmt: skip
    return alerts


async def _upsert_daily(
    conn: asyncpg.Connection,
    deltas: dict[tuple[str, str, str], _CustomerDelta],
    ids: dict[tuple[str, str, str], UUID],
    org_of: dict[str, UUID],
) -> dict[UUID, int]:
    rows = sorted(
        (org_of[k[0]], ids[k], day, u)
        for k, d in deltas.items() if k in ids
        for day, u in d.days.items()
    )  # fmt: skip
    if not rows:
        return {}
    columns = _columns(
        (org, cid, day, u.requests, u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cost,
         u.latency_sum, u.latency_count, u.ttft_sum, u.ttft_count)
        for org, cid, day, u in rows
    )  # fmt: skip
    new_days: dict[UUID, int] = defaultdict(int)
    for r in await conn.fetch(UPSERT_DAILY, *columns):
        if r["inserted"]:
            new_days[r["customer_id"]] += 1
    return new_days


async def _update_customers(
    conn: asyncpg.Connection,
    deltas: dict[tuple[str, str, str], _CustomerDelta],
    ids: dict[tuple[str, str, str], UUID],
    org_of: dict[str, UUID],
    new_days: dict[UUID, int],
) -> None:
    columns = _columns(
        (org_of[k[0]], ids[k], d.usage.requests, d.usage.prompt_tokens, d.usage.completion_tokens,
         d.usage.total_tokens, d.usage.cost, d.usage.latency_sum, d.usage.latency_count, d.usage.ttft_sum,
         d.usage.ttft_count, d.first_seen, d.last_active, new_days.get(ids[k], 0), d.hint_name, d.hint_email,
         _json(d.patch), d.patch_time)
        for k, d in sorted(deltas.items()) if k in ids and d.create
    )  # fmt: skip
    if columns:
        await conn.execute(UPDATE_CUSTOMERS, *columns)


async def _upsert_subscriptions(
    conn: asyncpg.Connection,
    subscriptions: dict[tuple[str, str], tuple[tuple[str, str, str], Event]],
    ids: dict[tuple[str, str, str], UUID],
    org_of: dict[str, UUID],
) -> None:
    rows = []
    for sub_key in sorted(subscriptions):
        customer_key, e = subscriptions[sub_key]
        data = e.data
        assert isinstance(data, SubscriptionData)
        plan = data.plan
        rows.append((
            org_of[sub_key[0]], data.id, ids[customer_key], data.status, data.current_period_start,
            data.current_period_end, plan and plan.stripe_price_id, plan and plan.name, plan and plan.amount,
            plan and plan.currency, plan and plan.interval, e.time,
        ))  # fmt: skip
    columns = _columns(rows)
    await conn.execute(UPSERT_SUBSCRIPTIONS, *columns)


async def purge_processed(conn: asyncpg.Connection, retention: timedelta, *, chunk: int = 10_000) -> int:
    """Forget dedupe keys older than ``retention`` plus a day (the day covers clock skew
    between consumers and the database: the fold refuses events older than ``retention``,
    so a purged key can never be applied again). Deletes in chunks to keep locks short."""
    cutoff = datetime.now(timezone.utc) - retention - timedelta(days=1)
    total = 0
    while True:
        status = await conn.execute(PURGE_PROCESSED, cutoff, chunk)
        deleted = int(status.split()[-1])
        total += deleted
        if deleted < chunk:
            return total
