"""The four compatibility route sets against their vendors' docs (../shared/seeds/000…004).

Each seed's example requests are replayed as written there (query strings and headers, with
tally's base URL), and each response is held to the doc's example field by field: the same
set of keys, the same JSON kind for every value, the doc's timestamp format, and values
mapped from a stored customer whose every field is known. Then the bounds, error codes,
filters, pagination walks and cross-organization isolation each seed lists.

Where a seed is silent the adapter's module docstring is the contract (named where used).
"""

from __future__ import annotations

import copy
import re
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from service.core import auth
from service.api.compat import flexprice, public, respan, v0
from tests.conftest import Org, insert_customer, make_org
from tests.support import follow, ok_json, problem, rel, uid
from tests.test_openapi import check as check_schema

UTC = timezone.utc

RESPAN_LIST = "/compat/respan/api/users/list/"
RESPAN_USER = "/compat/respan/api/users/{}/"
V0_LIST = "/compat/v0/api/v0/customers"
FLEXPRICE_LIST = "/compat/flexprice/v1/customers"
PUBLIC_LIST = "/compat/public/api/public/customers"

# ---------------------------------------------------------------------------------------------
# The seeds' examples, verbatim (seed 004's e-mail is the doc's own, as published).

# Seed 000: GET /api/users/list/?page=1&page_size=50&sort_by=-first_seen&environment=prod
RESPAN_LIST_EXAMPLE: dict[str, Any] = {
    "count": 51,
    "next": "https://api.respan.ai/api/users/list/?page=2",
    "previous": None,
    "results": [
        {
            "id": "user_123prod8264a3f4-40c7-476a-97d1-96908127ea21",
            "unique_organization_id": "8264a3f4-40c7-476a-97d1-96908127ea21",
            "customer_identifier": "user_123",
            "environment": "prod",
            "name": "John Doe",
            "email": "john@example.com",
            "first_seen": "2025-10-15T08:00:00Z",
            "last_active_timeframe": "2025-12-29T10:30:00Z",
            "active_days": 75,
            "number_of_requests": 15420,
            "total_tokens": 170000,
            "total_cost": 523.45,
            "average_latency": 1.23,
            "average_ttft": 0.45,
        }
    ],
}

# Seed 001: GET /api/users/customer_identifier/ -d environment=prod
RESPAN_DETAIL_EXAMPLE: dict[str, Any] = {
    "id": "user_123",
    "name": "John Doe",
    "email": "john@example.com",
    "customer_identifier": "user_123",
    "environment": "prod",
    "total_budget": 1000,
    "period_budget": 100,
    "organization_name": "Acme Inc",
    "total_period_usage": 45.67,
    "period_start": "2025-12-01T00:00:00Z",
    "period_end": None,
    "budget_duration": "monthly",
    "updated_at": "2025-12-29T10:30:00Z",
}

# Seed 002 gives no example body, only its field lists (with their kinds); the names are the
# adapter's documented choice (camelCase fields; envelope customers/total/skip/take).
V0_CUSTOMER_KINDS = {
    "id": "string", "firstName": "string", "lastName": "string", "email": "string", "phone": "string",
    "customerType": "string", "status": "string", "lastTransactionAmount": "number",
    "lastPurchaseDate": "string", "applicationId": "string", "createdAt": "string", "updatedAt": "string",
}  # fmt: skip
V0_ENVELOPE_KINDS = {"customers": "array", "total": "number", "skip": "number", "take": "number"}

# Seed 003: GET /v1/customers?limit=10&offset=0&order=desc
FLEXPRICE_EXAMPLE: dict[str, Any] = {
    "items": [
        {
            "id": "cust_abc123xyz789",
            "external_id": "user_12345",
            "name": "Acme Corporation",
            "email": "billing@acme.com",
            "address_line1": "123 Main Street",
            "address_line2": "",
            "address_city": "San Francisco",
            "address_state": "CA",
            "address_postal_code": "94105",
            "address_country": "US",
            "parent_customer_id": None,
            "metadata": {"plan_tier": "enterprise"},
            "environment_id": "env_prod_001",
            "tenant_id": "tenant_001",
            "status": "published",
            "created_at": "2024-01-15T10:30:00Z",
            "updated_at": "2024-01-15T10:30:00Z",
        },
        {
            "id": "cust_def456uvw012",
            "external_id": "user_67890",
            "name": "Tech Startup Inc",
            "email": "admin@techstartup.com",
            "address_line1": "456 Innovation Ave",
            "address_line2": "Suite 200",
            "address_city": "Austin",
            "address_state": "TX",
            "address_postal_code": "78701",
            "address_country": "US",
            "parent_customer_id": None,
            "metadata": {"plan_tier": "growth"},
            "environment_id": "env_prod_001",
            "tenant_id": "tenant_001",
            "status": "published",
            "created_at": "2024-01-14T09:15:00Z",
            "updated_at": "2024-01-14T09:15:00Z",
        },
    ],
    "pagination": {"total": 2, "limit": 10, "offset": 0},
}

# Seed 004: GET /api/public/customers (include_subscriptions=true for the subscriptions array).
PUBLIC_EXAMPLE: dict[str, Any] = {
    "data": [
        {
            "id": "123",
            "email": "[email protected]",
            "firstName": "John",
            "lastName": "Doe",
            "phone": "+1234567890",
            "stripeCustomerId": "cus_ExampleCustomerID123",
            "hasActiveSubscription": True,
            "subscriptions": [
                {
                    "id": "sub_ExampleSubscription123",
                    "status": "active",
                    "currentPeriodStart": "2024-01-01T00:00:00.000Z",
                    "currentPeriodEnd": "2024-02-01T00:00:00.000Z",
                    "plan": {
                        "stripePriceId": "price_ExamplePriceID456",
                        "name": "Premium Plan",
                        "amount": 4999,
                        "currency": "usd",
                        "interval": "month",
                    },
                }
            ],
            "createdAt": "2023-12-01T00:00:00.000Z",
            "updatedAt": "2024-01-15T00:00:00.000Z",
        }
    ],
    "pagination": {"total": 150, "limit": 10, "offset": 0, "hasMore": True},
}

# Timestamp formats as the examples write them.
ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")  # respan, flexprice
ISO_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")  # public (and v0: ISO 8601)


def test_the_timestamp_patterns_are_the_examples_own() -> None:
    """The format checks below are the seeds' formats (and tell them apart)."""
    for stamp in ("2025-10-15T08:00:00Z", "2025-12-29T10:30:00Z", "2024-01-15T10:30:00Z"):
        assert ISO_Z.match(stamp) and not ISO_MS.match(stamp)
    for stamp in ("2024-01-01T00:00:00.000Z", "2023-12-01T00:00:00.000Z"):
        assert ISO_MS.match(stamp) and not ISO_Z.match(stamp)
    # Seed 000's list id is customer_identifier + environment + organization id.
    ex = RESPAN_LIST_EXAMPLE["results"][0]
    assert ex["id"] == ex["customer_identifier"] + ex["environment"] + ex["unique_organization_id"]


# ---------------------------------------------------------------------------------------------
# Helpers.


def kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    assert isinstance(value, dict), value
    return "object"


