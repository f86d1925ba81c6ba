"""Organization-wide usage over a range of the organization's days (of its reporting time zone),
from daily_usage: one zero-filled series
for the whole organization (or the customers named), or, grouped by customer, each customer's
buckets with usage, a page of customers at a time in id order. Filtered by model, or grouped
by model or provider (of the organization, or of one customer), from daily_model_usage
(migrations/0013_model_usage.sql)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from uuid import UUID

from service.domain.changes import USAGE_SUMS
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


def _daily(models: str | None) -> tuple[str, str]:
    """The daily rows a report reads, and the condition that selects them besides customer and
    day: daily_usage, or with a model filter (``models``: the parameter holding the names)
    the per-model rows of those models."""
    if models is None:
        return "daily_usage", ""
    return "daily_model_usage", f" AND d.model = ANY({models}::text[])"


def _totals(models: str | None) -> str:
    table, only = _daily(models)
    return zero_filled(
        f"FROM {table} d JOIN who ON who.id = d.customer_id"
        f" WHERE d.organization_id = $1 AND d.day BETWEEN $3::date AND $4::date{only}",
        before=f"who AS ({_CUSTOMERS}\n), ",
    )


def _by_customer(models: str | None) -> str:
    table, only = _daily(models)
    return f"""
WITH who AS ({_CUSTOMERS}
), page AS (
    SELECT who.id, who.customer_identifier FROM who
    WHERE ($7::uuid IS NULL OR who.id > $7::uuid)
      AND EXISTS (SELECT FROM {table} d WHERE d.organization_id = $1 AND d.customer_id = who.id
                  AND d.day BETWEEN $3::date AND $4::date{only})
    ORDER BY who.id LIMIT $8
), usage AS (
    SELECT page.id, page.customer_identifier, date_trunc($5, d.day::timestamp)::date AS bucket,{_SUMS}
    FROM page JOIN {table} d ON d.organization_id = $1 AND d.customer_id = page.id
    WHERE d.day BETWEEN $3::date AND $4::date{only}
    GROUP BY 1, 2, 3
)
SELECT u.id, (SELECT row_to_json(p)::text FROM (SELECT u.customer_identifier, u.bucket AS start,{_SHOWN}) p) AS doc
FROM usage u ORDER BY u.id, u.bucket
"""


# The organization's total per bucket; of the models named ($7).
TOTALS = _totals(None)
TOTALS_OF_MODELS = _totals("$7")

# A page of customers with usage in the range (id order, after $7), and their buckets with
# usage; of the models named ($9).
BY_CUSTOMER = _by_customer(None)
BY_CUSTOMER_OF_MODELS = _by_customer("$9")

# How many models (or providers) a grouped report keeps apart, by default and at most: the
# documented bound on the rows a response holds per bucket (besides "other" and unnamed usage).
DEFAULT_TOP = 10
MAX_TOP = 100
# The name the overflow of a grouped report goes by: every model (or provider) past the top
# $8 by cost in the range, summed. A model that is itself called "other" is counted in it.
OTHER = "other"
# The ways a report groups by model or provider, and the column each reads.
DIMENSIONS = ("model", "provider")


def _sums_of(alias: str, template: str = "sum({a}.{s}) AS {s}") -> str:
    return ", ".join(template.format(a=alias, s=s) for s in USAGE_SUMS)


def _grouped(dimension: str) -> str:
    """Usage per bucket and model (or provider) of the customers named, in the range: the top
    $8 names by cost over the whole range keep their own rows, the rest are summed as
    ``other``, and usage that names none (the daily total less the named rows, when no model
    filter $7 applies) has a null name. The ranking is over the range's sums, so it does not
    depend on the order in which events arrived."""
    assert dimension in DIMENSIONS
    nonzero = " OR ".join(f"{s} <> 0" for s in USAGE_SUMS if not s.endswith("_sum"))
    return f"""
