"""The maintained window sums (migration 0017): each customer's cost in the last 7 days, the
last 30 days and the current calendar month, ending on its organization's local day.

The fold keeps them for the customers it changes (service/store/apply.py, for the local day
of its transaction). When an organization's day changes, every other customer's sums must
move to the new day too (a day leaves the 7- and 30-day windows, a month ends): :func:`roll`
recomputes them, a chunk of customers per statement, and then marks the organization's day
(``usage_window_marks``). A list reads the sums only while that mark is today
(service/store/listing.py); until the roll is done, it aggregates the daily rows as before.

A fold whose transaction began before the organization's midnight writes sums for the day
before and may commit a little after it: the roll for a day waits ``settle`` after that day
began, and leaves alone a row a fold already moved to the new day (rechecked under the row's
lock, so a roll never overwrites a fold's newer sums).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from uuid import UUID

from service.store.db import Connection

# Organizations whose mark is not the local day of ($1 - $2; $1 by default the database's
# time, the clock the fold's days are taken by): due for a roll to that day.
DUE = """
SELECT o.id, d.day
FROM organizations o
CROSS JOIN LATERAL (SELECT tally_local_day(o.time_zone, coalesce($1::timestamptz, now()) - $2::interval) AS day) d
LEFT JOIN usage_window_marks m ON m.organization_id = o.id
WHERE m.day IS DISTINCT FROM d.day
ORDER BY o.id
"""

# One chunk, read: the organization's customers after $3 in id order, up to $4 (``last``: the
# chunk's last id), and those whose sums for the day $2 differ from the ones they hold, with
# their new sums. A lateral probe of each customer's daily rows by primary key.
READ_CHUNK = """
SELECT x.id, (x.cost_7d, x.cost_30d, x.cost_month) IS DISTINCT FROM (s.cost_7d, s.cost_30d, s.cost_month) AS moved,
       s.cost_7d, s.cost_30d, s.cost_month
FROM (SELECT id, cost_7d, cost_30d, cost_month FROM customer_usage
      WHERE organization_id = $1 AND id > $3 ORDER BY id LIMIT $4) x
CROSS JOIN LATERAL tally_window_sums($1, x.id, $2) s
ORDER BY x.id
"""

# ... and written: the rows whose sums moved, by primary key (the fold's own pattern), unless a
# fold wrote them for that day since the read (rechecked under the row's lock).
WRITE_CHUNK = """
UPDATE customer_usage u SET window_day = $2, cost_7d = n.cost_7d, cost_30d = n.cost_30d, cost_month = n.cost_month
FROM unnest($3::uuid[], $4::numeric[], $5::numeric[], $6::numeric[]) AS n(id, cost_7d, cost_30d, cost_month)
WHERE u.organization_id = $1 AND u.id = n.id AND u.window_day IS DISTINCT FROM $2
"""

PLAN = (
    "plan_cache_mode = force_custom_plan",
    "enable_seqscan = off",
    "enable_hashjoin = off",
    "enable_mergejoin = off",
)

MARK = """
INSERT INTO usage_window_marks (organization_id, day) VALUES ($1, $2)
ON CONFLICT (organization_id) DO UPDATE SET day = excluded.day
"""

# A chunk's customers: a few hundred milliseconds of work, so no statement nears the timeout.
CHUNK = 20_000


@dataclass(frozen=True)
class Rolled:
    organization_id: UUID
    day: date
    customers: int  # looked at
    changed: int  # whose sums changed


async def due(conn: Connection, settle: timedelta, now: datetime | None = None) -> list[tuple[UUID, date]]:
    """Organizations to roll, and the day each rolls to: the local day ``settle`` before
    ``now`` (the database's time by default)."""
    return [(r["id"], r["day"]) for r in await conn.fetch(DUE, now, settle)]


async def roll(conn: Connection, organization_id: UUID, day: date, *, chunk: int = CHUNK) -> Rolled:
    """Move every customer of the organization to its window sums for ``day``, a chunk per
    transaction (a read, then a write of the sums that moved), then mark the organization's day."""
    after = UUID(int=0)
    customers = changed = 0
    while True:
        async with conn.transaction():
            # One probe per customer by primary key, whatever the statistics say and however
            # many chunks ran before: a generic plan (cached after five runs, made for no
            # organization in particular) or one made on tables never analyzed (a bulk load,
            # autovacuum off) may join the chunk to customer_usage by scanning the
            # organization's rows for every row of it (measured: 8 s for 2,000 customers of
            # 40,000, against 0.1 s; and, in one statement with the update, a join order that
            # ran past the 10 s timeout on statistics other tests had left).
            await conn.execute("; ".join(f"SET LOCAL {setting}" for setting in PLAN))
            rows = await conn.fetch(READ_CHUNK, organization_id, day, after, chunk)
            if not rows:
                break
            moved = [r for r in rows if r["moved"]]
            if moved:
                status = await conn.execute(
                    WRITE_CHUNK,
                    organization_id,
                    day,
                    [r["id"] for r in moved],
                    [r["cost_7d"] for r in moved],
                    [r["cost_30d"] for r in moved],
                    [r["cost_month"] for r in moved],
                )
                changed += int(str(status).rsplit(" ", 1)[-1])
        customers += len(rows)
        after = rows[-1]["id"]
    await conn.execute(MARK, organization_id, day)
    return Rolled(organization_id, day, customers, changed)