def assert_like(actual: Any, example: Any, *, also: dict[str, set[str]] | None = None,
                opaque: frozenset[str] = frozenset({"metadata"}), where: str = "$") -> None:  # fmt: skip
    """``actual`` has exactly the example's keys, and each value the example value's JSON kind
    (plus the kinds ``also`` allows for that key: e.g. a string where the example shows null,
    for a field the doc calls "or null"). Objects and arrays recurse (an array's items against
    the example's first item); ``opaque`` objects (user data) are compared by kind only."""
    also = also or {}
    assert kind(actual) == kind(example), f"{where}: {actual!r} is {kind(actual)}, the doc's is {kind(example)}"
    if isinstance(example, dict):
        assert set(actual) == set(example), (
            f"{where}: extra keys {sorted(set(actual) - set(example))}, missing {sorted(set(example) - set(actual))}"
        )
        for key, ex in example.items():
            value = actual[key]
            allowed = {kind(ex)} | also.get(key, set())
            assert kind(value) in allowed, f"{where}.{key}: {value!r} is {kind(value)}, expected one of {allowed}"
            if kind(value) == kind(ex) and key not in opaque and isinstance(ex, (dict, list)):
                assert_like(value, ex, also=also, opaque=opaque, where=f"{where}.{key}")
    elif isinstance(example, list) and example:
        for i, item in enumerate(actual):
            assert_like(item, example[0], also=also, opaque=opaque, where=f"{where}[{i}]")


def assert_kinds(actual: dict[str, Any], kinds: dict[str, str], *, nullable: bool = False, where: str = "$") -> None:
    assert set(actual) == set(kinds), (sorted(set(actual) - set(kinds)), sorted(set(kinds) - set(actual)))
    for key, expected_kind in kinds.items():
        allowed = {expected_kind, "null"} if nullable else {expected_kind}
        assert kind(actual[key]) in allowed, f"{where}.{key}: {actual[key]!r} is not {allowed}"


class _AnyLink:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and URL(other).is_absolute()


ANY_LINK = _AnyLink()


