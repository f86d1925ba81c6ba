"""The Devdraft route set (/compat/v0, authenticated by x-client-key + x-client-secret) against
Devdraft's List customers (https://docs.devdraft.ai/developers/customers/list-customers),
which gives no example body, only its field lists (with their
kinds): the documented request replayed, every field's kind, the skip/take walk, the
filters, the bounds and the authentication.

Where Devdraft's docs are silent the adapter's module docstring is the contract (named where used)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from tests.compatkit import (
    CROWD_SIZE,
    ISO_MS,
    UTC,
    V0_CUSTOMER_KINDS,
    V0_ENVELOPE_KINDS,
    V0_LIST,
    Crowd,
    assert_kinds,
    get_json,
    newest_first,
    response_schema,
)
from tests.factories import Org, client_pair, insert_customer, set_columns
from tests.schemacheck import check as check_schema
from tests.support import problem, uid


async def _v0_customers(pool: asyncpg.Pool, org: Org, count: int = 25) -> list[dict[str, Any]]:
    """``count`` customers, the first complete (every field of Devdraft's docs set), created a minute apart."""
    rows = []
    for i in range(count):
        row = await insert_customer(
            pool, org, f"v0_{i:02d}", name=f"Person {i:02d}", email=f"person{i:02d}@example.com"
        )
        rows.append(
            await set_columns(
                pool,
                row,
                created_at=datetime(2024, 3, 1, tzinfo=UTC) + timedelta(minutes=i),
                updated_at=datetime(2024, 3, 2, tzinfo=UTC) + timedelta(minutes=i),
            )
        )
    rows[0] = await set_columns(
        pool,
        rows[0],
        first_name="John",
        last_name="Doe",
        phone="+14155550123",
        customer_type="Individual",
        last_transaction_amount=Decimal("49.99"),
        last_purchase_date=datetime(2024, 2, 28, 17, 5, 9, 250000, tzinfo=UTC),
        application_id="app_123",
        created_at=datetime(2024, 6, 1, 12, 0, 0, 125000, tzinfo=UTC),
        updated_at=datetime(2024, 6, 2, 8, 30, tzinfo=UTC),
    )
    await pool.execute(
        "UPDATE customers SET name = 'John Doe', email = 'john.doe@example.com' WHERE id = $1", rows[0]["id"]
    )
    return rows


async def test_v0_replays_the_documented_request(
    client: TestClient, pool: asyncpg.Pool, org: Org, openapi_doc: dict
) -> None:
    rows = await _v0_customers(pool, org)
    pair = await client_pair(pool, org)
    body = await get_json(client, V0_LIST, pair)
    check_schema(body, response_schema(openapi_doc, "GET", V0_LIST), openapi_doc)
    assert_kinds(body, V0_ENVELOPE_KINDS)
    # Defaults: skip 0, take 10; take is the number returned; newest first.
    assert (body["total"], body["skip"], body["take"], len(body["customers"])) == (25, 0, 10, 10)
    assert [c["id"] for c in body["customers"]] == [str(r["id"]) for r in newest_first(rows)[:10]]
    for customer in body["customers"]:
        assert_kinds(customer, V0_CUSTOMER_KINDS, nullable=True)
        uuid.UUID(customer["id"])
        for key in ("createdAt", "updatedAt"):
            assert ISO_MS.match(customer[key]), customer[key]
    complete = body["customers"][0]
    assert_kinds(complete, V0_CUSTOMER_KINDS)  # a complete customer has no nulls
    assert complete == {
        "id": str(rows[0]["id"]),
        "firstName": "John",
        "lastName": "Doe",
        "email": "john.doe@example.com",
        "phone": "+14155550123",
        "customerType": "Individual",
        "status": "ACTIVE",
        "lastTransactionAmount": 49.99,
        "lastPurchaseDate": "2024-02-28T17:05:09.250Z",
        "applicationId": "app_123",
        "createdAt": "2024-06-01T12:00:00.125Z",
        "updatedAt": "2024-06-02T08:30:00.000Z",
    }
    # Devdraft's example values: skip 20, take 50.
    body = await get_json(client, f"{V0_LIST}?skip=20&take=50", pair)
    assert (body["total"], body["skip"], body["take"]) == (25, 20, 5)
    assert [c["id"] for c in body["customers"]] == [str(r["id"]) for r in newest_first(rows)[20:]]
    body = await get_json(client, f"{V0_LIST}?skip=25", pair)
    assert (body["total"], body["take"], body["customers"]) == (25, 0, [])


async def test_v0_skip_take_walk_is_complete(client: TestClient, pool: asyncpg.Pool, crowd: Crowd) -> None:
    org, rows = crowd
    pair = await client_pair(pool, org)
    for take in (100, 7):
        seen: list[str] = []
        skip = 0
        while True:
            body = await get_json(client, f"{V0_LIST}?skip={skip}&take={take}", pair)
            assert body["total"] == CROWD_SIZE and body["skip"] == skip and body["take"] == len(body["customers"])
            if not body["customers"]:
                break
            seen += [c["id"] for c in body["customers"]]
            skip += take
        assert seen == [str(r["id"]) for r in newest_first(rows)]


async def test_v0_filters(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    people = {
        "john": ("John Doe", "John.Doe@Example.com", "active"),
        "johnny": ("Johnny Walker", "johnny@example.com", "active"),
        "elton": ("Elton JOHN", "elton@example.com", "blacklisted"),
        "jane": ("Jane Doe", "john.doe@example.com.au", "deactivated"),
        "draft": ("Draft Person", "xjohn.doe@example.com", "draft"),
        "archived": ("Old Customer", None, "archived"),
        "percent": ("100% John_ny", "p@example.com", "active"),
    }
    rows = {}
    for key, (name, email, status) in people.items():
        rows[key] = await insert_customer(pool, org, uid(key), name=name, email=email, status=status)
    pair = await client_pair(pool, org)

    async def who(query: str) -> set[str]:
        body = await get_json(client, f"{V0_LIST}?take=100&{query}", pair)
        assert body["total"] == len(body["customers"])
        found = {c["id"] for c in body["customers"]}
        return {k for k, r in rows.items() if str(r["id"]) in found}

    # Devdraft's examples: status "ACTIVE", name "John", email "john.doe@example.com".
    assert await who("status=ACTIVE") == {"john", "johnny", "percent"}
    assert await who("status=BLACKLISTED") == {"elton"}
    assert await who("status=DEACTIVATED") == {"jane"}
    assert await who("name=John") == {"john", "johnny", "elton", "percent"}  # partial, case-insensitive
    assert await who("name=oHn%20d") == {"john"}
    assert (
        await who("name=100%25") == {"percent"} and await who("name=h_n") == set()
    )  # wildcards are literal ("Johnny" would match h_n)
    assert await who("email=john.doe@example.com") == {"john"}  # exact, case-insensitive
    assert await who("email=JOHN.DOE@EXAMPLE.COM") == {"john"}
    assert await who("email=john") == set()
    assert await who("name=john&status=ACTIVE") == {"john", "johnny", "percent"}
    assert await who("name=john&status=BLACKLISTED&email=elton@example.com") == {"elton"}
    # Statuses show upper case; tally's own draft/archived show as such (adapter docstring).
    body = await get_json(client, f"{V0_LIST}?take=100", pair)
    assert {c["status"] for c in body["customers"]} == {"ACTIVE", "BLACKLISTED", "DEACTIVATED", "DRAFT", "ARCHIVED"}


@pytest.mark.parametrize(
    "query, name",
    [
        ("take=0", "take"),
        ("take=101", "take"),
        ("take=-5", "take"),
        ("take=ten", "take"),
        ("skip=-1", "skip"),
        ("skip=x", "skip"),
        ("status=active", "status"),
        ("status=PENDING", "status"),
        ("limit=10", "limit"),
    ],
)
async def test_v0_refuses_bad_parameters(
    client: TestClient, pool: asyncpg.Pool, org: Org, query: str, name: str
) -> None:
    pair = await client_pair(pool, org)
    await problem(await client.get(f"{V0_LIST}?{query}", headers=pair), 400, name)


async def test_v0_take_bounds_are_inclusive(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    for _ in range(3):
        await insert_customer(pool, org, uid())
    pair = await client_pair(pool, org)
    assert (await get_json(client, f"{V0_LIST}?take=1", pair))["take"] == 1
    assert (await get_json(client, f"{V0_LIST}?take=100&skip=0", pair))["take"] == 3


async def test_v0_authentication(client: TestClient, pool: asyncpg.Pool, org: Org, other_org: Org) -> None:
    await insert_customer(pool, org, uid())
    pair = await client_pair(pool, org)
    assert (await get_json(client, V0_LIST, pair))["total"] == 1
    for headers in (
        {},
        {"x-client-key": pair["x-client-key"]},  # missing secret
        {"x-client-key": pair["x-client-key"], "x-client-secret": ""},
        {"x-client-key": pair["x-client-key"], "x-client-secret": "wrong"},
        {"x-client-key": "tly_000000000000", "x-client-secret": pair["x-client-secret"]},
        {"x-client-secret": pair["x-client-secret"]},  # missing key
    ):
        await problem(await client.get(V0_LIST, headers=headers), 401)
    # Another organization's pair sees none of these customers.
    theirs = await get_json(client, V0_LIST, await client_pair(pool, other_org))
    assert (theirs["total"], theirs["customers"]) == (0, [])
