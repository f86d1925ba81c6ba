"""Budget threshold alerts: the outbox side. The fold records them (service/store/apply.py); this
module claims unpublished ones and turns each into a ``budget.threshold_crossed`` CloudEvent.
It also records recoveries: a period threshold's alert whose customer is below the threshold
in a later period (a webhook event, ``alert.budget.recovered``; not published on the broker).

Publishing is at-least-once (a crash after the broker's confirm and before the mark
republishes), so every alert has a deterministic CloudEvent id: consumers dedupe on it.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

import asyncpg

from service.store.db import Connection, session_lock

ALERT_ROUTING_KEY = "alert.budget"
ALERT_TYPE = "budget.threshold_crossed"
_ALERT_NAMESPACE = uuid.UUID("5b0f8f1e-3c1d-4b9e-9d55-7a1c2f0e6a41")
_RECOVERED_NAMESPACE = uuid.UUID("9e7c2a64-41d3-4f0b-8c1e-5d2a7b3f6c90")
SHARES = {"period_80": "0.8", "period_100": "1", "total_100": "1"}

# SKIP LOCKED: several consumers relay concurrently without publishing the same row twice.
CLAIM_ALERTS = """
SELECT a.organization_id, a.customer_id, a.threshold, a.period_start, a.period_end, a.budget, a.usage,
       a.crossed_at, c.customer_identifier, c.environment, c.budget_duration
FROM budget_alerts a
JOIN customers c ON c.organization_id = a.organization_id AND c.id = a.customer_id
WHERE a.published_at IS NULL
ORDER BY a.crossed_at
LIMIT $1
FOR UPDATE OF a SKIP LOCKED
"""

MARK_PUBLISHED = """
UPDATE budget_alerts SET published_at = now()
WHERE (organization_id, customer_id, threshold, period_start) IN (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[]))
"""


def alert_event(row: asyncpg.Record) -> dict[str, object]:
    key = f"{row['organization_id']}/{row['customer_id']}/{row['threshold']}/{row['period_start']}"
    # A lifetime budget, or a period budget without a duration, has no period bounds.
    lifetime = row["threshold"] == "total_100" or row["budget_duration"] is None
    return {
        "specversion": "1.0",
        "id": f"budget_{uuid.uuid5(_ALERT_NAMESPACE, key).hex}",
        "source": "tally",
        "type": ALERT_TYPE,
        "time": row["crossed_at"].isoformat(),
        "subject": row["customer_identifier"],
        "organization": str(row["organization_id"]),
        "environment": row["environment"],
        "datacontenttype": "application/json",
        "data": {
            "threshold": row["threshold"],
            "share": SHARES[row["threshold"]],
            "budget": str(row["budget"]),
            "usage": str(row["usage"]),
            "budget_kind": "total" if row["threshold"] == "total_100" else "period",
            "budget_duration": None if lifetime else row["budget_duration"],
            "period_start": None if lifetime else row["period_start"].isoformat(),
            "period_end": None if lifetime else row["period_end"].isoformat(),
        },
    }


async def relay_alerts(
    pool: asyncpg.Pool,
    publish: Callable[[dict[str, object]], Awaitable[None]],
    *,
    limit: int = 100,
    timeout: float = 10.0,
) -> int:
    """Publish up to ``limit`` unpublished alerts with ``publish`` (which must return only
    once the broker confirmed) and mark them. Returns how many were published. If a publish
    fails, nothing of this round is marked and the exception propagates: the rows stay
    unpublished and the next round retries them."""
    async with pool.acquire(timeout=timeout) as conn, conn.transaction():
        rows = await conn.fetch(CLAIM_ALERTS, limit)
        for row in rows:
            await publish(alert_event(row))
        if rows:
            await conn.execute(
                MARK_PUBLISHED,
                [r["organization_id"] for r in rows],
                [r["customer_id"] for r in rows],
                [r["threshold"] for r in rows],
                [r["period_start"] for r in rows],
            )
    return len(rows)


# ---- recoveries ---------------------------------------------------------------------------------

# Alerts of a period threshold whose period ended in ($1, $2] and that recovered: the customer
# still has a period budget, has not crossed that threshold in a later period, and its usage in
# its current period (at $3) is below it. Recorded once (the primary key), whatever reruns.
RECORD_RECOVERIES = """
INSERT INTO budget_recoveries (organization_id, customer_id, threshold, period_start, period_end, budget,
                               current_start, current_end, usage)
SELECT a.organization_id, a.customer_id, a.threshold, a.period_start, a.period_end, c.period_budget,
       p.start, p.stop, p.used