def z(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ms(dt: datetime) -> str:
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_z(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# Columns insert_customer does not take; the tests set them directly.
_EXTRA_COLUMNS = frozenset({
    "first_name", "last_name", "phone", "customer_type", "address_line1", "address_line2", "address_city",
    "address_state", "address_postal_code", "address_country", "stripe_customer_id", "application_id",
    "last_transaction_amount", "last_purchase_date", "created_at", "updated_at",
})  # fmt: skip


async def set_columns(pool: asyncpg.Pool | asyncpg.Connection, row: dict, **columns: Any) -> dict:
    assert set(columns) <= _EXTRA_COLUMNS, set(columns) - _EXTRA_COLUMNS
    sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(columns, start=3))
    return dict(await pool.fetchrow(
        f"UPDATE customers SET {sets} WHERE organization_id = $1 AND id = $2 RETURNING *",
        row["organization_id"], row["id"], *columns.values(),
    ))  # fmt: skip


async def add_subscription(pool: asyncpg.Pool, org: Org, customer_id: uuid.UUID, sub_id: str, status: str,
                           start: datetime | None = None, end: datetime | None = None,
                           plan: dict[str, Any] | None = None, created_at: datetime | None = None) -> None:  # fmt: skip
    plan = plan or {}
    await pool.execute(
        "INSERT INTO subscriptions (organization_id, id, customer_id, status, current_period_start, current_period_end,"
        " plan_stripe_price_id, plan_name, plan_amount, plan_currency, plan_interval, source_time, created_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, now(), coalesce($12, now()))",
        org.id, sub_id, customer_id, status, start, end, plan.get("stripe_price_id"), plan.get("name"),
        plan.get("amount"), plan.get("currency"), plan.get("interval"), created_at,
    )  # fmt: skip


async def add_daily_cost(pool: asyncpg.Pool, row: dict, day: date, cost: Decimal) -> None:
    await pool.execute(
        "INSERT INTO daily_usage (organization_id, customer_id, day, requests, cost) VALUES ($1, $2, $3, 1, $4)",
        row["organization_id"], row["id"], day, cost,
    )  # fmt: skip


async def client_pair(pool: asyncpg.Pool, org: Org, scopes: tuple[str, ...] = ("read",),
                      environment: str = "prod") -> dict[str, str]:  # fmt: skip
    """The seed 002 header pair for a new key of ``org``."""
    async with pool.acquire() as conn:
        key = await auth.create_key(conn, org.name, scopes, environment=environment)
    return {"x-client-key": key.client_key, "x-client-secret": key.client_secret}


async def get_json(client: TestClient, url: str, headers: dict[str, str]) -> Any:
    return await ok_json(await client.get(url, headers=headers))


@pytest.fixture(scope="module")
async def openapi_doc(client: TestClient) -> dict[str, Any]:
    return await get_json(client, "/openapi.json", {})


def response_schema(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    return doc["paths"][path][method.lower()]["responses"]["200"]["content"]["application/json"]["schema"]


# ---------------------------------------------------------------------------------------------
# A read-only organization of 150 prod customers (and 3 test ones) shared by the pagination
# walks: created_at ties in threes, first_seen ties and missing values, so that only a stable
# tie-break pages without loss or repetition. No test writes to it.

CROWD_SIZE = 150
CROWD_BASE = datetime(2025, 1, 1, tzinfo=UTC)


Crowd = tuple[Org, list[dict[str, Any]]]


@pytest.fixture(scope="module")
async def crowd(pool: asyncpg.Pool) -> Crowd:
    org = await make_org(pool)
    rows = []
    async with pool.acquire() as conn, conn.transaction():
        for i in range(CROWD_SIZE):
            row = await insert_customer(
                conn, org, f"crowd{i:03d}", name=f"Crowd {i:03d}", email=f"crowd{i:03d}@example.com",
                first_seen=None if i % 10 == 0 else CROWD_BASE + timedelta(hours=i % 40),
            )  # fmt: skip
            rows.append(await set_columns(conn, row, created_at=CROWD_BASE + timedelta(minutes=i // 3)))
        for i in range(3):
            await insert_customer(conn, org, f"crowdtest{i}", environment="test")
    return org, rows


def newest_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """created_at descending, ties broken by id descending (the adapters' documented order)."""
    return sorted(rows, key=lambda r: (r["created_at"], r["id"]), reverse=True)


def by_first_seen_desc(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    floor = datetime.min.replace(tzinfo=UTC)
    return sorted(rows, key=lambda r: (r["first_seen"] or floor, r["id"]), reverse=True)


# =============================================================================================
# Respan (seeds 000 and 001): /compat/respan


async def _respan_example_user(pool: asyncpg.Pool, org: Org) -> dict[str, Any]:
    """The customer of seed 000's and 001's examples, every field as the examples show it."""
    row = await insert_customer(
        pool, org, "user_123", name="John Doe", email="john@example.com",
        first_seen=datetime(2025, 10, 15, 8, 0, tzinfo=UTC), last_active=datetime(2025, 12, 29, 10, 30, tzinfo=UTC),
        active_days=75, number_of_requests=15420, prompt_tokens=120000, completion_tokens=50000, total_tokens=170000,
        total_cost=Decimal("523.45"), latency_sum=2.46, latency_count=2, ttft_sum=0.9, ttft_count=2,
        total_budget=Decimal("1000"), period_budget=Decimal("100"), budget_duration="monthly",
    )  # fmt: skip
    return await set_columns(pool, row, updated_at=datetime(2025, 12, 29, 10, 30, tzinfo=UTC))


async def test_respan_list_replays_the_seed_example(client: TestClient, pool: asyncpg.Pool, org: Org,
                                                    openapi_doc: dict) -> None:  # fmt: skip
    user = await _respan_example_user(pool, org)
    others = []
    for i in range(50):  # 51 customers in all, as in the example's count
        others.append(await insert_customer(
            pool, org, f"user_{i:03d}", name=f"User {i}", email=f"user{i}@example.com",
            first_seen=None if i % 10 == 0 else datetime(2025, 10, 1, tzinfo=UTC) - timedelta(hours=i),
            last_active=datetime(2025, 10, 2, tzinfo=UTC), active_days=i, number_of_requests=i * 3,
            total_tokens=i * 100, total_cost=Decimal(i) / 4,
        ))  # fmt: skip
    await insert_customer(pool, org, "user_test_env", environment="test")  # other environment: not listed

    query = "?page=1&page_size=50&sort_by=-first_seen&environment=prod"
    body = await get_json(client, RESPAN_LIST + query, org.headers())
    check_schema(body, response_schema(openapi_doc, "GET", RESPAN_LIST), openapi_doc)
    assert_like(
        body,
        RESPAN_LIST_EXAMPLE,
        also={
            "previous": {"string"},
            "next": {"null"},
            # tally has no latency/ttft/name/e-mail/first use for some customers
            "average_latency": {"null"},
            "average_ttft": {"null"},
            "first_seen": {"null"},
            "name": {"null"},
            "email": {"null"},
        },
    )
    assert body["count"] == 51 and len(body["results"]) == 50 and body["previous"] is None

    # The example's customer, field by field: only the organization's id differs.
    expected = copy.deepcopy(RESPAN_LIST_EXAMPLE["results"][0])
    expected["unique_organization_id"] = str(org.id)
    expected["id"] = "user_123" + "prod" + str(org.id)
    assert body["results"][0] == expected
    assert_like(body["results"][0], RESPAN_LIST_EXAMPLE["results"][0])  # no nulls for a complete customer
    for result in body["results"]:
        for key in ("first_seen", "last_active_timeframe"):
            assert result[key] is None or ISO_Z.match(result[key]), result[key]
        assert result["id"] == result["customer_identifier"] + "prod" + str(org.id)

    # next is an absolute URL to page 2 of the same query; previous of page 2 back to page 1.
    nxt = URL(body["next"])
    assert nxt.is_absolute() and nxt.scheme == "http" and nxt.path == RESPAN_LIST
    assert dict(nxt.query) == {"page": "2", "page_size": "50", "sort_by": "-first_seen", "environment": "prod"}
    second = await get_json(client, rel(body["next"]), org.headers())
    assert second["count"] == 51 and second["next"] is None and len(second["results"]) == 1
    prev = URL(second["previous"])
    assert prev.is_absolute() and prev.path == RESPAN_LIST and prev.query["page"] == "1"
    assert await get_json(client, rel(second["previous"]), org.headers()) == body

    walked = [r["customer_identifier"] for page in (body, second) for r in page["results"]]
    assert walked == [r["customer_identifier"] for r in by_first_seen_desc([user, *others])]

    # Every default is the doc's (page 1, 50 per page, -first_seen, prod); next is then the
    # example's own link: the list's URL with ?page=2.
    default = await get_json(client, RESPAN_LIST, org.headers())
    assert {**default, "next": None} == {**body, "next": None}
    assert URL(default["next"]).path == RESPAN_LIST and dict(URL(default["next"]).query) == {"page": "2"}
    # The seed types page and page_size as numbers ("double"): whole values written as such work.
    assert await get_json(client, RESPAN_LIST + "?page=1.0&page_size=50.0", org.headers()) == {
        **default,
        "next": ANY_LINK,
    }
    await problem(await client.get(RESPAN_LIST + "?page=1.5", headers=org.headers()), 400, "page")


async def test_respan_list_sorts_by_the_fields_the_seed_names(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    rows = []
    for i, (email, cost, requests) in enumerate([("d@x.io", "5.5", 7), ("a@x.io", "10", 1), (None, "0.25", 30),
                                                 ("c@x.io", "100", 4), ("b@x.io", "9.75", 12)]):  # fmt: skip
        rows.append(await insert_customer(
            pool, org, f"sorted_{'qwert'[i]}", email=email, total_cost=Decimal(cost), number_of_requests=requests,
            first_seen=datetime(2025, 5, 1 + (i * 3) % 5, tzinfo=UTC),
        ))  # fmt: skip

    def order(key, reverse=False) -> list[str]:  # type: ignore[no-untyped-def]
        return [r["customer_identifier"] for r in sorted(rows, key=key, reverse=reverse)]

    cases = {
        "customer_identifier": order(lambda r: r["customer_identifier"]),
        "-total_cost": order(lambda r: r["total_cost"], reverse=True),
        "email": order(lambda r: r["email"] or ""),  # a missing e-mail sorts lowest
        "-number_of_requests": order(lambda r: r["number_of_requests"], reverse=True),
        "-first_seen": order(lambda r: r["first_seen"], reverse=True),
        "first_seen": order(lambda r: r["first_seen"]),
    }
    for sort_by, want in cases.items():
        body = await get_json(client, f"{RESPAN_LIST}?sort_by={sort_by}", org.headers())
        assert [r["customer_identifier"] for r in body["results"]] == want, sort_by
    await problem(await client.get(f"{RESPAN_LIST}?sort_by=-shoe_size", headers=org.headers()), 400, "sort_by")


async def test_respan_following_next_walks_everything_exactly_once(client: TestClient, crowd: Crowd) -> None:
    org, rows = crowd
    first = await get_json(client, f"{RESPAN_LIST}?page_size=7", org.headers())
    pages = await follow(client, first, org.headers())
    assert len(pages) == -(-CROWD_SIZE // 7)
    assert all(p["count"] == CROWD_SIZE for p in pages)
    walked = [r["customer_identifier"] for p in pages for r in p["results"]]
    assert walked == [r["customer_identifier"] for r in by_first_seen_desc(rows)]  # each once, in order
    for page in pages:
        for link in (page["next"], page["previous"]):
            if link is not None:
                assert URL(link).is_absolute() and URL(link).path == RESPAN_LIST
                assert URL(link).query["page_size"] == "7"
    # ...and previous walks back over the same pages.
    back = await follow(client, pages[-1], org.headers(), link="previous")
    assert [p["results"] for p in reversed(back)] == [p["results"] for p in pages]
    # Past the end: an empty page, no next.
    beyond = await get_json(client, f"{RESPAN_LIST}?page_size=7&page={len(pages) + 1}", org.headers())
    assert beyond["results"] == [] and beyond["next"] is None and beyond["count"] == CROWD_SIZE


@pytest.mark.parametrize(
    "query, name",
    [("page_size=1001", "page_size"), ("page_size=0", "page_size"), ("page_size=ten", "page_size"),
     ("page=0", "page"), ("page=-1", "page"), ("page=x", "page"), ("sort_by=bogus", "sort_by"),
     ("environment=staging", "environment"), ("colour=blue", "colour")],
)  # fmt: skip
async def test_respan_list_refuses_bad_parameters(client: TestClient, org: Org, query: str, name: str) -> None:
    await problem(await client.get(f"{RESPAN_LIST}?{query}", headers=org.headers()), 400, name)


async def test_respan_page_size_maximum_is_1000(client: TestClient, crowd: Crowd) -> None:
    org, _ = crowd
    body = await get_json(client, f"{RESPAN_LIST}?page_size=1000", org.headers())
    assert len(body["results"]) == CROWD_SIZE and body["next"] is None and body["count"] == CROWD_SIZE


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer"}, {"Authorization": "Bearer not-a-key"}, {"Authorization": "Token abc"},
     {"Authorization": "Bearer tly_000000000000.wrong-secret"}],
    ids=["missing", "empty", "malformed", "scheme", "unknown"],
)  # fmt: skip
async def test_respan_missing_or_bad_key_is_401(client: TestClient, pool: asyncpg.Pool, org: Org,
                                                headers: dict[str, str]) -> None:  # fmt: skip
    await insert_customer(pool, org, "user_123")
    for method, path in [
        ("GET", RESPAN_LIST),
        ("GET", RESPAN_USER.format("user_123")),
        ("PATCH", RESPAN_USER.format("user_123")),
        ("DELETE", RESPAN_USER.format("user_123")),
    ]:
        resp = await client.request(method, path, headers=headers, json={"name": "x"} if method == "PATCH" else None)
        await problem(resp, 401)
    # A wrong secret for a real client key is 401 too, and changed nothing.
    wrong = {"Authorization": "Bearer " + org.key.partition(".")[0] + ".not-the-secret"}
    await problem(await client.get(RESPAN_LIST, headers=wrong), 401)
    assert await pool.fetchval("SELECT count(*) FROM customers WHERE organization_id = $1", org.id) == 1


async def test_respan_environment_parameter(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    prod = await insert_customer(pool, org, uid("prod"))
    test = await insert_customer(pool, org, uid("test"), environment="test")
    # The list defaults to prod (seed 000), whatever the key's environment.
    for key in (org.key, org.test_key):
        body = await get_json(client, RESPAN_LIST, org.headers(key))
        assert [r["customer_identifier"] for r in body["results"]] == [prod["customer_identifier"]]
    body = await get_json(client, f"{RESPAN_LIST}?environment=test", org.headers())
    assert [(r["customer_identifier"], r["environment"], r["id"]) for r in body["results"]] == [
        (test["customer_identifier"], "test", test["customer_identifier"] + "test" + str(org.id))
    ]
    # The detail uses the key's environment unless told (seed 001).
    test_path = RESPAN_USER.format(test["customer_identifier"])
    await problem(await client.get(test_path, headers=org.headers()), 404)
    assert (await get_json(client, test_path + "?environment=test", org.headers()))["environment"] == "test"
    assert (await get_json(client, test_path, org.headers(org.test_key)))["environment"] == "test"
    await problem(await client.get(test_path + "?environment=qa", headers=org.headers()), 400, "environment")


async def _period(pool: asyncpg.Pool, duration: str) -> tuple[datetime, datetime]:
    row = await pool.fetchrow("SELECT tally_period_start($1, now()) AS s, tally_period_end($1, now()) AS e", duration)
    return row["s"], row["e"]


async def test_respan_detail_replays_the_seed_example(client: TestClient, pool: asyncpg.Pool, org: Org,
                                                      openapi_doc: dict) -> None:  # fmt: skip
    user = await _respan_example_user(pool, org)
    for _ in range(3):  # the expected period is read around the request: retry if a month began meanwhile
        start, end = await _period(pool, "monthly")
        await pool.execute("DELETE FROM daily_usage WHERE organization_id = $1", org.id)
        await add_daily_cost(pool, user, start.date(), Decimal("45.67"))  # inside the current month
        await add_daily_cost(pool, user, start.date() - timedelta(days=1), Decimal("400"))  # the month before
        body = await get_json(client, RESPAN_USER.format("user_123") + "?environment=prod", org.headers())
        if await _period(pool, "monthly") == (start, end):
            break
    check_schema(body, response_schema(openapi_doc, "GET", "/compat/respan/api/users/{customer_identifier}/"),
                 openapi_doc)  # fmt: skip
    # The doc types period_end "datetime or null" (its example shows null; tally knows the end).
    assert_like(body, RESPAN_DETAIL_EXAMPLE, also={"period_end": {"string"}})
    expected = {**RESPAN_DETAIL_EXAMPLE, "organization_name": org.name, "period_start": z(start), "period_end": z(end)}
    assert body == expected
    for key in ("period_start", "period_end", "updated_at"):
        assert ISO_Z.match(body[key])


@pytest.mark.parametrize("duration", ["daily", "weekly", "monthly", "yearly"])
async def test_respan_detail_budget_periods(client: TestClient, pool: asyncpg.Pool, org: Org, duration: str) -> None:
    ident = uid("budget")
    row = await insert_customer(pool, org, ident, total_cost=Decimal("77"), total_budget=Decimal("12.5"),
                                period_budget=Decimal("2.25"), budget_duration=duration)  # fmt: skip
    for _ in range(3):
        start, end = await _period(pool, duration)
        await pool.execute("DELETE FROM daily_usage WHERE organization_id = $1", org.id)
        await add_daily_cost(pool, row, start.date(), Decimal("1.5"))  # the first day of the period
        if end - start > timedelta(days=1):
            await add_daily_cost(pool, row, (end - timedelta(days=1)).date(), Decimal("0.25"))  # its last day
        await add_daily_cost(pool, row, start.date() - timedelta(days=1), Decimal("30"))
        await add_daily_cost(pool, row, end.date(), Decimal("40"))
        body = await get_json(client, RESPAN_USER.format(ident), org.headers())
        if await _period(pool, duration) == (start, end):
            break
    inside = Decimal("1.5") + (Decimal("0.25") if end - start > timedelta(days=1) else 0)
    assert (body["period_start"], body["period_end"], body["budget_duration"]) == (z(start), z(end), duration)
    assert body["total_period_usage"] == float(inside) and kind(body["total_period_usage"]) == "number"
    assert (body["total_budget"], body["period_budget"]) == (12.5, 2.25)


async def test_respan_detail_without_budget(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    """No budget_duration: the period is the customer's life, so the usage is the lifetime cost."""
    ident = uid("nobudget")
    await insert_customer(pool, org, ident, total_cost=Decimal("12.34"))
    body = await get_json(client, RESPAN_USER.format(ident), org.headers())
    assert set(body) == set(RESPAN_DETAIL_EXAMPLE)
    assert body["total_period_usage"] == 12.34
    assert body["total_budget"] is None and body["period_budget"] is None  # "double or null"
    assert body["name"] is None and body["email"] is None  # "string or null"


@pytest.mark.parametrize("identifier", ["with space", "q?x=1", "hash#1", "slash/ed", "pct%41", "ünïcode", "dot.s"])
async def test_respan_detail_for_any_identifier(
    client: TestClient, pool: asyncpg.Pool, org: Org, identifier: str
) -> None:
    ident = uid() + identifier
    await insert_customer(pool, org, ident, name="Odd")
    path = RESPAN_USER.format(quote(ident, safe=""))
    assert (await get_json(client, path, org.headers()))["customer_identifier"] == ident
    assert (await ok_json(await client.patch(path, json={"name": "Even"}, headers=org.headers())))["name"] == "Even"
    assert (await client.delete(path, headers=org.headers())).status == 204
    await problem(await client.get(path, headers=org.headers()), 404)


async def test_respan_detail_unknown_customer_and_other_organization(client: TestClient, pool: asyncpg.Pool, org: Org,
                                                                     other_org: Org) -> None:  # fmt: skip
    await insert_customer(pool, org, "user_123", name="Mine")
    await problem(await client.get(RESPAN_USER.format("no_such_user"), headers=org.headers()), 404)
    # Another organization's key: the customer does not exist for it.
    await problem(await client.get(RESPAN_USER.format("user_123"), headers=other_org.headers()), 404)
    await problem(await client.patch(RESPAN_USER.format("user_123"), json={"name": "Theirs"},
                                     headers=other_org.headers()), 404)  # fmt: skip
    await problem(await client.delete(RESPAN_USER.format("user_123"), headers=other_org.headers()), 404)
    listed = await get_json(client, RESPAN_LIST, other_org.headers())
    assert listed["count"] == 0 and listed["results"] == []
    assert (await get_json(client, RESPAN_USER.format("user_123"), org.headers()))["name"] == "Mine"


async def test_respan_patch_updates_the_budget_fields(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    ident = uid("patch")
    await insert_customer(pool, org, ident, name="Before", email="before@example.com", total_cost=Decimal("3"))
    changes = {"name": "John Doe", "email": "john@example.com", "total_budget": 1000, "period_budget": 45.67,
               "budget_duration": "weekly"}  # fmt: skip
    resp = await client.patch(RESPAN_USER.format(ident), json=changes, headers=org.headers())
    body = await ok_json(resp)
    assert_like(body, RESPAN_DETAIL_EXAMPLE, also={"period_end": {"string"}})
    assert {k: body[k] for k in changes} == changes
    start, _ = await _period(pool, "weekly")
    assert parse_z(body["period_start"]).weekday() == 0 and parse_z(body["period_start"]) <= start + timedelta(days=7)
    assert await get_json(client, RESPAN_USER.format(ident), org.headers()) == body
    stored = await pool.fetchrow(
        "SELECT name, email, total_budget, period_budget, budget_duration, total_cost FROM customers"
        " WHERE organization_id = $1 AND customer_identifier = $2", org.id, ident,
    )  # fmt: skip
    assert dict(stored) == {"name": "John Doe", "email": "john@example.com", "total_budget": Decimal("1000"),
                            "period_budget": Decimal("45.67"), "budget_duration": "weekly",
                            "total_cost": Decimal("3")}  # fmt: skip
    # Only what is sent changes; null clears a budget field.
    body = await ok_json(
        await client.patch(
            RESPAN_USER.format(ident), json={"budget_duration": None, "total_budget": None}, headers=org.headers()
        )
    )
    assert body["budget_duration"] is None and body["total_budget"] is None
    assert body["period_budget"] == 45.67 and body["name"] == "John Doe"
    assert body["total_period_usage"] == 3  # lifetime again
    # An empty patch changes nothing; an unknown customer is 404.
    assert await ok_json(await client.patch(RESPAN_USER.format(ident), json={}, headers=org.headers())) == body
    await problem(await client.patch(RESPAN_USER.format(uid()), json={"name": "x"}, headers=org.headers()), 404)


@pytest.mark.parametrize(
    "patch, name",
    [({"total_cost": 1}, "total_cost"), ({"id": "x"}, "id"), ({"customer_identifier": "x"}, "customer_identifier"),
     ({"environment": "test"}, "environment"), ({"total_period_usage": 0}, "total_period_usage"),
     ({"period_start": "2025-12-01T00:00:00Z"}, "period_start"), ({"period_end": None}, "period_end"),
     ({"organization_name": "Acme Inc"}, "organization_name"), ({"updated_at": "2025-12-29T10:30:00Z"}, "updated_at"),
     ({"number_of_requests": 5}, "number_of_requests"), ({"nickname": "JD"}, "nickname"),
     ({"name": "ok", "shoe_size": 44}, "shoe_size"), ({"budget_duration": "hourly"}, "budget_duration"),
     ({"total_budget": -1}, "total_budget"), ({"period_budget": "lots"}, "period_budget")],
)  # fmt: skip
async def test_respan_patch_refuses_read_only_and_unknown_fields(client: TestClient, pool: asyncpg.Pool, org: Org,
                                                                 patch: dict, name: str) -> None:  # fmt: skip
    ident = uid("ro")
    await insert_customer(pool, org, ident, name="Kept", total_budget=Decimal("5"))
    before = await get_json(client, RESPAN_USER.format(ident), org.headers())
    body = await problem(await client.patch(RESPAN_USER.format(ident), json=patch, headers=org.headers()), 400, name)
    assert [e["in"] for e in body["errors"]] == ["body"]
    assert await get_json(client, RESPAN_USER.format(ident), org.headers()) == before  # nothing changed


async def test_respan_patch_refuses_bodies_that_are_not_objects(
    client: TestClient, pool: asyncpg.Pool, org: Org
) -> None:
    ident = uid("body")
    await insert_customer(pool, org, ident)
    for data in (b"[]", b"{", b'"name"'):
        resp = await client.patch(
            RESPAN_USER.format(ident), data=data, headers={**org.headers(), "Content-Type": "application/json"}
        )
        await problem(resp, 400, "body")


async def test_respan_delete(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    ident = uid("gone")
    row = await insert_customer(pool, org, ident)
    await add_daily_cost(pool, row, date(2025, 1, 1), Decimal("1"))
    await add_subscription(pool, org, row["id"], uid("sub"), "active")
    resp = await client.delete(RESPAN_USER.format(ident), headers=org.headers())
    assert resp.status == 204 and await resp.read() == b""
    await problem(await client.get(RESPAN_USER.format(ident), headers=org.headers()), 404)
    await problem(await client.delete(RESPAN_USER.format(ident), headers=org.headers()), 404)
    await problem(await client.patch(RESPAN_USER.format(ident), json={"name": "x"}, headers=org.headers()), 404)
    assert (await get_json(client, RESPAN_LIST, org.headers()))["count"] == 0
    for table in ("customers", "daily_usage", "subscriptions"):
        assert await pool.fetchval(f"SELECT count(*) FROM {table} WHERE organization_id = $1", org.id) == 0


async def test_respan_writes_need_the_write_scope(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    ident = uid("scope")
    await insert_customer(pool, org, ident, name="Same")
    read = org.headers(org.read_key)
    await problem(await client.patch(RESPAN_USER.format(ident), json={"name": "x"}, headers=read), 403)
    await problem(await client.delete(RESPAN_USER.format(ident), headers=read), 403)
    assert (await get_json(client, RESPAN_USER.format(ident), read))["name"] == "Same"


# =============================================================================================
# v0 (seed 002): /compat/v0, authenticated by x-client-key + x-client-secret


async def _v0_customers(pool: asyncpg.Pool, org: Org, count: int = 25) -> list[dict[str, Any]]:
    """``count`` customers, the first complete (every seed 002 field set), created a minute apart."""
    rows = []
    for i in range(count):
        row = await insert_customer(
            pool, org, f"v0_{i:02d}", name=f"Person {i:02d}", email=f"person{i:02d}@example.com"
        )
        rows.append(await set_columns(pool, row, created_at=datetime(2024, 3, 1, tzinfo=UTC) + timedelta(minutes=i),
                                      updated_at=datetime(2024, 3, 2, tzinfo=UTC) + timedelta(minutes=i)))  # fmt: skip
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
    await pool.execute("UPDATE customers SET name = 'John Doe', email = 'john.doe@example.com' WHERE id = $1",
                       rows[0]["id"])  # fmt: skip
    return rows


async def test_v0_replays_the_documented_request(client: TestClient, pool: asyncpg.Pool, org: Org,
                                                 openapi_doc: dict) -> None:  # fmt: skip
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
        "id": str(rows[0]["id"]), "firstName": "John", "lastName": "Doe", "email": "john.doe@example.com",
        "phone": "+14155550123", "customerType": "Individual", "status": "ACTIVE", "lastTransactionAmount": 49.99,
        "lastPurchaseDate": "2024-02-28T17:05:09.250Z", "applicationId": "app_123",
        "createdAt": "2024-06-01T12:00:00.125Z", "updatedAt": "2024-06-02T08:30:00.000Z",
    }  # fmt: skip
    # The seed's example values: skip 20, take 50.
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

    # Seed examples: status "ACTIVE", name "John", email "john.doe@example.com".
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
    [("take=0", "take"), ("take=101", "take"), ("take=-5", "take"), ("take=ten", "take"), ("skip=-1", "skip"),
     ("skip=x", "skip"), ("status=active", "status"), ("status=PENDING", "status"), ("limit=10", "limit")],
)  # fmt: skip
async def test_v0_refuses_bad_parameters(
    client: TestClient, pool: asyncpg.Pool, org: Org, query: str, name: str
) -> None:
    pair = await client_pair(pool, org)
    await problem(await client.get(f"{V0_LIST}?{query}", headers=pair), 400, name)


async def test_v0_take_bounds_are_inclusive(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    for i in range(3):
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


# =============================================================================================
# Flexprice (seed 003): /compat/flexprice


async def _flexprice_example(pool: asyncpg.Pool, org: Org) -> list[dict[str, Any]]:
    rows = []
    for item in FLEXPRICE_EXAMPLE["items"]:
        row = await insert_customer(pool, org, item["external_id"], name=item["name"], email=item["email"],
                                    metadata=item["metadata"])  # fmt: skip
        rows.append(await set_columns(
            pool, row, **{k: item[k] for k in item if k.startswith("address_")},
            created_at=parse_z(item["created_at"]), updated_at=parse_z(item["updated_at"]),
        ))  # fmt: skip
    return rows


def flexprice_expected(org: Org, example_item: dict[str, Any], row: dict[str, Any], environment: str = "prod") -> dict:
    """The example's item as tally maps it: id is the customer uuid, environment_id the
    environment, tenant_id the organization id (adapter docstring)."""
    return {**example_item, "id": str(row["id"]), "environment_id": environment, "tenant_id": str(org.id)}


async def test_flexprice_replays_the_seed_example(client: TestClient, pool: asyncpg.Pool, org: Org,
                                                  openapi_doc: dict) -> None:  # fmt: skip
    rows = await _flexprice_example(pool, org)
    body = await get_json(client, f"{FLEXPRICE_LIST}?limit=10&offset=0&order=desc", org.headers())
    check_schema(body, response_schema(openapi_doc, "GET", FLEXPRICE_LIST), openapi_doc)
    assert_like(body, FLEXPRICE_EXAMPLE)
    assert body == {
        "items": [flexprice_expected(org, item, row) for item, row in zip(FLEXPRICE_EXAMPLE["items"], rows)],
        "pagination": FLEXPRICE_EXAMPLE["pagination"],
    }
    for item in body["items"]:
        assert ISO_Z.match(item["created_at"]) and ISO_Z.match(item["updated_at"])
    # The defaults (limit 50, offset 0, created_at desc) give the same items.
    default = await get_json(client, FLEXPRICE_LIST, org.headers())
    assert default == {**body, "pagination": {"total": 2, "limit": 50, "offset": 0}}


async def test_flexprice_pagination_flow_of_the_seed(client: TestClient, crowd: Crowd) -> None:
    org, rows = crowd
    walked: list[str] = []
    for offset in (0, 50, 100):  # the doc's three pages
        body = await get_json(client, f"{FLEXPRICE_LIST}?limit=50&offset={offset}", org.headers())
        assert body["pagination"] == {"total": CROWD_SIZE, "limit": 50, "offset": offset}
        assert len(body["items"]) == 50
        walked += [item["id"] for item in body["items"]]
    assert walked == [str(r["id"]) for r in newest_first(rows)]  # everything, once, newest first
    end = await get_json(client, f"{FLEXPRICE_LIST}?limit=50&offset=150", org.headers())
    assert end == {"items": [], "pagination": {"total": CROWD_SIZE, "limit": 50, "offset": 150}}
    # An odd page size walks the same sequence.
    walked = []
    for offset in range(0, CROWD_SIZE, 11):
        walked += [i["id"] for i in (await get_json(client, f"{FLEXPRICE_LIST}?limit=11&offset={offset}",
                                                    org.headers()))["items"]]  # fmt: skip
    assert walked == [str(r["id"]) for r in newest_first(rows)]
    one = await get_json(client, f"{FLEXPRICE_LIST}?limit=1000", org.headers())
    assert len(one["items"]) == CROWD_SIZE


async def test_flexprice_sort_and_order(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    rows = []
    for i, (name, email) in enumerate([("delta", "b@x.io"), ("alpha", "d@x.io"), (None, "a@x.io"),
                                       ("charlie", None), ("bravo", "c@x.io")]):  # fmt: skip
        row = await insert_customer(pool, org, f"ext_{'pqrst'[(i * 2) % 5]}", name=name, email=email)
        rows.append(await set_columns(pool, row, created_at=datetime(2024, 1, 10 + (i * 3) % 5, tzinfo=UTC)))

    def order(field: str, descending: bool) -> list[str]:
        return [str(r["id"]) for r in sorted(rows, key=lambda r: (r[field] or "", r["id"]), reverse=descending)]

    async def listed(query: str) -> list[str]:
        return [i["id"] for i in (await get_json(client, f"{FLEXPRICE_LIST}?{query}", org.headers()))["items"]]

    assert await listed("") == order("created_at", True)  # default: created_at, desc
    assert await listed("order=asc") == order("created_at", False)
    for field in ("created_at", "name", "email"):  # the doc's examples
        for direction in ("asc", "desc"):
            assert await listed(f"sort={field}&order={direction}") == order(field, direction == "desc"), field
    assert await listed("sort=external_id&order=asc") == order("customer_identifier", False)
    for query, name in [("order=ascending", "order"), ("order=DESC", "order"), ("sort=shoe_size", "sort"),
                        ("sort=-name", "sort"), ("sort_by=name", "sort_by")]:  # fmt: skip
        await problem(await client.get(f"{FLEXPRICE_LIST}?{query}", headers=org.headers()), 400, name)


async def test_flexprice_status_mapping(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    rows = {s: await insert_customer(pool, org, uid(s), status=s)
            for s in ("active", "draft", "archived", "blacklisted", "deactivated")}  # fmt: skip
    body = await get_json(client, FLEXPRICE_LIST, org.headers())
    for item in body["items"]:  # bare customers: every string of the example is still a string ("")
        assert_like(item, FLEXPRICE_EXAMPLE["items"][0])
        assert (item["name"], item["email"], item["address_line1"], item["metadata"]) == ("", "", "", {})
    shown = {i["id"]: i["status"] for i in body["items"]}
    assert shown == {str(rows["active"]["id"]): "published", str(rows["draft"]["id"]): "draft",
                     str(rows["archived"]["id"]): "archived", str(rows["blacklisted"]["id"]): "blacklisted",
                     str(rows["deactivated"]["id"]): "deactivated"}  # fmt: skip
    for flex, tally in (("published", "active"), ("draft", "draft"), ("archived", "archived")):
        body = await get_json(client, f"{FLEXPRICE_LIST}?status={flex}", org.headers())
        assert [(i["id"], i["status"]) for i in body["items"]] == [(str(rows[tally]["id"]), flex)]
        assert body["pagination"]["total"] == 1
    for bad in ("active", "PUBLISHED", "deleted"):
        await problem(await client.get(f"{FLEXPRICE_LIST}?status={bad}", headers=org.headers()), 400, "status")


async def test_flexprice_filters(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    parent_a = await insert_customer(pool, org, "parent_a")
    parent_b = await insert_customer(pool, org, "parent_b")
    rows = {
        "a1": await insert_customer(pool, org, "user_a1", email="a1@example.com", parent_customer_id=parent_a["id"]),
        "a2": await insert_customer(pool, org, "user_a2", email="a2@example.com", parent_customer_id=parent_a["id"]),
        "b1": await insert_customer(pool, org, "user_b1", email="b1@example.com", parent_customer_id=parent_b["id"]),
        "solo": await insert_customer(pool, org, "user,solo", email="solo@example.com"),
        "parent_a": parent_a, "parent_b": parent_b,
    }  # fmt: skip

    async def who(query: str) -> set[str]:
        body = await get_json(client, f"{FLEXPRICE_LIST}?{query}", org.headers())
        assert body["pagination"]["total"] == len(body["items"])
        found = {i["id"] for i in body["items"]}
        return {k for k, r in rows.items() if str(r["id"]) in found}

    assert await who(f"customer_ids={rows['a1']['id']},{rows['b1']['id']}") == {"a1", "b1"}
    assert await who(f"customer_ids={rows['a1']['id']}&customer_ids={rows['solo']['id']}") == {"a1", "solo"}
    assert await who("external_ids=user_a1,user_a2,no_such_user") == {"a1", "a2"}
    assert await who("external_id=user_b1") == {"b1"}
    assert await who("external_id=user,solo") == {"solo"}  # a single id is taken whole
    assert await who("email=a2@example.com") == {"a2"}
    assert await who(f"parent_customer_ids={parent_a['id']}") == {"a1", "a2"}
    assert await who(f"parent_customer_ids={parent_a['id']},{parent_b['id']}") == {"a1", "a2", "b1"}
    assert await who(f"parent_customer_ids={parent_b['id']}&external_ids=user_a1,user_b1") == {"b1"}
    assert await who(f"customer_ids={uuid.uuid4()}") == set()
    for query, name in [("customer_ids=not-a-uuid", "customer_ids"), ("parent_customer_ids=42", "parent_customer_ids"),
                        ("external_id=", "external_id"), ("tenant_id=x", "tenant_id")]:  # fmt: skip
        await problem(await client.get(f"{FLEXPRICE_LIST}?{query}", headers=org.headers()), 400, name)


async def test_flexprice_expand_parent_customer(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    parent_row = await insert_customer(pool, org, "user_12345", name="Acme Corporation", email="billing@acme.com",
                                       metadata={"plan_tier": "enterprise"})  # fmt: skip
    parent_row = await set_columns(
        pool,
        parent_row,
        created_at=datetime(2024, 1, 15, 10, 30, tzinfo=UTC),
        updated_at=datetime(2024, 1, 15, 10, 30, tzinfo=UTC),
        **{k: v for k, v in FLEXPRICE_EXAMPLE["items"][0].items() if k.startswith("address_")},
    )
    child = await insert_customer(pool, org, "user_child", name="Acme EMEA", parent_customer_id=parent_row["id"],
                                  status="draft")  # fmt: skip
    child = await set_columns(pool, child, created_at=datetime(2024, 2, 1, tzinfo=UTC))
    body = await get_json(client, f"{FLEXPRICE_LIST}?expand=parent_customer", org.headers())
    items = {i["external_id"]: i for i in body["items"]}
    parent_item = flexprice_expected(org, FLEXPRICE_EXAMPLE["items"][0], parent_row)
    assert items["user_12345"] == {**parent_item, "parent_customer": None}
    assert items["user_child"]["parent_customer_id"] == str(parent_row["id"])
    assert items["user_child"]["parent_customer"] == parent_item  # the parent, in the same shape
    assert items["user_child"]["status"] == "draft"
    assert_like(
        items["user_child"],
        {**FLEXPRICE_EXAMPLE["items"][0], "parent_customer": FLEXPRICE_EXAMPLE["items"][0]},
        also={"parent_customer_id": {"string"}},
    )
    # Flexprice's strings are never null: what tally lacks (the child's e-mail and address) is "".
    missing = ("email", "address_line1", "address_line2", "address_city", "address_state", "address_postal_code",
               "address_country")  # fmt: skip
    assert {k: items["user_child"][k] for k in missing} == dict.fromkeys(missing, "")
    # Without expand there is no parent_customer key at all.
    plain = await get_json(client, FLEXPRICE_LIST, org.headers())
    assert all(set(i) == set(FLEXPRICE_EXAMPLE["items"][0]) for i in plain["items"])
    await problem(await client.get(f"{FLEXPRICE_LIST}?expand=children", headers=org.headers()), 400, "expand")


@pytest.mark.parametrize(
    "query, name",
    [("limit=0", "limit"), ("limit=1001", "limit"), ("limit=-1", "limit"), ("limit=many", "limit"),
     ("offset=-1", "offset"), ("offset=x", "offset")],
)  # fmt: skip
async def test_flexprice_refuses_bad_bounds(client: TestClient, org: Org, query: str, name: str) -> None:
    await problem(await client.get(f"{FLEXPRICE_LIST}?{query}", headers=org.headers()), 400, name)


async def test_flexprice_authentication_and_environment(client: TestClient, pool: asyncpg.Pool, org: Org,
                                                        other_org: Org) -> None:  # fmt: skip
    prod = await insert_customer(pool, org, uid("prod"))
    test = await insert_customer(pool, org, uid("test"), environment="test")
    for headers in ({}, {"Authorization": "Bearer nope"}):
        await problem(await client.get(FLEXPRICE_LIST, headers=headers), 401)
    ids = [i["id"] for i in (await get_json(client, FLEXPRICE_LIST, org.headers()))["items"]]
    assert ids == [str(prod["id"])]
    body = await get_json(client, FLEXPRICE_LIST, org.headers(org.test_key))
    assert [(i["id"], i["environment_id"]) for i in body["items"]] == [(str(test["id"]), "test")]
    theirs = await get_json(client, FLEXPRICE_LIST, other_org.headers())
    assert theirs == {"items": [], "pagination": {"total": 0, "limit": 50, "offset": 0}}
    theirs = await get_json(client, f"{FLEXPRICE_LIST}?customer_ids={prod['id']}", other_org.headers())
    assert theirs["items"] == []


# =============================================================================================
# The public API (seed 004): /compat/public


async def _public_example(pool: asyncpg.Pool, org: Org) -> dict[str, Any]:
    ex = PUBLIC_EXAMPLE["data"][0]
    row = await insert_customer(pool, org, uid("public"), email="john@example.com")
    row = await set_columns(pool, row, first_name=ex["firstName"], last_name=ex["lastName"], phone=ex["phone"],
                            stripe_customer_id=ex["stripeCustomerId"], created_at=parse_z(ex["createdAt"]),
                            updated_at=parse_z(ex["updatedAt"]))  # fmt: skip
    sub = ex["subscriptions"][0]
    plan = sub["plan"]
    await add_subscription(pool, org, row["id"], sub["id"], sub["status"], parse_z(sub["currentPeriodStart"]),
                           parse_z(sub["currentPeriodEnd"]),
                           {"stripe_price_id": plan["stripePriceId"], "name": plan["name"], "amount": plan["amount"],
                            "currency": plan["currency"], "interval": plan["interval"]})  # fmt: skip
    return row


async def test_public_replays_the_seed_example(client: TestClient, pool: asyncpg.Pool, org: Org,
                                               openapi_doc: dict) -> None:  # fmt: skip
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


async def test_public_pagination_of_the_seed(client: TestClient, crowd: Crowd) -> None:
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
    [(5, 0, False, 5), (4, 0, True, 4), (4, 1, False, 4), (2, 2, True, 2), (2, 3, False, 2), (2, 4, False, 1),
     (1, 3, True, 1), (1, 4, False, 1), (10, 5, False, 0), (100, 0, False, 5)],
)  # fmt: skip
async def test_public_has_more(client: TestClient, pool: asyncpg.Pool, org: Org, limit: int, offset: int,
                               has_more: bool, returned: int) -> None:  # fmt: skip
    for _ in range(5):
        await insert_customer(pool, org, uid())
    body = await get_json(client, f"{PUBLIC_LIST}?limit={limit}&offset={offset}", org.headers())
    assert body["pagination"] == {"total": 5, "limit": limit, "offset": offset, "hasMore": has_more}
    assert len(body["data"]) == returned


async def test_public_subscriptions_and_has_active_subscription(client: TestClient, pool: asyncpg.Pool,
                                                                org: Org) -> None:  # fmt: skip
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
            await add_subscription(pool, org, rows[name]["id"], sub_id, status, t0, t0 + timedelta(days=31),
                                   created_at=t0 + timedelta(minutes=j))  # fmt: skip
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
                    assert s == {"id": s["id"], "status": s["status"], "currentPeriodStart": "2024-01-01T00:00:00.000Z",
                                 "currentPeriodEnd": "2024-02-01T00:00:00.000Z", "plan": None}  # fmt: skip
    # A plan with some fields missing is an object with nulls, not absent.
    await add_subscription(pool, org, rows["none"]["id"], "sub_partial", "active",
                           plan={"name": "Free", "amount": 0, "currency": "usd"})  # fmt: skip
    body = await get_json(client, f"{PUBLIC_LIST}?include_subscriptions=true", org.headers())
    [none] = [c for c in body["data"] if c["id"] == str(rows["none"]["id"])]
    assert none["hasActiveSubscription"] is True
    assert none["subscriptions"] == [{"id": "sub_partial", "status": "active", "currentPeriodStart": None,
                                      "currentPeriodEnd": None, "plan": {"stripePriceId": None, "name": "Free",
                                                                         "amount": 0, "currency": "usd",
                                                                         "interval": None}}]  # fmt: skip


@pytest.mark.parametrize(
    "query, name",
    [("limit=101", "limit"), ("limit=0", "limit"), ("limit=-3", "limit"), ("limit=lots", "limit"),
     ("offset=-1", "offset"), ("offset=one", "offset"), ("include_subscriptions=perhaps", "include_subscriptions"),
     ("page=2", "page")],
)  # fmt: skip
async def test_public_refuses_invalid_limit_or_offset(client: TestClient, org: Org, query: str, name: str) -> None:
    await problem(await client.get(f"{PUBLIC_LIST}?{query}", headers=org.headers()), 400, name)


async def test_public_limit_maximum_is_100(client: TestClient, crowd: Crowd) -> None:
    org, _ = crowd
    body = await get_json(client, f"{PUBLIC_LIST}?limit=100", org.headers())
    assert len(body["data"]) == 100 and body["pagination"]["hasMore"] is True


async def test_public_authentication_and_permissions(client: TestClient, pool: asyncpg.Pool, org: Org,
                                                     other_org: Org) -> None:  # fmt: skip
    mine = await insert_customer(pool, org, uid())
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer tly_000000000000.x"}):
        await problem(await client.get(PUBLIC_LIST, headers=headers), 401)  # invalid or missing token
    async with pool.acquire() as conn:
        write_only = await auth.create_key(conn, org.name, ("write",))
    await problem(await client.get(PUBLIC_LIST, headers=org.headers(write_only.key)), 403)  # insufficient permissions
    assert [c["id"] for c in (await get_json(client, PUBLIC_LIST, org.headers()))["data"]] == [str(mine["id"])]
    theirs = await get_json(client, f"{PUBLIC_LIST}?include_subscriptions=true", other_org.headers())
    assert theirs == {"data": [], "pagination": {"total": 0, "limit": 50, "offset": 0, "hasMore": False}}


# =============================================================================================
# Every route set: isolation between organizations, and the OpenAPI document.


async def test_no_route_set_shows_another_organizations_customers(client: TestClient, pool: asyncpg.Pool, org: Org,
                                                                  other_org: Org) -> None:  # fmt: skip
    mine = [await insert_customer(pool, org, f"user_{i}") for i in range(3)]
    theirs = await insert_customer(pool, other_org, "user_0")  # the same identifier, elsewhere
    mine_ids = {str(r["id"]) for r in mine}
    for o, expect, absent in ((org, mine_ids, {str(theirs["id"])}), (other_org, {str(theirs["id"])}, mine_ids)):
        pair = await client_pair(pool, o)
        seen = {
            "respan": {
                r["unique_organization_id"] + r["customer_identifier"]
                for r in (await get_json(client, RESPAN_LIST, o.headers()))["results"]
            },
            "v0": {c["id"] for c in (await get_json(client, V0_LIST, pair))["customers"]},
            "flexprice": {i["id"] for i in (await get_json(client, FLEXPRICE_LIST, o.headers()))["items"]},
            "public": {c["id"] for c in (await get_json(client, PUBLIC_LIST, o.headers()))["data"]},
        }
        assert seen["respan"] == {str(o.id) + f"user_{i}" for i in range(len(expect))}
        for name in ("v0", "flexprice", "public"):
            assert seen[name] == expect and not seen[name] & absent, name
    detail = await get_json(client, RESPAN_USER.format("user_0"), other_org.headers())
    assert detail["organization_name"] == other_org.name and detail["id"] == "user_0"


EXPECTED_OPERATIONS = {
    respan.TAG: {("get", "/compat/respan/api/users/list/"), ("get", "/compat/respan/api/users/{customer_identifier}/"),
                 ("patch", "/compat/respan/api/users/{customer_identifier}/"),
                 ("delete", "/compat/respan/api/users/{customer_identifier}/")},
    v0.TAG: {("get", "/compat/v0/api/v0/customers")},
    flexprice.TAG: {("get", "/compat/flexprice/v1/customers")},
    public.TAG: {("get", "/compat/public/api/public/customers")},
}  # fmt: skip


async def test_every_compat_route_set_has_its_own_tag(openapi_doc: dict) -> None:
    tags = [t["name"] for t in openapi_doc["tags"]]
    assert len(set(EXPECTED_OPERATIONS)) == 4
    for tag, expected in EXPECTED_OPERATIONS.items():
        assert tags.count(tag) == 1, tag
        assert next(t for t in openapi_doc["tags"] if t["name"] == tag)["description"]
        tagged = {(method, path) for path, ops in openapi_doc["paths"].items() for method, op in ops.items()
                  if tag in op["tags"]}  # fmt: skip
        assert tagged == expected, tag
        for method, path in expected:
            assert openapi_doc["paths"][path][method]["tags"] == [tag]
    # Every /compat path belongs to one of them, and no canonical path does.
    for path, ops in openapi_doc["paths"].items():
        for op in ops.values():
            assert (path.startswith("/compat/")) == bool(set(op["tags"]) & set(EXPECTED_OPERATIONS)), path
    # The documented query parameters are the seeds' own names.
    params = {path: {p["name"] for p in openapi_doc["paths"][path]["get"].get("parameters", []) if p["in"] == "query"}
              for path in (RESPAN_LIST, V0_LIST, FLEXPRICE_LIST, PUBLIC_LIST)}  # fmt: skip
    assert params[RESPAN_LIST] == {"page", "page_size", "sort_by", "environment"}
    assert params[V0_LIST] == {"skip", "take", "status", "name", "email"}
    assert params[FLEXPRICE_LIST] == {"limit", "offset", "sort", "order", "status", "customer_ids", "external_ids",
                                      "external_id", "email", "parent_customer_ids", "expand"}  # fmt: skip
    assert params[PUBLIC_LIST] == {"limit", "offset", "include_subscriptions"}
