"""POST / PATCH / DELETE /v1/customers and GET of one customer, against the real database."""

from __future__ import annotations

import uuid
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from service.api.models import Customer, CustomerExpanded
from tests.factories import Org, insert_customer
from tests.support import ok_json, problem, rel, uid

FULL = {
    "name": "Ada Lovelace",
    "first_name": "Ada",
    "last_name": "Lovelace",
    "email": "ada@example.com",
    "phone": "+44 20 7946 0000",
    "customer_type": "business",
    "status": "draft",
    "address": {
        "line1": "1 Analytical Way",
        "line2": "Floor 2",
        "city": "London",
        "state": "LDN",
        "postal_code": "N1 9GU",
        "country": "GB",
    },
    "metadata": {"plan": "pro", "seats": 5, "tags": ["a", "b"]},
    "stripe_customer_id": "cus_123",
    "application_id": "app_9",
    "last_transaction_amount": "12.34",
    "last_purchase_date": "2026-01-02T03:04:05Z",
    "total_budget": "1000.50",
    "period_budget": "100",
    "budget_duration": "monthly",
}

READ_ONLY = [
    ("id", str(uuid.uuid4())),
    ("organization_id", str(uuid.uuid4())),
    ("total_cost", "5.00"),
    ("first_seen", "2026-01-01T00:00:00Z"),
    ("last_active", "2026-01-01T00:00:00Z"),
    ("number_of_requests", 10),
    ("prompt_tokens", 10),
    ("total_tokens", 10),
    ("active_days", 3),
    ("average_latency", 1.5),
    ("total_period_usage", "1"),
    ("period_start", "2026-01-01T00:00:00Z"),
    ("created_at", "2026-01-01T00:00:00Z"),
    ("updated_at", "2026-01-01T00:00:00Z"),
    ("subscriptions", []),
    ("parent_customer", None),
]


def url(identifier: str) -> str:
    return "/v1/customers/" + quote(identifier, safe="")


async def create(client: TestClient, org: Org, key: str | None = None, **fields: Any) -> dict[str, Any]:
    fields.setdefault("customer_identifier", uid())
    resp = await client.post("/v1/customers", json=fields, headers=org.headers(key))
    return await ok_json(resp, 201)


async def fetch(client: TestClient, org: Org, identifier: str, key: str | None = None, **params: str) -> dict:
    return await ok_json(await client.get(url(identifier), params=params, headers=org.headers(key)))


async def db_row(pool: asyncpg.Pool, org: Org, identifier: str, environment: str = "prod") -> dict | None:
    row = await pool.fetchrow(
        "SELECT * FROM customers WHERE organization_id = $1 AND environment = $2 AND customer_identifier = $3",
        org.id,
        environment,
        identifier,
    )
    return dict(row) if row else None


# ---------------------------------------------------------------------------------------------
# POST


