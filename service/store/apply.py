"""Writing a fold's plan (service/domain/changes.py ``plan``) to the customers its caller holds
locked: steps 4 to 6 of service/store/fold.py's docstring — read the tombstones, fold in memory,
then write daily rows (per model too), usage aggregates, per-field versions, subscriptions and raised
tombstones; remove customers with nothing newer than their tombstone, recompute those whose
tombstone rose past older content, record budget alerts. The event fold and API writes
(service/store/customers.py) both end here, under the same row locks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from datetime import date, datetime
from uuid import UUID

import orjson

from service.domain.changes import HINT_COLUMNS, USAGE_SUMS, Change, Delta, Key, Usage, plan, window_costs
from service.domain.vocabulary import PROFILE_COLUMNS
from service.store.changelog import Kind, log_changes
from service.store.db import Connection, columns

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


# Customers' keys given as three arrays ($1, $2, $3), as a table ``k``; and a row of the table
# aliased ``alias`` having one of them.
KEYS = "unnest($1::uuid[], $2::text::text[], $3::text::text[]) AS k(organization_id, environment, customer_identifier)"


def has_key(alias: str) -> str:
    return " AND ".join(f"{alias}.{c} = k.{c}" for c in ("organization_id", "environment", "customer_identifier"))


def by_key_order(alias: str) -> str:
    """The ORDER BY that ends every query finding a customer's row by its whole key: on a
    table without statistics, it makes the planner probe an index on that key.

    Without statistics, every index that leads with (organization_id, environment) is
    estimated to find one row for that pair, exactly as the key's unique index is, and the
    planner may take any of them: it then reads all of the organization's customers to find
    one (measured with 200,000 in one organization, never analyzed: 100 ms to retrieve a
    customer, about 2 s for a fold of 20 events). Of those indexes only customers_sort_identifier,
    (organization_id, environment, customer_identifier, id), yields the row in id order with the
    whole key as its condition; every other path pays for a sort. That decides a tie, not more:
    a level of an index's tree costs more than the sort, so while customers_sort_identifier is a
    level taller than some of the others, those tie again (a fold met that from 17,700 customers
    on: its lookups probed customers_sort_period_budget and sorted, 14–32 s a batch of 4,000
    events). So the fold makes sure the table has statistics first
    (service/store/fold.py, ensure_statistics). With them, the indexes that lead with the pair
    are estimated at the whole organization, and one on the key wins."""
    return f"ORDER BY {alias}.id"


SELECT_TOMBSTONES = f"""
SELECT t.organization_id, t.environment, t.customer_identifier, t.deleted_at
FROM customer_tombstones t JOIN {KEYS} ON {has_key("t")}
"""

UPSERT_TOMBSTONES = """
INSERT INTO customer_tombstones AS t (organization_id, environment, customer_identifier, deleted_at)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[])
ON CONFLICT (organization_id, environment, customer_identifier)
DO UPDATE SET deleted_at = greatest(t.deleted_at, excluded.deleted_at)
"""

# The usage sums (service/domain/changes.py USAGE_SUMS) as the tables name them: daily_usage by
# their own names, customer_usage with the two its readers know as aggregates renamed.
_LIFETIME_COLUMN = {"requests": "number_of_requests", "cost": "total_cost"}
LIFETIME_SUMS = tuple(_LIFETIME_COLUMN.get(s, s) for s in USAGE_SUMS)


def _each_sum(template: str, *, lifetime: bool = False) -> str:
    """``template`` (``{c}``: the table's column, ``{s}``: the sum's name) for every usage sum."""
    return ",\n    ".join(template.format(c=_LIFETIME_COLUMN.get(s, s) if lifetime else s, s=s) for s in USAGE_SUMS)


UPSERT_DAILY = f"""
INSERT INTO daily_usage AS d (organization_id, customer_id, day, {", ".join(USAGE_SUMS)})
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::date[], $4::int8[], $5::int8[], $6::int8[], $7::int8[],
                     $8::text::numeric[], $9::float8[], $10::int8[], $11::float8[], $12::int8[])
ON CONFLICT (organization_id, customer_id, day) DO UPDATE SET
    {_each_sum("{c} = d.{c} + excluded.{c}")}
