"""Organization-wide usage over a range of the organization's days (of its reporting time zone),
from daily_usage: one zero-filled series
for the whole organization (or the customers named), or, grouped by customer, each customer's
buckets with usage, a page of customers at a time in id order."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from uuid import UUID

from service.domain.errors import NotFound
from service.store.db import Connection

# Per bucket: the sums, and the averages of latency and time to first token.
_SUMS = """
           sum(d.requests) AS requests, sum(d.prompt_tokens) AS prompt_tokens,
           sum(d.completion_tokens) AS completion_tokens, sum(d.total_tokens) AS total_tokens,
           sum(d.cost) AS cost, sum(d.latency_sum) AS latency_sum, sum(d.latency_count) AS latency_count,
           sum(d.ttft_sum) AS ttft_sum, sum(d.ttft_count) AS ttft_count"""
_SHOWN = """
           coalesce(u.requests, 0) AS requests, coalesce(u.prompt_tokens, 0) AS prompt_tokens,
           coalesce(u.completion_tokens, 0) AS completion_tokens, coalesce(u.total_tokens, 0) AS total_tokens,
           coalesce(u.cost, 0)::text AS cost,
           CASE WHEN u.latency_count > 0 THEN u.latency_sum / u.latency_count END AS average_latency,
           CASE WHEN u.ttft_count > 0 THEN u.ttft_sum / u.ttft_count END AS average_ttft"""
# The organization's customers in the environment ($2), or those of them named ($6, when not null).
_CUSTOMERS = """
    SELECT c.id, c.customer_identifier FROM customers c
    WHERE c.organization_id = $1 AND c.environment = $2
      AND ($6::text[] IS NULL OR c.customer_identifier = ANY($6::text[]))"""


def zero_filled(rows: str, before: str = "") -> str:
    """A JSON array (text) of every bucket ($5: day, week or month) from $3 to $4, each with
    the sums of the daily rows ``rows`` (``FROM daily_usage d …``) in it, zeros where none:
    a chart needs no gap logic. ``before``: CTEs ``rows`` uses (``name AS (…), ``)."""
    return f"""
WITH {before}usage AS (
    SELECT date_trunc($5, d.day::timestamp)::date AS bucket,{_SUMS}
    {rows}
    GROUP BY 1
), buckets AS (
    SELECT generate_series(date_trunc($5, $3::date::timestamp), $4::date::timestamp, ('1 ' || $5)::interval)::date
           AS bucket
)
SELECT coalesce('[' || string_agg(row_to_json(p)::text, ',' ORDER BY p.start) || ']', '[]')
FROM (SELECT b.bucket AS start,{_SHOWN} FROM buckets b LEFT JOIN usage u ON u.bucket = b.bucket) p
"""


# The organization's total per bucket.
TOTALS = zero_filled(
    "FROM daily_usage d JOIN who ON who.id = d.customer_id"
    " WHERE d.organization_id = $1 AND d.day BETWEEN $3::date AND $4::date",
    before=f"who AS ({_CUSTOMERS}\n), ",
)

# A page of customers with usage in the range (id order, after $7), and their buckets with usage.
BY_CUSTOMER = f"""
WITH who AS ({_CUSTOMERS}
), page AS (
    SELECT who.id, who.customer_identifier FROM who
    WHERE ($7::uuid IS NULL OR who.id > $7::uuid)
      AND EXISTS (SELECT FROM daily_usage d WHERE d.organization_id = $1 AND d.customer_id = who.id
                  AND d.day BETWEEN $3::date AND $4::date)
    ORDER BY who.id LIMIT $8
), usage AS (
    SELECT page.id, page.customer_identifier, date_trunc($5, d.day::timestamp)::date AS bucket,{_SUMS}
    FROM page JOIN daily_usage d ON d.organization_id = $1 AND d.customer_id = page.id
    WHERE d.day BETWEEN $3::date AND $4::date
    GROUP BY 1, 2, 3
)
SELECT u.id, (SELECT row_to_json(p)::text FROM (SELECT u.customer_identifier, u.bucket AS start,{_SHOWN}) p) AS doc
FROM usage u ORDER BY u.id, u.bucket
"""


TODAY = "SELECT (now() AT TIME ZONE time_zone)::date AS today, time_zone FROM organizations WHERE id = $1"


async def today(conn: Connection, organization_id: UUID) -> tuple[date, str]:
    """The organization's current day in its reporting time zone, and the zone's name."""
    row = await conn.fetchrow(TODAY, organization_id)
    if row is None:  # the key's organization was deleted while the request ran
        raise NotFound("no such organization")
    return row["today"], row["time_zone"]


@dataclass(frozen=True)
class UsageQuery:
    organization_id: UUID
    environment: str
    start: date
    end: date
    granularity: str
    identifiers: tuple[str, ...] = ()


async def totals(conn: Connection, q: UsageQuery) -> str:
    """The organization's usage per bucket, as a JSON array (text)."""
    result: str = await conn.fetchval(TOTALS, *_args(q))
    return result


async def by_customer(
    conn: Connection, q: UsageQuery, after: UUID | None, customers: int
) -> tuple[list[str], UUID | None]:
    """The buckets with usage of up to ``customers`` customers after ``after`` (JSON objects,
    text), and the id to continue after (None: this was the last page)."""
    rows = await conn.fetch(BY_CUSTOMER, *_args(q), after, customers)
    ids = list(dict.fromkeys(r["id"] for r in rows))
    return [r["doc"] for r in rows], ids[-1] if len(ids) == customers else None


def _args(q: UsageQuery) -> list[object]:
    return [q.organization_id, q.environment, q.start, q.end, q.granularity, list(q.identifiers) or None]