async def test_create_returns_201_location_and_the_customer(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    ident = uid("new")
    resp = await client.post("/v1/customers", json={"customer_identifier": ident, **FULL}, headers=org.headers())
    doc = await ok_json(resp, 201)
    assert set(doc) == set(Customer.model_fields)
    customer = Customer.model_validate(doc)
    assert customer.customer_identifier == ident and customer.environment == "prod"
    assert doc["name"] == "Ada Lovelace" and doc["status"] == "draft"
    assert doc["address"] == FULL["address"]
    assert doc["metadata"] == FULL["metadata"]
    assert doc["total_budget"] == "1000.50" and doc["period_budget"] == "100"
    assert Decimal(doc["last_transaction_amount"]) == Decimal("12.34")
    assert datetime.fromisoformat(doc["last_purchase_date"]) == datetime.fromisoformat("2026-01-02T03:04:05+00:00")
    # usage starts empty
    assert doc["total_cost"] == "0" and doc["number_of_requests"] == 0 and doc["first_seen"] is None
    location = resp.headers["Location"]
    assert location.endswith(f"/v1/customers/{ident}")
    assert (
        await fetch(client, org, ident) == doc == await ok_json(await client.get(rel(location), headers=org.headers()))
    )
    row = await db_row(pool, org, ident)
    assert row is not None and row["organization_id"] == org.id


async def test_create_defaults(client: TestClient, org: Org) -> None:
    doc = await create(client, org)
    assert doc["status"] == "active"
    assert doc["metadata"] == {}
    assert doc["address"] == dict.fromkeys(("line1", "line2", "city", "state", "postal_code", "country"))
    assert doc["parent_customer_id"] is None
    assert doc["budget_duration"] is None and doc["period_start"] is None and doc["period_end"] is None
    assert doc["total_period_usage"] == "0"


@pytest.mark.parametrize("identifier", ["with space", "q?x=1", "hash#1", "slash/ed", "pct%41", "ünïcode", "comma,sep"])
async def test_location_works_for_any_identifier(client: TestClient, org: Org, identifier: str) -> None:
    ident = uid() + identifier
    resp = await client.post("/v1/customers", json={"customer_identifier": ident}, headers=org.headers())
    await ok_json(resp, 201)
    got = await ok_json(await client.get(rel(resp.headers["Location"]), headers=org.headers()))
    assert got["customer_identifier"] == ident


async def test_create_in_the_test_environment(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    ident = uid()
    created = await client.post("/v1/customers", json={"customer_identifier": ident}, headers=org.headers(org.test_key))
    by_test_key = await ok_json(created, 201)
    assert by_test_key["environment"] == "test"
    await problem(await client.get(url(ident), headers=org.headers()), 404)
    assert (await fetch(client, org, ident, org.test_key, environment="test"))["id"] == by_test_key["id"]
    # its Location finds the customer with the same key
    found = await client.get(rel(created.headers["Location"]), headers=org.headers(org.test_key))
    assert (await ok_json(found))["id"] == by_test_key["id"]
    # a prod key naming the test environment: 403 naming it, nothing written
    other = uid()
    resp = await client.post(
        "/v1/customers", json={"customer_identifier": other, "environment": "test"}, headers=org.headers()
    )
    body = await problem(resp, 403, "environment")
    assert [e["in"] for e in body["errors"]] == ["body"]
    assert await db_row(pool, org, other, "test") is None
    assert await db_row(pool, org, other, "prod") is None


async def test_duplicate_identifier_is_409(client: TestClient, org: Org, other_org: Org) -> None:
    doc = await create(client, org, name="first")
    ident = doc["customer_identifier"]
    resp = await client.post(
        "/v1/customers", json={"customer_identifier": ident, "name": "second"}, headers=org.headers()
    )
    await problem(resp, 409)
    assert (await fetch(client, org, ident))["name"] == "first"
    # unique per organization and environment only
    await create(client, org, org.test_key, customer_identifier=ident)
    await create(client, other_org, customer_identifier=ident)


@pytest.mark.parametrize("field, value", READ_ONLY)
async def test_create_with_a_read_only_field_is_refused(
    client: TestClient, pool: asyncpg.Pool, org: Org, field: str, value: Any
) -> None:
    ident = uid()
    resp = await client.post(
        "/v1/customers", json={"customer_identifier": ident, "name": "x", field: value}, headers=org.headers()
    )
    body = await problem(resp, 400, field)
    error = next(e for e in body["errors"] if e["name"] == field)
    assert error["in"] == "body" and "read-only" in error["detail"]
    await problem(await client.get(url(ident), headers=org.headers()), 404)
    assert await db_row(pool, org, ident) is None


@pytest.mark.parametrize(
    "body, name",
    [
        ({"favourite_colour": "blue"}, "favourite_colour"),
        ({"status": "zombie"}, "status"),
        ({"status": 1}, "status"),
        ({"email": "x" * 501}, "email"),
        ({"total_budget": "-1"}, "total_budget"),
        ({"period_budget": -0.5}, "period_budget"),
        ({"total_budget": "0.00000000001"}, "total_budget"),
        ({"total_budget": "lots"}, "total_budget"),
        ({"budget_duration": "hourly"}, "budget_duration"),
        ({"parent_customer_id": "nope"}, "parent_customer_id"),
        ({"metadata": "x"}, "metadata"),
        ({"metadata": [1, 2]}, "metadata"),
        ({"last_purchase_date": "last tuesday"}, "last_purchase_date"),
        ({"address": "10 Downing St"}, "address"),
        ({"address": {"planet": "Mars"}}, "address.planet"),
        ({"environment": "staging"}, "environment"),
    ],
)
async def test_create_with_an_invalid_field(
    client: TestClient, pool: asyncpg.Pool, org: Org, body: dict, name: str
) -> None:
    ident = uid()
    resp = await client.post("/v1/customers", json={"customer_identifier": ident, **body}, headers=org.headers())
    await problem(resp, 400, name)
    assert await db_row(pool, org, ident) is None


@pytest.mark.parametrize("ident", [None, "", "x" * 256, 5])
async def test_create_needs_a_valid_identifier(client: TestClient, org: Org, ident: Any) -> None:
    body = {"name": "nameless"} if ident is None else {"customer_identifier": ident}
    await problem(await client.post("/v1/customers", json=body, headers=org.headers()), 400, "customer_identifier")


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[]", b'[{"customer_identifier": "x"}]', b'"x"', b"null", b"42"])
@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_body_must_be_a_json_object(client: TestClient, org: Org, raw: bytes, method: str) -> None:
    existing = await create(client, org, name="kept")
    path = "/v1/customers" if method == "POST" else url(existing["customer_identifier"])
    headers = {**org.headers(), "Content-Type": "application/json"}
    resp = await client.request(method, path, data=raw, headers=headers)
    await problem(resp, 400, "body")
    assert (await fetch(client, org, existing["customer_identifier"]))["name"] == "kept"


async def test_oversized_body_is_413(client: TestClient, org: Org) -> None:
    big = {"customer_identifier": uid(), "metadata": {"blob": "x" * 1_100_000}}
    resp = await client.post("/v1/customers", json=big, headers=org.headers())
    await problem(resp, 413)


# ---------------------------------------------------------------------------------------------
# PATCH


def _without(doc: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in keys}


async def patch(
    client: TestClient, org: Org, identifier: str, body: dict, status: int = 200, key: str | None = None, **params: str
) -> dict:
    resp = await client.patch(url(identifier), json=body, params=params, headers=org.headers(key))
    if status == 200:
        doc = await ok_json(resp)
        assert set(doc) == set(Customer.model_fields)
        return doc
    return await problem(resp, status)


async def test_patch_changes_only_the_fields_sent(client: TestClient, org: Org) -> None:
    before = await create(client, org, **FULL)
    ident = before["customer_identifier"]
    after = await patch(client, org, ident, {"name": "Countess"})
    assert after["name"] == "Countess"
    assert _without(after, "name", "updated_at") == _without(before, "name", "updated_at")
    assert datetime.fromisoformat(after["updated_at"]) >= datetime.fromisoformat(before["updated_at"])
    assert await fetch(client, org, ident) == after
    # each writable field on its own
    changes = {
        "first_name": "A.",
        "last_name": "King",
        "email": "countess@example.org",
        "phone": "1",
        "customer_type": "individual",
        "status": "blacklisted",
        "stripe_customer_id": "cus_999",
        "application_id": "app_1",
        "last_transaction_amount": "-3.5",
        "last_purchase_date": "2026-02-01T00:00:00Z",
        "metadata": {"only": "this"},
    }
    current = after
    for field, value in changes.items():
        updated = await patch(client, org, ident, {field: value})
        if field == "last_transaction_amount":
            assert Decimal(updated[field]) == Decimal(value)
        elif field == "last_purchase_date":
            assert datetime.fromisoformat(updated[field]) == datetime.fromisoformat("2026-02-01T00:00:00+00:00")
        else:
            assert updated[field] == value
        assert _without(updated, field, "updated_at") == _without(current, field, "updated_at"), field
        current = updated


async def test_patch_nulls(client: TestClient, org: Org) -> None:
    doc = await create(client, org, **FULL)
    ident = doc["customer_identifier"]
    after = await patch(client, org, ident, {"email": None, "phone": None})
    assert after["email"] is None and after["phone"] is None and after["name"] == FULL["name"]
    # status is required: null leaves it as it was
    assert (await patch(client, org, ident, {"status": None}))["status"] == "draft"
    # metadata null empties it
    assert (await patch(client, org, ident, {"metadata": None}))["metadata"] == {}
    # an empty body changes nothing
    unchanged = await patch(client, org, ident, {})
    assert unchanged == await fetch(client, org, ident)


async def test_patch_address_partially(client: TestClient, org: Org) -> None:
    doc = await create(client, org, **FULL)
    ident = doc["customer_identifier"]
    after = await patch(client, org, ident, {"address": {"city": "Paris", "country": "FR"}})
    assert after["address"] == {**FULL["address"], "city": "Paris", "country": "FR"}
    after = await patch(client, org, ident, {"address": {"line2": None}})
    assert after["address"] == {**FULL["address"], "city": "Paris", "country": "FR", "line2": None}
    assert after["name"] == FULL["name"]
    cleared = await patch(client, org, ident, {"address": None})
    assert cleared["address"] == dict.fromkeys(FULL["address"])


@pytest.mark.parametrize("field, value", [*READ_ONLY, ("customer_identifier", "renamed"), ("environment", "test")])
async def test_patch_with_a_read_only_field_changes_nothing(
    client: TestClient, pool: asyncpg.Pool, org: Org, field: str, value: Any
) -> None:
    ident = uid()
    await insert_customer(pool, org, ident, name="orig", total_cost=Decimal("7.5"), number_of_requests=3)
    before_doc = await fetch(client, org, ident)
    before_row = await db_row(pool, org, ident)
    resp = await client.patch(url(ident), json={"name": "changed", field: value}, headers=org.headers())
    body = await problem(resp, 400, field)
    assert "read-only" in next(e for e in body["errors"] if e["name"] == field)["detail"]
    assert await fetch(client, org, ident) == before_doc
    assert await db_row(pool, org, ident) == before_row


async def test_patch_unknown_field_is_refused(client: TestClient, org: Org) -> None:
    doc = await create(client, org, name="orig")
    body = await patch(client, org, doc["customer_identifier"], {"name": "x", "nickname": "y"}, status=400)
    assert [e["name"] for e in body["errors"]] == ["nickname"]
    assert "not a known field" in body["errors"][0]["detail"]
    assert (await fetch(client, org, doc["customer_identifier"]))["name"] == "orig"


async def test_patch_unknown_customer_is_404(client: TestClient, org: Org) -> None:
    await patch(client, org, uid(), {"name": "x"}, status=404)
    await patch(client, org, uid(), {}, status=404)


async def test_patch_in_another_environment(client: TestClient, org: Org) -> None:
    ident = uid()
    await create(client, org, org.test_key, customer_identifier=ident, name="t")
    await patch(client, org, ident, {"name": "x"}, status=404)
    await patch(client, org, ident, {"name": "x"}, status=403, environment="test")
    assert (await patch(client, org, ident, {"name": "tt"}, key=org.test_key, environment="test"))["name"] == "tt"
    assert (await fetch(client, org, ident, org.test_key))["name"] == "tt"


async def _today(pool: asyncpg.Pool) -> date:
    return await pool.fetchval("SELECT (now() AT TIME ZONE 'UTC')::date")


@pytest.mark.parametrize("duration, length", [("daily", 1), ("weekly", 7), ("monthly", None), ("yearly", None)])
async def test_budgets_are_writable_and_period_figures_computed(
    client: TestClient, pool: asyncpg.Pool, org: Org, duration: str, length: int | None
) -> None:
    ident = uid("budget")
    row = await insert_customer(pool, org, ident, total_cost=Decimal("1111.1111"))
    today = await _today(pool)
    costs = {
        today: Decimal("1.25"),
        today - timedelta(days=1): Decimal("10"),
        today - timedelta(days=6): Decimal("100"),
        today - timedelta(days=40): Decimal("1000"),
        today - timedelta(days=400): Decimal("0.1111"),
    }
    for day, cost in costs.items():
        await pool.execute(
            "INSERT INTO daily_usage (organization_id, customer_id, day, cost) VALUES ($1, $2, $3, $4)",
            org.id,
            row["id"],
            day,
            cost,
        )
    # without a duration the period is the customer's life
    doc = await fetch(client, org, ident)
    assert doc["period_start"] is None and doc["period_end"] is None
    assert Decimal(doc["total_period_usage"]) == Decimal("1111.1111")

    doc = await patch(client, org, ident, {"total_budget": "500.25", "period_budget": 50, "budget_duration": duration})
    assert (
        doc["total_budget"] == "500.25" and Decimal(doc["period_budget"]) == 50 and doc["budget_duration"] == duration
    )
    start = datetime.fromisoformat(doc["period_start"])
    end = datetime.fromisoformat(doc["period_end"])
    assert start.utcoffset() == timedelta(0) and (start.hour, start.minute, start.second) == (0, 0, 0)
    assert start.date() <= today < end.date()
    if length is not None:
        assert end - start == timedelta(days=length)
    if duration == "weekly":
        assert start.weekday() == 0
    if duration == "monthly":
        assert start.day == 1 and end.day == 1 and (end.month - start.month) % 12 == 1
    if duration == "yearly":
        assert (start.month, start.day, end.month, end.day, end.year - start.year) == (1, 1, 1, 1, 1)
    expected = sum((c for d, c in costs.items() if start.date() <= d < end.date()), Decimal(0))
    assert Decimal(doc["total_period_usage"]) == expected
    assert Decimal(doc["total_period_usage"]) >= Decimal("1.25")
    assert (await fetch(client, org, ident))["total_period_usage"] == doc["total_period_usage"]
    # the same figures in a list
    listed = await ok_json(
        await client.get("/v1/customers", params={"customer_identifiers": ident}, headers=org.headers())
    )
    assert listed["results"][0]["total_period_usage"] == doc["total_period_usage"]
    # removing the duration goes back to the lifetime figure
    doc = await patch(client, org, ident, {"budget_duration": None})
    assert doc["period_start"] is None and Decimal(doc["total_period_usage"]) == Decimal("1111.1111")
    assert doc["total_budget"] == "500.25"


async def test_parent_customer(client: TestClient, pool: asyncpg.Pool, org: Org, other_org: Org) -> None:
    parent = await create(client, org, name="parent")
    foreign = await create(client, other_org, name="foreign parent")
    # POST with a foreign parent: 400, nothing created
    ident = uid()
    resp = await client.post(
        "/v1/customers", json={"customer_identifier": ident, "parent_customer_id": foreign["id"]}, headers=org.headers()
    )
    await problem(resp, 400, "parent_customer_id")
    assert await db_row(pool, org, ident) is None
    # ... or a parent that does not exist
    resp = await client.post(
        "/v1/customers",
        json={"customer_identifier": ident, "parent_customer_id": str(uuid.uuid4())},
        headers=org.headers(),
    )
    await problem(resp, 400, "parent_customer_id")
    child = await create(client, org, customer_identifier=ident, parent_customer_id=parent["id"])
    assert child["parent_customer_id"] == parent["id"]
    # PATCH with a foreign, missing or own id: 400, unchanged
    for bad in (foreign["id"], str(uuid.uuid4()), child["id"]):
        body = await patch(client, org, ident, {"parent_customer_id": bad, "name": "changed"}, status=400)
        assert [e["name"] for e in body["errors"]] == ["parent_customer_id"]
        assert await fetch(client, org, ident) == child
    # moving to another parent of the same organization, then to none
    parent2 = await create(client, org)
    assert (await patch(client, org, ident, {"parent_customer_id": parent2["id"]}))["parent_customer_id"] == parent2[
        "id"
    ]
    expanded = CustomerExpanded.model_validate(await fetch(client, org, ident, expand="parent_customer"))
    assert expanded.parent_customer is not None and str(expanded.parent_customer.id) == parent2["id"]
    assert (await patch(client, org, ident, {"parent_customer_id": None}))["parent_customer_id"] is None


# ---------------------------------------------------------------------------------------------
# DELETE


async def test_delete_then_404(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    doc = await create(client, org)
    ident = doc["customer_identifier"]
    cid = uuid.UUID(doc["id"])
    await pool.execute(
        "INSERT INTO daily_usage (organization_id, customer_id, day, cost) VALUES ($1, $2, '2026-01-01', 1)",
        org.id,
        cid,
    )
    await pool.execute(
        "INSERT INTO subscriptions (organization_id, id, customer_id, status, source_time)"
        " VALUES ($1, $2, $3, 'active', now())",
        org.id,
        uid("sub"),
        cid,
    )
    resp = await client.delete(url(ident), headers=org.headers())
    assert resp.status == 204 and await resp.read() == b""
    await problem(await client.get(url(ident), headers=org.headers()), 404)
    await problem(await client.delete(url(ident), headers=org.headers()), 404)
    await problem(await client.patch(url(ident), json={"name": "x"}, headers=org.headers()), 404)
    assert await db_row(pool, org, ident) is None
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM daily_usage WHERE organization_id = $1 AND customer_id = $2", org.id, cid
        )
        == 0
    )
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM subscriptions WHERE organization_id = $1 AND customer_id = $2", org.id, cid
        )
        == 0
    )
    # the identifier can be used again
    await create(client, org, customer_identifier=ident)


