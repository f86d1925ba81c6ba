"""The SnapRefund route set (/compat/public) against SnapRefund's Get customers list
(https://snaprefund.readme.io/docs/get-customers): the example request replayed and its
response held to the doc's example field by field, the pagination the doc describes,
hasMore, subscriptions and hasActiveSubscription, bounds, authentication and permissions.

Where SnapRefund's docs are silent the adapter's module docstring is the contract (named where used)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from service.store import auth
from tests.compatkit import (
    CROWD_SIZE,
    PUBLIC_EXAMPLE,
    PUBLIC_LIST,
    UTC,
    Crowd,
    assert_like,
    get_json,
    newest_first,
    parse_z,
    response_schema,
)
from tests.factories import Org, add_subscription, insert_customer, set_columns
from tests.schemacheck import check as check_schema
from tests.support import problem, told, uid


async def _public_example(pool: asyncpg.Pool, org: Org) -> dict[str, Any]:
    ex = PUBLIC_EXAMPLE["data"][0]
    row = await insert_customer(pool, org, uid("public"), email="john@example.com")
    row = await set_columns(
        pool,
        row,
        first_name=ex["firstName"],
        last_name=ex["lastName"],
        phone=ex["phone"],
        stripe_customer_id=ex["stripeCustomerId"],
        created_at=parse_z(ex["createdAt"]),
        updated_at=parse_z(ex["updatedAt"]),
    )
    sub = ex["subscriptions"][0]
    plan = sub["plan"]
    await add_subscription(
        pool,
        org,
        row["id"],
        sub["id"],
        sub["status"],
        parse_z(sub["currentPeriodStart"]),
        parse_z(sub["currentPeriodEnd"]),
        {
            "stripe_price_id": plan["stripePriceId"],
            "name": plan["name"],
            "amount": plan["amount"],
            "currency": plan["currency"],
            "interval": plan["interval"],
        },
    )
    return row


async def test_public_replays_the_docs_example(
    client: TestClient, pool: asyncpg.Pool, org: Org, openapi_doc: dict
) -> None:
    row = await _public_example(pool, org)
    body = await get_json(client, f"{PUBLIC_LIST}?limit=10&offset=0&include_subscriptions=true", org.headers())
    check_schema(body, response_schema(openapi_doc, "GET", PUBLIC_LIST), openapi_doc)
    assert_like(body, PUBLIC_EXAMPLE)
    expected = {**PUBLIC_EXAMPLE["data"][0], "id": str(row["id"]), "email": "john@example.com"}
    assert body == {"data": [expected], "pagination": {"total": 1, "limit": 10, "offset": 0, "hasMore": False}}
    # Without include_subscriptions the subscriptions array is absent; hasActiveSubscription stays.
    for query in ("?limit=10&offset=0", "?include_subscriptions=false", ""):
        plain = await get_json(client, PUBLIC_LIST + query, org.headers())
        check_schema(plain, response_schema(openapi_doc, "GET", PUBLIC_LIST), openapi_doc)
        without = {k: v for k, v in PUBLIC_EXAMPLE["data"][0].items() if k != "subscriptions"}
        assert_like(plain["data"][0], without)
        assert plain["data"] == [{k: v for k, v in expected.items() if k != "subscriptions"}]
        assert plain["pagination"]["limit"] == (50 if "limit" not in query else 10)


async def test_public_pagination_of_the_docs(client: TestClient, crowd: Crowd) -> None:
    org, rows = crowd
    expected_ids = [str(r["id"]) for r in newest_first(rows)]
    first = await get_json(client, f"{PUBLIC_LIST}?limit=10&offset=0", org.headers())
    assert first["pagination"] == PUBLIC_EXAMPLE["pagination"]  # total 150, limit 10, offset 0, hasMore true
    second = await get_json(client, f"{PUBLIC_LIST}?limit=10&offset=10", org.headers())  # the doc's next page
    assert second["pagination"] == {"total": CROWD_SIZE, "limit": 10, "offset": 10, "hasMore": True}
    assert [c["id"] for c in first["data"] + second["data"]] == expected_ids[:20]
    # Incrementing offset by limit until hasMore is false walks everything once.
    walked: list[str] = []
    offset = 0
    while True:
        page = await get_json(client, f"{PUBLIC_LIST}?limit=100&offset={offset}", org.headers())
        walked += [c["id"] for c in page["data"]]
        if not page["pagination"]["hasMore"]:
            break
        offset += 100
    assert walked == expected_ids
    default = await get_json(client, PUBLIC_LIST, org.headers())
    assert default["pagination"] == {"total": CROWD_SIZE, "limit": 50, "offset": 0, "hasMore": True}
    assert [c["id"] for c in default["data"]] == expected_ids[:50]


@pytest.mark.parametrize(
    "limit, offset, has_more, returned",
    [
        (5, 0, False, 5),
        (4, 0, True, 4),
        (4, 1, False, 4),
        (2, 2, True, 2),
        (2, 3, False, 2),
        (2, 4, False, 1),
        (1, 3, True, 1),
        (1, 4, False, 1),
        (10, 5, False, 0),
        (100, 0, False, 5),
    ],
)
async def test_public_has_more(
    client: TestClient, pool: asyncpg.Pool, org: Org, limit: int, offset: int, has_more: bool, returned: int
) -> None:
    for _ in range(5):
        await insert_customer(pool, org, uid())
    body = await get_json(client, f"{PUBLIC_LIST}?limit={limit}&offset={offset}", org.headers())
    assert body["pagination"] == {"total": 5, "limit": limit, "offset": offset, "hasMore": has_more}
    assert len(body["data"]) == returned


async def test_public_subscriptions_and_has_active_subscription(
    client: TestClient, pool: asyncpg.Pool, org: Org
) -> None:
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    cases = {  # customer -> its subscriptions' statuses, and whether it counts as subscribed
        "none": ([], False),
        "active": (["active"], True),
        "trialing": (["trialing"], True),
        "past_due": (["past_due"], False),
        "canceled": (["canceled"], False),
        "mixed": (["canceled", "past_due", "trialing"], True),
        "lapsed": (["incomplete", "unpaid", "canceled"], False),
    }
    rows: dict[str, dict] = {}
    subs: dict[str, list[str]] = {}
    for i, (name, (statuses, _)) in enumerate(cases.items()):
        rows[name] = await insert_customer(pool, org, uid(name))
        rows[name] = await set_columns(pool, rows[name], created_at=t0 + timedelta(days=i))
        subs[name] = []
        for j, status in enumerate(statuses):
            sub_id = uid("sub")
            subs[name].append(sub_id)
            await add_subscription(
                pool,
                org,
                rows[name]["id"],
                sub_id,
                status,
                t0,
                t0 + timedelta(days=31),
                created_at=t0 + timedelta(minutes=j),
            )
    plain = await get_json(client, PUBLIC_LIST, org.headers())
    included = await get_json(client, f"{PUBLIC_LIST}?include_subscriptions=true", org.headers())
    for body, with_subs in ((plain, False), (included, True)):
        by_id = {c["id"]: c for c in body["data"]}
        for name, (statuses, active) in cases.items():
            customer = by_id[str(rows[name]["id"])]
            assert customer["hasActiveSubscription"] is active, (name, with_subs)
            assert ("subscriptions" in customer) is with_subs
            if with_subs:
                assert [s["id"] for s in customer["subscriptions"]] == subs[name]
                assert [s["status"] for s in customer["subscriptions"]] == statuses
                for s in customer["subscriptions"]:
                    assert s == {
                        "id": s["id"],
                        "status": s["status"],
                        "currentPeriodStart": "2024-01-01T00:00:00.000Z",
                        "currentPeriodEnd": "2024-02-01T00:00:00.000Z",
                        "plan": None,
                    }
    # A plan with some fields missing is an object with nulls, not absent.
    await add_subscription(
        pool, org, rows["none"]["id"], "sub_partial", "active", plan={"name": "Free", "amount": 0, "currency": "usd"}
    )
    await told(client, pool, org.id)
    body = await get_json(client, f"{PUBLIC_LIST}?include_subscriptions=true", org.headers())
    [none] = [c for c in body["data"] if c["id"] == str(rows["none"]["id"])]
    assert none["hasActiveSubscription"] is True
    assert none["subscriptions"] == [
        {
            "id": "sub_partial",
            "status": "active",
            "currentPeriodStart": None,
            "currentPeriodEnd": None,
            "plan": {"stripePriceId": None, "name": "Free", "amount": 0, "currency": "usd", "interval": None},
        }
    ]


@pytest.mark.parametrize(
    "query, name",
    [
        ("limit=101", "limit"),
        ("limit=0", "limit"),
        ("limit=-3", "limit"),
        ("limit=lots", "limit"),
        ("offset=-1", "offset"),
        ("offset=one", "offset"),
        ("include_subscriptions=perhaps", "include_subscriptions"),
        ("page=2", "page"),
    ],
)
async def test_public_refuses_invalid_limit_or_offset(client: TestClient, org: Org, query: str, name: str) -> None:
    await problem(await client.get(f"{PUBLIC_LIST}?{query}", headers=org.headers()), 400, name)


async def test_public_limit_maximum_is_100(client: TestClient, crowd: Crowd) -> None:
    org, _ = crowd
    body = await get_json(client, f"{PUBLIC_LIST}?limit=100", org.headers())
    assert len(body["data"]) == 100 and body["pagination"]["hasMore"] is True


async def test_public_authentication_and_permissions(
    client: TestClient, pool: asyncpg.Pool, org: Org, other_org: Org
) -> None:
    mine = await insert_customer(pool, org, uid())
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer tly_000000000000.x"}):
        await problem(await client.get(PUBLIC_LIST, headers=headers), 401)  # invalid or missing token
    async with pool.acquire() as conn:
        write_only = await auth.create_key(conn, org.name, ("write",))
    await problem(await client.get(PUBLIC_LIST, headers=org.headers(write_only.key)), 403)  # insufficient permissions
    assert [c["id"] for c in (await get_json(client, PUBLIC_LIST, org.headers()))["data"]] == [str(mine["id"])]
    theirs = await get_json(client, f"{PUBLIC_LIST}?include_subscriptions=true", other_org.headers())
    assert theirs == {"data": [], "pagination": {"total": 0, "limit": 50, "offset": 0, "hasMore": False}}