RETURNING customer_id, (xmax = 0) AS inserted
"""

# Per day, model and provider (migration 0013): written only for a batch with events that name
# a model or provider, in the same transaction as the journal rows and daily_usage.
UPSERT_MODEL_DAILY = f"""
INSERT INTO daily_model_usage AS d (organization_id, customer_id, day, model, provider, {", ".join(USAGE_SUMS)})
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::date[], $4::text::text[], $5::text::text[], $6::int8[], $7::int8[],
                     $8::int8[], $9::int8[], $10::text::numeric[], $11::float8[], $12::int8[], $13::float8[],
                     $14::int8[])
ON CONFLICT (organization_id, customer_id, day, model, provider) DO UPDATE SET
    {_each_sum("{c} = d.{c} + excluded.{c}")}
"""


_TODAY = "CROSS JOIN LATERAL (SELECT tally_local_day(o.time_zone, statement_timestamp()) AS today) t"


def _window_sums(keys: str) -> str:
    """A usage row's window sums (migration 0017) as ``w``, for the customer ``keys``
    (an alias with organization_id and id) of the organization ``o``: recomputed from its
    daily rows (the batch's own already written) for the organization's local day ``t.today``
    when the statement runs (not when the transaction began: service/store/windows.py says
    why)."""
    return f"""
{_TODAY}
CROSS JOIN LATERAL tally_window_sums({keys}.organization_id, {keys}.id, t.today) w
"""


_SET_WINDOWS = "window_day = t.today, cost_7d = w.cost_7d, cost_30d = w.cost_30d, cost_month = w.cost_month"

# The fold passes, with each customer's usage, what the batch adds to its window sums ending
# on the local day it expects the statement to run on (u.window_day: service/domain/changes.py
# window_costs). Where the row's sums end on that day too, they are added to; otherwise (the
# row's first usage since the day changed, or the fold's clock and the database's disagree
# about the day) they are recomputed from the daily rows, as the roll does. Both give the sum
# of the daily rows in each window: those already hold the batch's (UPSERT_DAILY runs first).
_ADDED_OR_RECOMPUTED = """(window_day, cost_7d, cost_30d, cost_month) = (
        SELECT t.today, c.cost_7d + u.cost_7d, c.cost_30d + u.cost_30d, c.cost_month + u.cost_month
        WHERE c.window_day = t.today AND u.window_day = t.today
        UNION ALL
        SELECT t.today, w.* FROM tally_window_sums(c.organization_id, c.id, t.today) w
        WHERE c.window_day IS DISTINCT FROM t.today OR u.window_day IS DISTINCT FROM t.today
    )"""

# Usage goes to customer_usage (migration 0007): its own narrow row and sort indexes.
UPDATE_USAGE = f"""
UPDATE customer_usage c SET
    {_each_sum("{c} = c.{c} + u.{s}", lifetime=True)},
    first_seen = least(c.first_seen, u.first_seen),
    last_active = greatest(c.last_active, u.last_active),
    active_days = c.active_days + u.new_days,
    {_ADDED_OR_RECOMPUTED}
FROM unnest($1::uuid[], $2::uuid[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::text::numeric[],
            $8::float8[], $9::int8[], $10::float8[], $11::int8[], $12::timestamptz[], $13::timestamptz[], $14::int4[],
            $15::date[], $16::text::numeric[], $17::text::numeric[], $18::text::numeric[])
     AS u(organization_id, id, {", ".join(USAGE_SUMS)}, first_seen, last_active, new_days,
          window_day, cost_7d, cost_30d, cost_month)
JOIN organizations o ON o.id = u.organization_id
{_TODAY}
WHERE c.organization_id = u.organization_id AND c.id = u.id
"""

# A customer made for the changes being applied (provisional: migration 0015) gets its usage
# row here, with its first values (zeros and no dates for one whose changes carry no usage):
# one write of the row and its indexes, where an empty row and an update were two. A new
# customer's daily rows are the batch's, so its window sums are what the batch adds to them
# (recomputed, as above, when the day is not the one the fold expected).
INSERT_USAGE = f"""
INSERT INTO customer_usage (organization_id, id, environment, {", ".join(LIFETIME_SUMS)}, first_seen, last_active,
                            active_days, window_day, cost_7d, cost_30d, cost_month)
SELECT u.organization_id, u.id, u.environment, {", ".join(f"u.{c}" for c in LIFETIME_SUMS)}, u.first_seen,
       u.last_active, u.active_days, t.today, w.cost_7d, w.cost_30d, w.cost_month
FROM unnest($1::uuid[], $2::uuid[], $3::text::text[], $4::int8[], $5::int8[], $6::int8[], $7::int8[],
            $8::text::numeric[], $9::float8[], $10::int8[], $11::float8[], $12::int8[], $13::timestamptz[],
            $14::timestamptz[], $15::int4[], $16::date[], $17::text::numeric[], $18::text::numeric[],
            $19::text::numeric[])
     AS u(organization_id, id, environment, {", ".join(LIFETIME_SUMS)}, first_seen, last_active, active_days,
          window_day, cost_7d, cost_30d, cost_month)
JOIN organizations o ON o.id = u.organization_id
{_TODAY}
CROSS JOIN LATERAL (
    SELECT u.cost_7d, u.cost_30d, u.cost_month WHERE u.window_day = t.today
    UNION ALL
    SELECT * FROM tally_window_sums(u.organization_id, u.id, t.today) WHERE u.window_day IS DISTINCT FROM t.today
) w
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
# subscription change (last_event_at) or usage (last_active). A provisional row (step 3 of
# service/store/fold.py's docstring) that received nothing has neither and goes too.
REMOVE_DEAD = """
DELETE FROM customers c
USING unnest($1::uuid[], $2::uuid[], $3::timestamptz[]) AS k(organization_id, id, deleted_at), customer_usage u
WHERE c.organization_id = k.organization_id AND c.id = k.id AND u.organization_id = k.organization_id AND u.id = k.id
  AND (greatest(c.last_event_at, u.last_active) IS NULL OR greatest(c.last_event_at, u.last_active) <= k.deleted_at)
RETURNING c.organization_id, c.id
"""

# A tombstone rose past older content of a customer that lives on: rebuild its usage from the
# journal rows after the tombstone (every one of them is inside the retention window), on the
# days of the organization's time zone now.
CLEAR_DAILY = """
DELETE FROM daily_usage d USING unnest($1::uuid[], $2::uuid[]) AS k(organization_id, id)
WHERE d.organization_id = k.organization_id AND d.customer_id = k.id
"""

CLEAR_MODEL_DAILY = """
DELETE FROM daily_model_usage d USING unnest($1::uuid[], $2::uuid[]) AS k(organization_id, id)
WHERE d.organization_id = k.organization_id AND d.customer_id = k.id
"""

_JOURNAL_SINCE = """
p.organization_id = k.organization_id AND p.event_time > k.deleted_at
AND p.environment = k.environment AND p.subject = k.customer_identifier AND p.requests IS NOT NULL
"""

REBUILD_DAILY = f"""
INSERT INTO daily_usage (organization_id, customer_id, day, requests, prompt_tokens, completion_tokens,
                         total_tokens, cost, latency_sum, latency_count, ttft_sum, ttft_count)
SELECT k.organization_id, k.id, (p.event_time AT TIME ZONE o.time_zone)::date, sum(p.requests), sum(p.prompt_tokens),
       sum(p.completion_tokens), sum(p.total_tokens), sum(p.cost), coalesce(sum(p.latency), 0), count(p.latency),
       coalesce(sum(p.ttft), 0), count(p.ttft)
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[])
     AS k(organization_id, id, environment, customer_identifier, deleted_at)
JOIN organizations o ON o.id = k.organization_id
JOIN processed_events p ON {_JOURNAL_SINCE}
GROUP BY 1, 2, 3
"""

REBUILD_MODEL_DAILY = f"""
INSERT INTO daily_model_usage (organization_id, customer_id, day, model, provider, requests, prompt_tokens,
                               completion_tokens, total_tokens, cost, latency_sum, latency_count, ttft_sum, ttft_count)
SELECT k.organization_id, k.id, (p.event_time AT TIME ZONE o.time_zone)::date, coalesce(p.model, ''),
       coalesce(p.provider, ''), sum(p.requests), sum(p.prompt_tokens), sum(p.completion_tokens), sum(p.total_tokens),
       sum(p.cost), coalesce(sum(p.latency), 0), count(p.latency), coalesce(sum(p.ttft), 0), count(p.ttft)
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[])
     AS k(organization_id, id, environment, customer_identifier, deleted_at)
JOIN organizations o ON o.id = k.organization_id
JOIN processed_events p ON {_JOURNAL_SINCE} AND (p.model IS NOT NULL OR p.provider IS NOT NULL)
GROUP BY 1, 2, 3, 4, 5
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
    {_each_sum("{c} = coalesce(s.{s}, 0)", lifetime=True)},
    first_seen = s.first_seen,
    last_active = s.last_active,
    active_days = s.days,
    {_SET_WINDOWS}
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[])
     AS k(organization_id, id, environment, customer_identifier, deleted_at)
JOIN organizations o ON o.id = k.organization_id{_window_sums("k")}CROSS JOIN LATERAL (
    SELECT sum(p.requests) AS requests, sum(p.prompt_tokens) AS prompt_tokens,
           sum(p.completion_tokens) AS completion_tokens, sum(p.total_tokens) AS total_tokens, sum(p.cost) AS cost,
           sum(p.latency) AS latency_sum, count(p.latency) AS latency_count, sum(p.ttft) AS ttft_sum,
           count(p.ttft) AS ttft_count, min(p.event_time) AS first_seen, max(p.event_time) AS last_active,
           count(DISTINCT (p.event_time AT TIME ZONE o.time_zone)::date) AS days
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
JOIN organizations o ON o.id = k.organization_id
CROSS JOIN LATERAL (
    SELECT coalesce(tally_period_start(c.budget_duration, clock.at, o.time_zone), '-infinity'::timestamptz) AS start,
           tally_period_end(c.budget_duration, clock.at, o.time_zone) AS stop,
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


def _json(value: object) -> str:
    return orjson.dumps(value, default=str).decode()


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
    today: Mapping[UUID, date] | None = None,
) -> Applied:
    """Apply ``changes`` to customers whose rows the caller holds locked (``ids``), inside the
    caller's transaction: steps 4 to 6 of service/store/fold.py's docstring. ``made`` are the
    rows the caller created for this (provisional; by default any row may be). Budget alerts
    are recorded for the periods containing ``now`` (by default the transaction's time).
    ``today`` is each organization's local day as the caller's clock has it: usage rows whose
    window sums end on it are added to rather than recomputed (without it, recomputed)."""
    keys = sorted(ids)
    tombstones = {
        (r["organization_id"], r["environment"], r["customer_identifier"]): r["deleted_at"]
        for r in await conn.fetch(SELECT_TOMBSTONES, *columns(keys, SELECT_TOMBSTONES))
    }
    p = plan(changes, tombstones)
    new_days = await _upsert_daily(conn, p.deltas, ids)
    await _upsert_model_daily(conn, p.deltas, ids)
    unrowed = [k for k in keys if made is not None and k in made]
    await _update_customers(conn, p.deltas, ids, new_days, unrowed, today or {})
    await _upsert_subscriptions(conn, p.deltas, ids)
    if p.raised:
        raised = sorted(p.raised)
        await conn.execute(UPSERT_TOMBSTONES, *columns((*k, p.raised[k]) for k in raised))
    final = {k: p.raised.get(k, tombstones.get(k)) for k in keys}
    # Only a customer with a tombstone, or a provisional row that received no live change,
    # can be dead: the rest just received something newer than nothing.
    doubtful = [k for k in keys if final[k] is not None or ((made is None or k in made) and k not in p.deltas)]
    removed = (
        frozenset(r["id"] for r in await conn.fetch(REMOVE_DEAD, *columns((k[0], ids[k], final[k]) for k in doubtful)))
        if doubtful
        else frozenset()
    )
    survivors = [k for k in sorted(p.raised) if ids[k] not in removed]
    if survivors:
        await _recompute(conn, [(k, ids[k], p.raised[k]) for k in survivors])
    await log_changes(conn, _logged(keys, ids, p.deltas.keys() | p.raised.keys(), removed, made))
    spenders = sorted((k[0], ids[k]) for k, d in p.deltas.items() if d.days and ids[k] not in removed)
    alerts = 0
    if spenders:
        status = await conn.execute(RECORD_ALERTS, *columns(spenders), now)
        alerts = int(status.split()[-1])
    return Applied(p.stale, alerts, removed)


def _logged(
    keys: Sequence[Key],
    ids: Mapping[Key, UUID],
    changed: Set[Key],
    removed: frozenset[UUID],
    made: frozenset[Key] | None,
) -> list[tuple[UUID, str, UUID, str, Kind]]:
    """What the change log records of this application: each customer that received a change
    or a tombstone it outlives (created if its row was made for it), and each deleted one. A row made for this and
    removed again was never there for anyone to see."""
    logged: list[tuple[UUID, str, UUID, str, Kind]] = []
    for k in keys:
        fresh = made is not None and k in made
        if ids[k] in removed:
            if not fresh:
                logged.append((*k[:2], ids[k], k[2], "d"))
        elif k in changed:
            logged.append((*k[:2], ids[k], k[2], "c" if fresh else "u"))
    return logged


async def _upsert_daily(conn: Connection, deltas: dict[Key, Delta], ids: Mapping[Key, UUID]) -> dict[UUID, int]:
    rows = sorted((k[0], ids[k], day, *u.sums()) for k, d in deltas.items() for day, u in d.days.items())
    if not rows:
        return {}
    new_days: dict[UUID, int] = defaultdict(int)
    for r in await conn.fetch(UPSERT_DAILY, *columns(rows, UPSERT_DAILY)):
        if r["inserted"]:
            new_days[r["customer_id"]] += 1
    return new_days


async def _upsert_model_daily(conn: Connection, deltas: dict[Key, Delta], ids: Mapping[Key, UUID]) -> None:
    rows = sorted(
        (k[0], ids[k], day, model, provider, *u.sums())
        for k, d in deltas.items()
        for (day, model, provider), u in d.models.items()
    )
    # Sorted like the daily rows (the customers' row locks already keep two folds apart); a
    # batch without a model or provider costs no statement.
    if rows:
        await conn.execute(UPSERT_MODEL_DAILY, *columns(rows, UPSERT_MODEL_DAILY))


async def _update_customers(
    conn: Connection,
    deltas: dict[Key, Delta],
    ids: Mapping[Key, UUID],
    new_days: dict[UUID, int],
    unrowed: Sequence[Key],
    today: Mapping[UUID, date],
) -> None:
    """Write the deltas' usage and profiles; ``unrowed`` are the customers (sorted) that have
    no usage row yet: theirs is inserted with its first values."""
    if unrowed:
        rows = ((k[0], ids[k], k[1], *_usage_values(deltas.get(k), ids[k], new_days, today.get(k[0]))) for k in unrowed)
        await conn.execute(INSERT_USAGE, *columns(rows, INSERT_USAGE))
    first = frozenset(unrowed)
    usage, profiles = [], []
    for k, d in sorted(deltas.items()):
        cid = ids[k]
        if d.last_active is not None and k not in first:
            usage.append((k[0], cid, *_usage_values(d, cid, new_days, today.get(k[0]))))
        if d.fields or d.hints or d.profile_event_at is not None:
            patch = versions = hints = None
            if d.fields:
                patch = _json({column: value for column, (_, value) in d.fields.items()})
                versions = _json({column: stamp for column, (stamp, _) in d.fields.items()})
            if d.hints:
                hints = _json({column: [stamp, value] for column, (stamp, value) in d.hints.items()})
            profiles.append((k[0], cid, patch, versions, hints, d.profile_event_at))
    if usage:
        await conn.execute(UPDATE_USAGE, *columns(usage, UPDATE_USAGE))
    if profiles:
        await conn.execute(UPDATE_PROFILES, *columns(profiles))


def _usage_values(d: Delta | None, cid: UUID, new_days: dict[UUID, int], today: date | None) -> tuple[object, ...]:
    """What a delta adds to a customer's usage row: its sums, first_seen, last_active, new
    active days (zeros and no dates for a delta without usage), and its window sums ending
    ``today`` with that day (none without it: the statement recomputes them)."""
    windows = (None,) * 4 if today is None else (today, *window_costs(d.days if d is not None else {}, today))
    if d is None or d.last_active is None:
        return (*Usage().sums(), None, None, 0, *windows)
    return (*d.usage.sums(), d.first_seen, d.last_active, new_days.get(cid, 0), *windows)


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
        await conn.execute(UPSERT_SUBSCRIPTIONS, *columns(rows))


async def _recompute(conn: Connection, rows: list[tuple[Key, UUID, datetime]]) -> None:
    """Undo what the new tombstones predate, for customers that keep newer content."""
    orgs, customer_ids = [k[0] for k, _, _ in rows], [cid for _, cid, _ in rows]
    full = [orgs, customer_ids, [k[1] for k, _, _ in rows], [k[2] for k, _, _ in rows], [t for _, _, t in rows]]
    await conn.execute(CLEAR_DAILY, orgs, customer_ids)
    await conn.execute(REBUILD_DAILY, *full)
    await conn.execute(CLEAR_MODEL_DAILY, orgs, customer_ids)
    await conn.execute(REBUILD_MODEL_DAILY, *full)
    await conn.execute(RECOMPUTE_USAGE, *full)
    await conn.execute(RESET_PROFILES, orgs, customer_ids, full[4])
    await conn.execute(DROP_OLDER_SUBSCRIPTIONS, orgs, customer_ids, full[4])
