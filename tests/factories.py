"""Factories: the rows tests need, inserted directly into the real database (organizations
with their keys, customers, subscriptions, daily usage). Each makes unique identifiers so
tests need no cleanup. No fixtures here: those live in conftest.py."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import asyncpg

from service.domain.vocabulary import PROFILE_COLUMNS
from service.store import auth
from service.store.listing import USAGE_COLUMNS


@dataclass
class Org:
    id: uuid.UUID
    name: str
    key: str  # read, write (prod)
    read_key: str
    test_key: str  # read, write (test environment)

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}


async def make_org(pool: asyncpg.Pool) -> Org:
    name = f"org-{uuid.uuid4().hex[:10]}"
    async with pool.acquire() as conn:
        org_id = await auth.create_organization(conn, name)
        key = await auth.create_key(conn, name, ("read", "write"))
        read = await auth.create_key(conn, name, ("read",))
        test = await auth.create_key(conn, name, ("read", "write"), environment="test")
    return Org(org_id, name, key.key, read.key, test.key)


async def client_pair(
    pool: asyncpg.Pool, org: Org, scopes: tuple[str, ...] = ("read",), environment: str = "prod"
) -> dict[str, str]:
    """The x-client-key/x-client-secret header pair (Devdraft's, /compat/v0) for a new key of ``org``."""
    async with pool.acquire() as conn:
        key = await auth.create_key(conn, org.name, scopes, environment=environment)
    return {"x-client-key": key.client_key, "x-client-secret": key.client_secret}


# ---- customers -----------------------------------------------------------------------------

# What a test may set on a customer row: its key, the fields a client may write, and the usage
# aggregates (stored in customer_usage) — the code's own lists, not copies of them.
INSERT_CUSTOMER_COLUMNS = (
    "organization_id",
    "environment",
    "customer_identifier",
    *PROFILE_COLUMNS,
    *sorted(USAGE_COLUMNS),
)


async def insert_customer(pool: asyncpg.Pool, org: Org, identifier: str | None = None, **fields: object) -> dict:
    """Insert one customer row directly (a factory for read tests); returns the row."""
    row = {
        "organization_id": org.id,
        "environment": "prod",
        "customer_identifier": identifier or f"cust_{uuid.uuid4().hex[:8]}",
        "status": "active",
        "metadata": {},
        **fields,
    }
    unknown = set(row) - set(INSERT_CUSTOMER_COLUMNS)
    assert not unknown, unknown
    profile = [c for c in INSERT_CUSTOMER_COLUMNS if c in row and c not in USAGE_COLUMNS]
    # The usage aggregates live in customer_usage (migration 0007), made by the insert trigger.
    usage = [c for c in INSERT_CUSTOMER_COLUMNS if c in row and c in USAGE_COLUMNS]
    sql = (
        f"INSERT INTO customers ({', '.join(profile)}) VALUES ({', '.join(f'${i + 1}' for i in range(len(profile)))})"
        " RETURNING organization_id, id"
    )
    async with _transaction(pool) as conn:
        key = await conn.fetchrow(sql, *(row[c] for c in profile))
        if usage:
            sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(usage, start=3))
            await conn.execute(
                f"UPDATE customer_usage SET {sets} WHERE organization_id = $1 AND id = $2",
                key["organization_id"],
                key["id"],
                *(row[c] for c in usage),
            )
        return dict(
            await conn.fetchrow(
                "SELECT * FROM customer_rows WHERE organization_id = $1 AND id = $2", key["organization_id"], key["id"]
            )
        )


@contextlib.asynccontextmanager
async def _transaction(pool: asyncpg.Pool | asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    if isinstance(pool, asyncpg.Pool):
        async with pool.acquire() as conn, conn.transaction():
            yield conn
    else:
        async with pool.transaction():
            yield pool


# Columns insert_customer does not take; the tests set them directly.
EXTRA_CUSTOMER_COLUMNS = frozenset(
    {
        "first_name",
        "last_name",
        "phone",
        "customer_type",
        "address_line1",
        "address_line2",
        "address_city",
        "address_state",
        "address_postal_code",
        "address_country",
        "stripe_customer_id",
        "application_id",
        "last_transaction_amount",
        "last_purchase_date",
        "created_at",
        "updated_at",
    }
)


async def set_columns(pool: asyncpg.Pool | asyncpg.Connection, row: dict, **columns: Any) -> dict:
    """Set columns :func:`insert_customer` does not take on the customer ``row``; returns the row."""
    assert set(columns) <= EXTRA_CUSTOMER_COLUMNS, set(columns) - EXTRA_CUSTOMER_COLUMNS
    sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(columns, start=3))
    await pool.execute(
        f"UPDATE customers SET {sets} WHERE organization_id = $1 AND id = $2",
        row["organization_id"],
        row["id"],
        *columns.values(),
    )
    return dict(
        await pool.fetchrow(
            "SELECT * FROM customer_rows WHERE organization_id = $1 AND id = $2", row["organization_id"], row["id"]
        )
    )


# ---- subscriptions and daily usage ---------------------------------------------------------


async def add_subscription(
    pool: asyncpg.Pool,
    org: Org,
    customer_id: uuid.UUID,
    sub_id: str,
    status: str,
    start: datetime | None = None,
    end: datetime | None = None,
    plan: dict[str, Any] | None = None,
    created_at: datetime | None = None,
) -> None:
    plan = plan or {}
    await pool.execute(
        "INSERT INTO subscriptions (organization_id, id, customer_id, status, current_period_start, current_period_end,"
        " plan_stripe_price_id, plan_name, plan_amount, plan_currency, plan_interval, source_time, created_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, now(), coalesce($12, now()))",
        org.id,
        sub_id,
        customer_id,
        status,
        start,
        end,
        plan.get("stripe_price_id"),
        plan.get("name"),
        plan.get("amount"),
        plan.get("currency"),
        plan.get("interval"),
        created_at,
    )


async def add_daily_cost(pool: asyncpg.Pool, row: dict, day: date, cost: Decimal) -> None:
    """One day of usage (one request costing ``cost``) for the customer ``row``."""
    await pool.execute(
        "INSERT INTO daily_usage (organization_id, customer_id, day, requests, cost) VALUES ($1, $2, $3, 1, $4)",
        row["organization_id"],
        row["id"],
        day,
        cost,
    )


async def add_daily_costs(
    pool: asyncpg.Pool, org_id: uuid.UUID, customer_id: uuid.UUID, costs: dict[date, Decimal]
) -> None:
    """Days of usage (one request each, costing ``costs[day]``) for one customer."""
    await pool.executemany(
        "INSERT INTO daily_usage (organization_id, customer_id, day, requests, cost) VALUES ($1, $2, $3, 1, $4)",
        [(org_id, customer_id, day, cost) for day, cost in costs.items()],
    )


async def add_daily_usage(
    pool: asyncpg.Pool,
    org: Org,
    customer_id: uuid.UUID,
    day: date,
    cost: str,
    requests: int,
    latency: tuple[float, int] = (0.0, 0),
) -> None:
    """One day of usage with tokens (10 prompt and 5 completion per request) and latency."""
    await pool.execute(
        "INSERT INTO daily_usage (organization_id, customer_id, day, requests, prompt_tokens, completion_tokens,"
        " total_tokens, cost, latency_sum, latency_count) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        org.id,
        customer_id,
        day,
        requests,
        requests * 10,
        requests * 5,
        requests * 15,
        Decimal(cost),
        latency[0],
        latency[1],
    )