FROM budget_alerts a
JOIN customers c ON c.organization_id = a.organization_id AND c.id = a.customer_id
JOIN customer_usage u ON u.organization_id = a.organization_id AND u.id = a.customer_id
JOIN organizations o ON o.id = a.organization_id
CROSS JOIN LATERAL (
    SELECT tally_period_start(c.budget_duration, $3, o.time_zone) AS start,
           tally_period_end(c.budget_duration, $3, o.time_zone) AS stop,
           tally_period_usage(c.organization_id, c.id, c.budget_duration, $3, u.total_cost) AS used
) p
WHERE a.period_end > $1 AND a.period_end <= $2 AND a.threshold IN ('period_80', 'period_100')
  AND c.period_budget IS NOT NULL AND c.budget_duration IS NOT NULL
  AND p.used < c.period_budget * CASE a.threshold WHEN 'period_80' THEN 0.8 ELSE 1.0 END
  AND NOT EXISTS (SELECT 1 FROM budget_alerts l
                  WHERE l.organization_id = a.organization_id AND l.customer_id = a.customer_id
                    AND l.threshold = a.threshold AND l.period_start >= a.period_end)
  AND NOT EXISTS (SELECT 1 FROM budget_recoveries r
                  WHERE r.organization_id = a.organization_id AND r.customer_id = a.customer_id
                    AND r.threshold = a.threshold AND r.period_start = a.period_start)
ORDER BY a.period_end, a.organization_id, a.customer_id, a.threshold
LIMIT $4
ON CONFLICT DO NOTHING
"""

# One consumer process looks at a time (a session lock, tried: another skips its turn).
RECOVERY_LOCK = "tally-budget-recoveries"
READ_MARK = "SELECT checked_to FROM budget_recovery_mark"
MOVE_MARK = "UPDATE budget_recovery_mark SET checked_to = $1"

# A consumer down for long catches up a day of period ends per transaction.
RECOVERY_CHUNK = timedelta(days=1)
# Recoveries recorded per transaction, at most: the webhook dispatcher reads a transaction's
# alerts and recoveries whole (service/store/webhooks.py), so one transaction must stay small.
RECORDED_AT_ONCE = 1000


async def record_recoveries(
    conn: Connection, since: datetime, until: datetime, now: datetime, *, most: int = RECORDED_AT_ONCE
) -> int:
    """Record the recoveries of alerts whose period ended after ``since`` and at or before
    ``until``, with the customers' usage at ``now``, each ``most`` in a transaction of its
    own; how many."""
    total = 0
    while True:
        async with conn.transaction():
            recorded = int(str(await conn.execute(RECORD_RECOVERIES, since, until, now, most)).rsplit(" ", 1)[-1])
        total += recorded
        if recorded < most:
            return total


async def recover(conn: Connection, settle: timedelta, now: datetime | None = None) -> int | None:
    """Record the recoveries of every alert whose period ended since the last look and at
    least ``settle`` before ``now`` (the database's time by default, the clock the fold's
    alerts are taken by: a fold that read it before a period's end may still commit that
    period's alert for that long), a day of period ends at a time; how many, or None when
    another process holds the mark."""
    if now is None:
        now = await conn.fetchval("SELECT now()")
    until = now - settle
    async with session_lock(conn, RECOVERY_LOCK) as taken:
        if not taken:
            return None
        recorded = 0
        while True:
            since = await conn.fetchval(READ_MARK)
            if since >= until:
                return recorded
            step = min(until, since + RECOVERY_CHUNK)
            # Recorded before the mark moves: a crash between records nothing twice (the
            # primary key), and the next look starts where this one did.
            recorded += await record_recoveries(conn, since, step, now)
            await conn.execute(MOVE_MARK, step)


def recovery_event(row: asyncpg.Record) -> dict[str, object]:
    """A recovery as an event: its id is stable (one per alert recovered from), its data says
    which alert ended and where the customer's usage stands in its current period."""
    key = f"{row['organization_id']}/{row['customer_id']}/{row['threshold']}/{row['period_start']}"
    return {
        "id": f"budget_{uuid.uuid5(_RECOVERED_NAMESPACE, key).hex}",
        "data": {
            "threshold": row["threshold"],
            "share": SHARES[row["threshold"]],
            "budget": str(row["budget"]),
            "usage": str(row["usage"]),
            "budget_kind": "period",
            "budget_duration": row["budget_duration"],
            "period_start": row["current_start"].isoformat(),
            "period_end": row["current_end"].isoformat(),
            "alert": {
                "id": f"budget_{uuid.uuid5(_ALERT_NAMESPACE, key).hex}",
                "period_start": row["period_start"].isoformat(),
                "period_end": row["period_end"].isoformat(),
            },
        },
    }