WITH who AS ({_CUSTOMERS}
), named AS (
    SELECT date_trunc($5, d.day::timestamp)::date AS bucket, nullif(d.{dimension}, '') AS name,{_SUMS}
    FROM daily_model_usage d JOIN who ON who.id = d.customer_id
    WHERE d.organization_id = $1 AND d.day BETWEEN $3::date AND $4::date
      AND ($7::text[] IS NULL OR d.model = ANY($7::text[]))
    GROUP BY 1, 2
), daily AS (
    SELECT date_trunc($5, d.day::timestamp)::date AS bucket,{_SUMS}
    FROM daily_usage d JOIN who ON who.id = d.customer_id
    WHERE $7::text[] IS NULL AND d.organization_id = $1 AND d.day BETWEEN $3::date AND $4::date
    GROUP BY 1
), unnamed AS (
    SELECT t.bucket, NULL::text AS name, {_sums_of("t", "t.{s} - coalesce(n.{s}, 0) AS {s}")}
    FROM daily t LEFT JOIN (SELECT n.bucket, {_sums_of("n")} FROM named n GROUP BY 1) n ON n.bucket = t.bucket
), rows AS (
    SELECT * FROM named UNION ALL SELECT * FROM unnamed WHERE {nonzero}
), ranked AS (
    SELECT r.name, row_number() OVER (ORDER BY sum(r.cost) DESC, sum(r.requests) DESC, r.name COLLATE "C") AS rank
    FROM rows r WHERE r.name IS NOT NULL AND r.name <> '{OTHER}' GROUP BY r.name
), shown AS (
    SELECT r.bucket, k.rank <= $8 AS own, r.name, k.rank, r.{", r.".join(USAGE_SUMS)}
    FROM rows r LEFT JOIN ranked k ON k.name = r.name
), usage AS (
    SELECT s.bucket,
           CASE WHEN s.name IS NULL THEN NULL WHEN s.own THEN s.name ELSE '{OTHER}' END AS name,
           -- Per bucket: the top names by rank, then other, then usage that names none.
           CASE WHEN s.name IS NULL THEN 2 WHEN s.own THEN 0 ELSE 1 END AS place,
           min(CASE WHEN s.own THEN s.rank END) AS rank,
           {_sums_of("s")}
    FROM shown s GROUP BY 1, 2, 3
)
SELECT coalesce('[' || string_agg(
    (SELECT row_to_json(p)::text FROM (SELECT u.bucket AS start, u.name AS {dimension},{_SHOWN}) p),
    ',' ORDER BY u.bucket, u.place, u.rank) || ']', '[]')
FROM usage u
"""


GROUPED = {dimension: _grouped(dimension) for dimension in DIMENSIONS}

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
    # Only the usage of these models (none: all usage, with a model or without).
    models: tuple[str, ...] = ()


async def totals(conn: Connection, q: UsageQuery) -> str:
    """The organization's usage per bucket, as a JSON array (text)."""
    result: str = await (
        conn.fetchval(TOTALS_OF_MODELS, *_args(q), list(q.models)) if q.models else conn.fetchval(TOTALS, *_args(q))
    )
    return result


async def by_customer(
    conn: Connection, q: UsageQuery, after: UUID | None, customers: int
) -> tuple[list[str], UUID | None]:
    """The buckets with usage of up to ``customers`` customers after ``after`` (JSON objects,
    text), and the id to continue after (None: this was the last page)."""
    if q.models:
        rows = await conn.fetch(BY_CUSTOMER_OF_MODELS, *_args(q), after, customers, list(q.models))
    else:
        rows = await conn.fetch(BY_CUSTOMER, *_args(q), after, customers)
    ids = list(dict.fromkeys(r["id"] for r in rows))
    return [r["doc"] for r in rows], ids[-1] if len(ids) == customers else None


async def by_dimension(conn: Connection, q: UsageQuery, dimension: str, top: int) -> str:
    """The buckets with usage per ``dimension`` (model or provider), the ``top`` names by cost
    in the range and ``other`` (:func:`_grouped`), as a JSON array (text)."""
    result: str = await conn.fetchval(GROUPED[dimension], *_args(q), list(q.models) or None, top)
    return result


def _args(q: UsageQuery) -> list[object]:
    return [q.organization_id, q.environment, q.start, q.end, q.granularity, list(q.identifiers) or None]