async def test_delete_unknown_is_404(client: TestClient, org: Org) -> None:
    await problem(await client.delete(url(uid()), headers=org.headers()), 404)


async def test_delete_a_parent_detaches_its_children(client: TestClient, org: Org) -> None:
    parent = await create(client, org)
    child = await create(client, org, parent_customer_id=parent["id"])
    assert (await client.delete(url(parent["customer_identifier"]), headers=org.headers())).status == 204
    assert (await fetch(client, org, child["customer_identifier"]))["parent_customer_id"] is None


async def test_delete_in_another_environment(client: TestClient, org: Org) -> None:
    ident = uid()
    await create(client, org, org.test_key, customer_identifier=ident)
    prod = await create(client, org, customer_identifier=ident)
    await problem(await client.delete(url(ident) + "?environment=test", headers=org.headers()), 403, "environment")
    test_key = org.headers(org.test_key)
    assert (await client.delete(url(ident) + "?environment=test", headers=test_key)).status == 204
    assert (await fetch(client, org, ident))["id"] == prod["id"]
    await problem(await client.get(url(ident), headers=test_key), 404)


# ---------------------------------------------------------------------------------------------
# GET one


async def test_retrieve(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    ident = uid()
    await insert_customer(
        pool, org, ident, total_cost=Decimal("12.3456789"), latency_sum=3.0, latency_count=2, number_of_requests=2
    )
    doc = await fetch(client, org, ident)
    CustomerExpanded.model_validate(doc)
    assert set(doc) == set(Customer.model_fields)
    assert doc["total_cost"] == "12.3456789"
    assert doc["average_latency"] == 1.5 and doc["average_ttft"] is None
    await problem(await client.get(url(ident) + "?environment=qa", headers=org.headers()), 400, "environment")
    await problem(await client.get(url(ident) + "?fields=name", headers=org.headers()), 400, "fields")
    await problem(await client.get(url(uid()), headers=org.headers()), 404)


# ---------------------------------------------------------------------------------------------
# U+0000 cannot be stored by PostgreSQL: a 400 naming the field (or a 404 for a path), never a 500.


@pytest.mark.parametrize(
    "body, name",
    [
        ({"name": "a\x00b"}, "name"),
        ({"customer_identifier": "a\x00b"}, "customer_identifier"),
        ({"metadata": {"k": "v\x00"}}, "metadata.k"),
        ({"metadata": {"k\x00": 1}}, "metadata"),  # the key itself is never echoed
        ({"metadata": {"list": ["ok", "\x00"]}}, "metadata.list.1"),
        ({"address": {"city": "\x00"}}, "address.city"),
    ],
)
async def test_nul_characters_in_a_body_are_a_400(
    client: TestClient, pool: asyncpg.Pool, org: Org, body: dict, name: str
) -> None:
    ident = uid()
    resp = await client.post("/v1/customers", json={"customer_identifier": ident, **body}, headers=org.headers())
    await problem(resp, 400, name)
    existing = await create(client, org, name="kept")
    patch_body = {k: v for k, v in body.items() if k != "customer_identifier"} or {"name": "\x00"}
    resp = await client.patch(url(existing["customer_identifier"]), json=patch_body, headers=org.headers())
    await problem(resp, 400)
    assert (await fetch(client, org, existing["customer_identifier"]))["name"] == "kept"


async def test_nul_characters_in_a_path_are_not_found(client: TestClient, org: Org) -> None:
    path = "/v1/customers/a%00b"
    await problem(await client.get(path, headers=org.headers()), 404)
    await problem(await client.patch(path, json={"name": "x"}, headers=org.headers()), 404)
    await problem(await client.delete(path, headers=org.headers()), 404)
    await problem(await client.get(path + "/usage?from=2026-01-01&to=2026-01-02", headers=org.headers()), 404)
