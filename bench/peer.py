"""The list a team would write by hand, for bench/read.py to measure tally against: FastAPI,
asyncpg and a pydantic response model over one plain table (``peer_customers``: the same
customers, profile and usage in one row), the sort's own index, and no count.

    uvicorn bench.peer:app   # PEER_DATABASE_URL=postgresql://… PEER_ORGANIZATION=<uuid>

bench/read.py makes the table (``prepare``) and starts this app with uvicorn, one process,
as tally's API runs.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg
from fastapi import FastAPI, HTTPException, Query
from pydantic import BaseModel

COLUMNS = (
    "id, customer_identifier, name, email, status, metadata, created_at, updated_at, first_seen, last_active, "
    "active_days, number_of_requests, prompt_tokens, completion_tokens, total_tokens, total_cost, average_latency"
)
# The sorts it offers, each with its index (made by ``prepare``).
SORTS = {
    "-total_cost": "total_cost DESC, id DESC",
    "created_at": "created_at, id",
    "-created_at": "created_at DESC, id DESC",
}


async def prepare(conn: asyncpg.Connection, organization: UUID) -> int:
    """(Re)make ``peer_customers`` from tally's rows of ``organization``; its row count."""
    await conn.execute("DROP TABLE IF EXISTS peer_customers")
    # CREATE TABLE AS takes no parameters; a UUID's text is safe to inline.
    await conn.execute(
        f"CREATE TABLE peer_customers AS SELECT organization_id, {COLUMNS} FROM customer_rows"
        f" WHERE organization_id = '{UUID(str(organization))}' AND environment = 'prod'"
    )
    await conn.execute("ALTER TABLE peer_customers ADD PRIMARY KEY (organization_id, id)")
    await conn.execute("CREATE UNIQUE INDEX ON peer_customers (organization_id, customer_identifier)")
    await conn.execute("CREATE INDEX ON peer_customers (organization_id, total_cost DESC, id DESC)")
    await conn.execute("CREATE INDEX ON peer_customers (organization_id, created_at, id)")
    await conn.execute("VACUUM ANALYZE peer_customers")
    return int(await conn.fetchval("SELECT count(*) FROM peer_customers"))


class Customer(BaseModel):
    id: UUID
    customer_identifier: str
    name: str | None
    email: str | None
    status: str
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    first_seen: datetime | None
    last_active: datetime | None
    active_days: int
    number_of_requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    total_cost: Decimal
    average_latency: float | None


class Page(BaseModel):
    results: list[Customer]


POOL: dict[str, asyncpg.Pool] = {}


async def _init(conn: asyncpg.Connection) -> None:
    import json

    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    POOL["pool"] = await asyncpg.create_pool(os.environ["PEER_DATABASE_URL"], min_size=8, max_size=8, init=_init)
    yield
    await POOL.pop("pool").close()


app = FastAPI(lifespan=lifespan)
ORGANIZATION = UUID(os.environ.get("PEER_ORGANIZATION", "00000000-0000-0000-0000-000000000000"))


@app.get("/customers", response_model=Page)
async def list_customers(
    sort_by: str = Query("-total_cost"), limit: int = Query(50, ge=1, le=1000), offset: int = Query(0, ge=0)
) -> Page:
    order = SORTS.get(sort_by)
    if order is None:
        raise HTTPException(400, f"sort_by must be one of {sorted(SORTS)}")
    rows = await POOL["pool"].fetch(
        f"SELECT {COLUMNS} FROM peer_customers WHERE organization_id = $1 ORDER BY {order} LIMIT $2 OFFSET $3",
        ORGANIZATION,
        limit,
        offset,
    )
    return Page(results=[Customer.model_validate(dict(r)) for r in rows])


@app.get("/customers/{identifier}", response_model=Customer)
async def get_customer(identifier: str) -> Customer:
    row = await POOL["pool"].fetchrow(
        f"SELECT {COLUMNS} FROM peer_customers WHERE organization_id = $1 AND customer_identifier = $2",
        ORGANIZATION,
        identifier,
    )
    if row is None:
        raise HTTPException(404, "no such customer")
    return Customer.model_validate(dict(row))
