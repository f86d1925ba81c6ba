"""The maintained window sums (migration 0017): each customer's cost in the last 7 days, the
last 30 days and the current calendar month, ending on its organization's local day.

The fold keeps them for the customers it changes (service/store/apply.py, for the local day
when its usage statement runs). When an organization's day changes, every other customer's
sums must move to the new day too (a day leaves the 7- and 30-day windows, a month ends):
:func:`roll` recomputes them, a chunk of customers per transaction, and then marks the
organization's day (``usage_window_marks``). A list reads the sums only while that mark is
today (service/store/listing.py); until the roll is done, it aggregates the daily rows.

A chunk locks its customers as the fold does before it reads their daily rows, so a fold in
progress on them — one that wrote sums for the day before, just before midnight, included —
commits first and is read, and a later one labels its sums with the new day. The roll for a
day starts ``settle`` after that day began; a new customer that a fold inserted before
midnight in a transaction still open when the roll passed it (longer than ``settle``) keeps the
day before's sums until its next usage.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from uuid import UUID

from service.store.db import Connection, session_lock

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

# One chunk: the organization's next customers after $2 in id order, up to $3, locked as the
# fold locks them (organization, then id: service/store/fold.py LOCK_CUSTOMERS). A fold holds
# its customers' locks from before it writes their usage until it commits, so the chunk waits
# for any fold in progress on them — one that began before midnight and labels its sums with
# the day before included — and keeps new ones out until its own commit.
LOCK_CHUNK = """
SELECT id FROM customers WHERE organization_id = $1 AND id > $2 ORDER BY id LIMIT $3 FOR UPDATE
"""

# ... read (after the lock, so every fold of these customers that committed is seen): those
# whose sums for the day $1 differ from the ones they hold, with their new sums, by a probe of
# each customer's daily rows by primary key ...
#
# Neither statement gives customer_usage a condition of its own (the organization comes once
# per row, as an array column, and the day's test sits inside the probe): with one, the planner
# may scan the organization's rows by any index that leads with it and look for each of the
# chunk's ids in every row, and with statistics from before a large tenant arrived it
# estimates that organization at one row and does (measured: 40,000 customers loaded after
# customer_usage was analyzed at 23 rows; the roll took 522 s, about a minute a chunk of
# 5,000). So each id probes the primary key, whatever the statistics: a LATERAL subquery with a
# LIMIT is never merged into the join, and the update's rows are reachable only from the arrays.
READ_CHUNK = """
SELECT x.id, s.cost_7d, s.cost_30d, s.cost_month
FROM unnest($2::uuid[], $3::uuid[]) AS k(organization_id, id)
CROSS JOIN LATERAL (
    SELECT x.id, x.cost_7d, x.cost_30d, x.cost_month FROM customer_usage x
    WHERE x.organization_id = k.organization_id AND x.id = k.id AND x.window_day IS DISTINCT FROM $1
    LIMIT 1
) x
CROSS JOIN LATERAL tally_window_sums(k.organization_id, x.id, $1) s
WHERE (x.cost_7d, x.cost_30d, x.cost_month) IS DISTINCT FROM (s.cost_7d, s.cost_30d, s.cost_month)
"""

# ... and written: the rows whose sums moved, by primary key from arrays (the fold's pattern).
WRITE_CHUNK = """
UPDATE customer_usage u SET window_day = $1, cost_7d = n.cost_7d, cost_30d = n.cost_30d, cost_month = n.cost_month
FROM unnest($2::uuid[], $3::uuid[], $4::numeric[], $5::numeric[], $6::numeric[])
     AS n(organization_id, id, cost_7d, cost_30d, cost_month)
WHERE u.organization_id = n.organization_id AND u.id = n.id
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

# A chunk's customers: locked (folds of them wait) for about half a second of work.
CHUNK = 5_000


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


async def roll(conn: Connection, organization_id: UUID, day: date, *, chunk: int = CHUNK) -> Rolled | None:
    """Move every customer of the organization to its window sums for ``day``, a chunk per
    transaction (locked, read, the sums that moved written), then mark the organization's day;
    None when another process is rolling it (every consumer runs housekeeping: a session lock
    on the organization, tried, held across the chunks' transactions)."""
    async with session_lock(conn, f"tally-window-roll:{organization_id}") as taken:
        if not taken:
            return None
        after = UUID(int=0)
        customers = changed = 0
        while True:
            async with conn.transaction():
                # Probes by primary key, whatever the statistics say and however many chunks
                # ran before: a generic plan (cached after five runs, made for no organization
                # in particular) or one made on tables never analyzed may join the chunk to
                # customer_usage by scanning the organization's rows for every row of it
                # (measured: 8 s for 2,000 customers of 40,000, against 0.1 s).
                await conn.execute("; ".join(f"SET LOCAL {setting}" for setting in PLAN))
                ids = [r["id"] for r in await conn.fetch(LOCK_CHUNK, organization_id, after, chunk)]
                if not ids:
                    break
                moved = await conn.fetch(READ_CHUNK, day, [organization_id] * len(ids), ids)
                if moved:
                    await conn.execute(
                        WRITE_CHUNK,
                        day,
                        [organization_id] * len(moved),
                        [r["id"] for r in moved],
                        [r["cost_7d"] for r in moved],
                        [r["cost_30d"] for r in moved],
                        [r["cost_month"] for r in moved],
                    )
            customers += len(ids)
            changed += len(moved)
            after = ids[-1]
        await conn.execute(MARK, organization_id, day)
        return Rolled(organization_id, day, customers, changed)
