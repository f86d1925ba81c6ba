"""Budget threshold alerts: the outbox side. The fold records them (service/store/apply.py); this
module claims unpublished ones and turns each into a ``budget.threshold_crossed`` CloudEvent.

Publishing is at-least-once (a crash after the broker's confirm and before the mark
republishes), so every alert has a deterministic CloudEvent id: consumers dedupe on it.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import asyncpg

ALERT_ROUTING_KEY = "alert.budget"
ALERT_TYPE = "budget.threshold_crossed"
_ALERT_NAMESPACE = uuid.UUID("5b0f8f1e-3c1d-4b9e-9d55-7a1c2f0e6a41")
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
